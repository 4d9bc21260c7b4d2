import io
import re
from collections import Counter

import pytest
import torch
from rich.console import Console

import asaf_fx
from asaf_fx.inspection import inspect, layers, tensors_digest
from asaf_fx.plan import Group, Plan


def _console(width: int = 200):
    return Console(file=io.StringIO(), width=width)


def _show(obj, width: int = 200, **kwargs) -> str:
    console = _console(width)
    inspect(obj, console=console, **kwargs)
    return console.file.getvalue()


@pytest.fixture(scope="module")
def compiled_llama(tiny_models):
    return asaf_fx.compile(tiny_models["llama"])


@pytest.fixture(scope="module")
def pruned_w4a4(tiny_models):
    """Layer 1 pruned, layer 0 dense, W4A4 with a 4-bit KV cache: two layer kinds."""
    plan = Plan((Group(0, 1, 0.0), Group(1, 2, 0.5)), flops=1.0, dense_flops=2.0, predicted_degradation=0.0,
                max_degradation=0.0, method="test")
    return asaf_fx.compile(tiny_models["llama"], plan,
                           quant=asaf_fx.QuantConfig(w_bits=4, a_bits=4, kv_bits=4, w_method="rtn"),
                           calibration=torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0)),
                           prune=asaf_fx.PruneConfig(granularity=16))


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
    assert "LlamaForCausalLM [serve]" in text
    assert "rotate_residual(hadamard w=96)" in text and "rotate_vo(w=48 ×2)" in text
    assert "48 48 96 160" in text  # the online rotations' widths


def test_identical_layers_share_a_row(compiled_llama):
    text = _show(compiled_llama)
    assert "0–1 (2)" in text and "\n  0 " not in text and "\n  1 " not in text
    assert "0–1 (2): q 96×96, k 48×96, v 48×96, o 96×96, gate 160×96, up 160×96, down 96×160" in text


def test_differing_layers_keep_their_own_rows(pruned_w4a4):
    (dense, pruned) = pruned_w4a4.graph.meta["asaf_fx"]["mlp_widths"]
    assert dense == {"kept": 160, "width": 160} and pruned["kept"] < 160
    text = _show(pruned_w4a4)
    assert "0–1" not in text
    rows = [line.split() for line in text.splitlines() if line.split()[:1] in (["0"], ["1"])]
    assert [row[:2] for row in rows] == [["0", "W4A4"], ["1", "W4A4"]]
    assert rows[0][-5:] == ["160/160", "48", "48", "96", "160"]
    assert rows[1][-5:] == [f"{pruned['kept']}/160", "48", "48", "96", str(pruned["kept"])]
    assert "0: q+k+v 192×96, o 96×96, gate+up 320×96, down 96×160" in text  # stacked calls, one row each
    assert f"1: q+k+v 192×96, o 96×96, gate+up {2 * pruned['kept']}×96, down 96×{pruned['kept']}" in text
    assert "head: lm_head 256×96" in text and "total" in text and "FLOP ratio" in text


def test_passes_applied_are_listed_in_order(pruned_w4a4):
    text = _show(pruned_w4a4)
    shown = re.sub(r"\([^)]*\)", "", text[text.index("passes:") + len("passes:"):])  # names, without parameters
    assert [name.strip() for name in shown.split(",")] == [
        "fold_norms", "rotate_residual", "prune_mlp", "online_hadamard_down", "rotate_vo",
        "rotate_qk", "online_hadamard_out", "quantize_kv", "lower_linears"]
    kept = 160 + pruned_w4a4.graph.meta["asaf_fx"]["mlp_widths"][1]["kept"]
    for shown in ("rotate_residual(hadamard w=96)", f"prune_mlp({kept}/320 kept)", "quantize_kv(4 bits)",
                  "lower_linears(14/14 int4)"):
        assert shown in text


@pytest.mark.parametrize("layer", [None, 1])
def test_fits_80_columns_without_truncation(pruned_w4a4, layer):
    narrow, wide = _show(pruned_w4a4, 80, layer=layer), _show(pruned_w4a4, 400, layer=layer)
    assert max(len(line) for line in narrow.splitlines()) <= 80
    assert "…" not in narrow
    # Wrapping and folding move characters between lines; truncation or cropping would lose some.
    def chars(text):
        return Counter(c for c in text if not c.isspace() and c != "─")
    assert chars(narrow) == chars(wide)


def test_one_layer_node_table(pruned_w4a4):
    text = _show(pruned_w4a4, layer=1)
    (info,) = inspect(pruned_w4a4, layer=1, console=_console())
    assert text.startswith("layer 1:") and "call_function" not in text  # a table, not raw FX
    header = text.splitlines()[1].split()
    assert header == ["node", "op", "shape", "inputs"]
    assert len(info.nodes) == len(layers(pruned_w4a4.graph)[2].nodes)
    linears = [n for n in info.nodes if "w4a_int_linear" in n.name]
    assert len(linears) == 4 and text.count(" w4a_int_linear ") == 4  # q/k/v and gate/up stacked
    for node in linears:  # each row: short name, op, output shape, inputs (the packed weight named briefly)
        shape = "×".join(map(str, node.meta["val"].shape))
        assert f"{node.name.replace('_default', '')}  " in text and f" {shape} " in text
    assert "hadamard_rotate" in text and "scaled_dot_product_attention" in text and "o_proj_int4" in text
    assert "q_proj_stack3_int4" in text and "slice" in text


def test_table_on_a_captured_graph_shows_unfolded_norms(captured):
    console = _console()
    infos = inspect(captured("qwen2"), console=console)
    assert [i.norm_scales for i in infos] == [0, 2, 2, 1]
    assert all(not i.online_rotations for i in infos)
    text = console.file.getvalue()
    assert "5 RMSNorm scale multiplies not folded" in text and "passes: none" in text and "0–1 (2)" in text


def test_bad_arguments(compiled_llama):
    with pytest.raises(ValueError, match="no layer 7; this graph has embed, 0, 1, head"):
        inspect(compiled_llama, layer=7, console=_console())
    with pytest.raises(TypeError, match="inspect expects"):
        inspect(42)


def test_tensors_digest_changes_with_any_compiled_bit(tiny_models):
    compiled = asaf_fx.compile(tiny_models["llama"])
    before = tensors_digest(compiled)
    assert before == tensors_digest(asaf_fx.compile(tiny_models["llama"]))
    name, tensor = next((n, t) for n, t in compiled.graph.state_dict().items() if t.is_floating_point())
    with torch.no_grad():
        tensor.view(-1)[0] = torch.nextafter(tensor.view(-1)[0], torch.tensor(float("inf"), dtype=tensor.dtype))
    assert tensors_digest(compiled) != before, name
