import io

import pytest
import torch
from rich.console import Console

import asaf_fx
from asaf_fx.inspection import inspect, layers, tensors_digest


def _console():
    return Console(file=io.StringIO(), width=200)


@pytest.fixture(scope="module")
def compiled_llama(tiny_models):
    return asaf_fx.compile(tiny_models["llama"], decode=False)


def test_table_on_a_compiled_model_shows_rotations(compiled_llama):
    console = _console()
    infos = inspect(compiled_llama, console=console)
    assert [i.name for i in infos] == ["embed", "0", "1", "head"]
    for info in infos[1:3]:
        assert sorted(info.online_rotations) == [48, 48, 96, 160]  # q, k after RoPE; o_proj, down_proj inputs
        assert len(info.linears) == 7 and info.norm_scales == 0
        assert info.flops == 2 * (96 * 96 * 2 + 48 * 96 * 2 + 3 * 96 * 160) and info.sparsity == 0
    (head,) = infos[-1].linears
    assert (head.weight, head.out_features, head.in_features, head.w_bits) == ("lm_head.weight", 256, 96, None)
    text = console.file.getvalue()
    assert "rotate_residual(hadamard w=96)" in text and "rotate_vo(w=48)" in text
    assert "H160" in text and "H48" in text


def test_table_on_a_captured_graph_shows_unfolded_norms(captured):
    infos = inspect(captured("qwen2"), console=_console())
    assert [i.norm_scales for i in infos] == [0, 2, 2, 1]
    assert all(not i.online_rotations for i in infos)


def test_one_layer_graph(compiled_llama):
    console = _console()
    (info,) = inspect(compiled_llama, layer=1, console=console)
    text = console.file.getvalue()
    assert text.startswith("layer 1:") and "hadamard_rotate" in text and "scaled_dot_product_attention" in text
    assert len(info.nodes) == len(layers(compiled_llama.forward_graph)[2].nodes)


def test_bad_arguments(compiled_llama):
    with pytest.raises(ValueError, match="no layer 7; this graph has embed, 0, 1, head"):
        inspect(compiled_llama, layer=7, console=_console())
    with pytest.raises(TypeError, match="inspect expects"):
        inspect(42)


def test_tensors_digest_changes_with_any_compiled_bit(tiny_models):
    compiled = asaf_fx.compile(tiny_models["llama"], decode=False)
    before = tensors_digest(compiled)
    assert before == tensors_digest(asaf_fx.compile(tiny_models["llama"], decode=False))
    name, tensor = next((n, t) for n, t in compiled.forward_graph.state_dict().items() if t.is_floating_point())
    with torch.no_grad():
        tensor.view(-1)[0] = torch.nextafter(tensor.view(-1)[0], torch.tensor(float("inf"), dtype=tensor.dtype))
    assert tensors_digest(compiled) != before, name
