import pytest
import torch

from asaf_fx.passes.capture import run_graph
from asaf_fx.passes.graph_utils import count_op, get_tensor
from asaf_fx.passes.infra import PassManager, PatternError
from asaf_fx.passes.patterns import find_swiglus
from asaf_fx.passes.rotate.online_hadamard import OnlineHadamardDown

HADAMARD = torch.ops.asaf_fx.hadamard_rotate.default


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_inserts_one_rotation_per_mlp_and_keeps_logits(arch, captured, tiny_models, tiny_ids, h):
    gm = captured(arch)
    downs = [m.down for m in find_swiglus(gm)]
    before = [get_tensor(gm, d.args[1]).clone() for d in downs]
    assert count_op(gm, HADAMARD) == 0
    PassManager([OnlineHadamardDown(seed=1)])(gm)
    assert count_op(gm, HADAMARD) == tiny_models[arch].config.num_hidden_layers
    for d, w in zip(downs, before):
        assert d.args[0].target is HADAMARD
        assert d.args[0].meta["nn_module_stack"] == d.meta["nn_module_stack"]  # provenance kept
        assert get_tensor(gm, d.args[0].args[1]).shape == (5, 5)  # 160 = 32 · 5
        assert not torch.allclose(get_tensor(gm, d.args[1]), w)
    ref = tiny_models[arch](tiny_ids).logits
    assert h.rel_err(run_graph(gm, tiny_ids), ref) < 1e-5


def test_pruned_width_works(h):
    # Widths that pruning produces (here 150 = 2 · 75) need no Hadamard matrix of that order.
    model = h.make_tiny("mistral", intermediate_size=150)
    from asaf_fx.passes.capture import capture

    gm = capture(model)
    PassManager([OnlineHadamardDown()])(gm)
    ids = torch.randint(0, 256, (1, 9))
    assert h.rel_err(run_graph(gm, ids), model(ids).logits) < 1e-5


def test_no_swiglu_is_a_clear_error(negative_graph, h):
    gm = negative_graph("gelu_mlp")
    snap = h.snapshot(gm)
    with pytest.raises(PatternError, match="no SwiGLU"):
        OnlineHadamardDown()(gm)
    h.assert_unchanged(gm, snap)
