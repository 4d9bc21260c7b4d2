import pytest
import torch

from asaf_fx.passes.capture import run_graph
from asaf_fx.passes.graph_utils import get_tensor
from asaf_fx.passes.infra import PassManager, PatternError
from asaf_fx.passes.patterns import find_attentions
from asaf_fx.passes.rotate.rotate_vo import RotateValueOutput


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_value_heads_rotated_and_outputs_kept(arch, captured, tiny_models, tiny_ids, h):
    gm = captured(arch)
    attentions, failed = find_attentions(gm)
    assert not failed and len(attentions) == tiny_models[arch].config.num_hidden_layers
    assert all(a.head_dim == 48 for a in attentions)
    weights = [n for a in attentions for n in (a.v_proj.args[1], a.o_proj.args[1])]
    before = {n.target: get_tensor(gm, n).clone() for n in weights}
    n_nodes = len(gm.graph.nodes)
    PassManager([RotateValueOutput(seed=2)])(gm)
    assert len(gm.graph.nodes) == n_nodes
    assert all(not torch.allclose(get_tensor(gm, n), before[n.target]) for n in weights)
    ref = tiny_models[arch](tiny_ids[:1]).logits
    out = run_graph(gm, tiny_ids[:1])
    assert h.rel_err(out, ref) < 1e-5


def test_attention_without_rope_is_a_clear_error(negative_graph, h):
    gm = negative_graph("plain_attention")
    snap = h.snapshot(gm)
    with pytest.raises(
        PatternError, match="query of scaled_dot_product_attention does not come from a rotate_half RoPE"
    ):
        RotateValueOutput()(gm)
    h.assert_unchanged(gm, snap)


def test_no_attention_is_a_clear_error(negative_graph, h):
    gm = negative_graph("gelu_mlp")
    snap = h.snapshot(gm)
    with pytest.raises(PatternError, match="no scaled_dot_product_attention"):
        RotateValueOutput()(gm)
    h.assert_unchanged(gm, snap)
