import pytest
import torch

from asaf_fx.passes.capture import capture_module
from asaf_fx.passes.graph_utils import aten, is_op
from asaf_fx.passes.infra import PassFailedError, PassManager, PassResult, propagate_shapes


class _Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 12), torch.nn.Linear(12, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.fixture
def gm():
    torch.manual_seed(0)
    return capture_module(_Mlp().eval(), (torch.randn(2, 8),))


def break_shapes(gm):
    """Feed the first linear's output (width 12) into the first linear again (expects width 8)."""
    first = next(n for n in gm.graph.nodes if is_op(n, aten.linear))
    with gm.graph.inserting_after(first):
        bad = gm.graph.call_function(aten.linear.default, (first, first.args[1]))
    first.replace_all_uses_with(bad, delete_user_cb=lambda u: u is not bad)
    return PassResult(gm, True)


def noop(gm):
    return PassResult(gm, False)


def test_manager_names_the_pass_that_broke_the_graph(gm):
    with pytest.raises(PassFailedError, match="pass break_shapes left an invalid graph"):
        PassManager([noop, break_shapes, noop])(gm)


def test_manager_checking_at_the_end_names_the_sequence(gm):
    calls = []

    def spy(g):
        calls.append(g)
        return PassResult(g, True)

    with pytest.raises(PassFailedError, match="passes noop, break_shapes, spy left an invalid graph"):
        PassManager([noop, break_shapes, spy], check="end")(gm)
    assert calls == [gm]  # no check between passes: spy ran after break_shapes, the check came last
    with pytest.raises(ValueError, match="check must be True, False or 'end'"):
        PassManager([noop], check="last")


def test_manager_reports_modified_and_records_passes(gm):
    result = PassManager([noop])(gm)
    assert not result.modified and gm.meta["asaf_fx"]["passes"] == ["noop"]
    x = torch.randn(2, 8)  # exported with a static batch of 2
    ref = gm(x)
    relu = next(n for n in gm.graph.nodes if is_op(n, aten.relu))

    def relu_to_gelu(g):
        relu.target = aten.gelu.default
        return PassResult(g, True)

    assert PassManager([relu_to_gelu])(gm).modified
    assert not torch.allclose(gm(x), ref)  # recompiled: the new graph runs
    assert relu.meta["val"].shape == (2, 12)  # shapes re-propagated


def test_pass_must_return_a_pass_result(gm):
    with pytest.raises(TypeError, match="returned GraphModule, expected PassResult"):
        PassManager([lambda g: g])(gm)


def test_memoised_propagation_gives_every_node_the_plain_fake_result(captured):
    # The decoder's layers repeat op and shapes, so most nodes take an earlier node's memoised
    # result; each must still carry what fake-tensor propagation of that node alone gives.
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    gm = captured("llama")
    propagate_shapes(gm)
    memoised = {n.name: n.meta.get("val") for n in gm.graph.nodes}
    with torch.no_grad():
        FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*gm.meta["asaf_fx"]["example_inputs"])
    compared = 0
    for n in gm.graph.nodes:
        plain, got = n.meta.get("val"), memoised[n.name]
        if isinstance(plain, torch.Tensor):
            assert (got.shape, got.stride(), got.dtype) == (plain.shape, plain.stride(), plain.dtype), n.name
            compared += 1
        else:
            assert type(got) is type(plain), n.name
    assert compared > 100
