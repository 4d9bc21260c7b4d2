import pytest
import torch

from asaf_fx.passes.capture import INPUTS, graph_inputs
from asaf_fx.passes.graph_utils import count_op
from asaf_fx.passes.infra import PassManager, PatternError
from asaf_fx.passes.patterns import match_rope
from asaf_fx.passes.rotate.rotate_qk import RotateQueryKey

HADAMARD = torch.ops.asaf_fx.hadamard_rotate.default


@pytest.mark.parametrize("head_dim", [48, 80])
def test_query_and_key_rotated_after_rope(head_dim, tiny_ids, h):
    from asaf_fx.passes.capture import capture, run_graph

    model = h.make_tiny("qwen2", head_dim=head_dim)
    gm = capture(model)
    PassManager([RotateQueryKey(seed=4)])(gm)
    rotations = [n for n in gm.graph.nodes if n.target is HADAMARD]
    assert len(rotations) == 2 * model.config.num_hidden_layers
    assert all(match_rope(n.args[0]) is not None for n in rotations)
    assert all(n.meta["val"].shape[-1] == head_dim for n in rotations)
    assert h.rel_err(run_graph(gm, tiny_ids), model(tiny_ids).logits) < 1e-5


def test_cache_holds_rotated_keys(captured, tiny_models, tiny_ids, h):
    gm = captured("mistral")
    PassManager([RotateQueryKey()])(gm)
    writes = [n for n in gm.graph.nodes if n.op == "call_function" and "index_copy" in str(n.target)]
    key_writes = [n for n in writes if n.args[3].target is HADAMARD]
    assert len(key_writes) == tiny_models["mistral"].config.num_hidden_layers  # keys, not values
    assert count_op(gm, HADAMARD) == 2 * len(key_writes)
    ids = tiny_ids[:1]
    length = ids.shape[1]
    cache = list(graph_inputs(gm, ids)[len(INPUTS):])
    mask = torch.ones(1, length, dtype=torch.bool)
    out = torch.cat([gm(ids[:, i:i + 1], torch.tensor([[i]]), torch.tensor([i]), mask, torch.tensor([0]), *cache)
                     for i in range(length)], 1)
    assert h.rel_err(out, tiny_models["mistral"](ids).logits) < 1e-5


def test_attention_without_rope_is_a_clear_error(negative_graph, h):
    gm = negative_graph("plain_attention")
    snap = h.snapshot(gm)
    with pytest.raises(PatternError, match="does not come from a rotate_half RoPE"):
        RotateQueryKey()(gm)
    h.assert_unchanged(gm, snap)
