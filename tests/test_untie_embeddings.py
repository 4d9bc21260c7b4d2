import pytest
import torch

from asaf_fx.passes.capture import run_graph
from asaf_fx.passes.graph_utils import aten, get_tensor, is_op, storage_key
from asaf_fx.passes.infra import PassManager, PatternError
from asaf_fx.passes.rotate.untie_embeddings import UntieEmbeddings


def _embedding(gm):
    return next(n for n in gm.graph.nodes if is_op(n, aten.embedding))


def test_unties_shared_matrix_and_keeps_outputs(captured, tiny_models, tiny_ids, h):
    gm = captured("llama")
    head = next(n for n in gm.graph.nodes if is_op(n, aten.linear) and n.args[1] is _embedding(gm).args[0])
    before = len(gm.graph.find_nodes(op="get_attr"))
    result = PassManager([UntieEmbeddings()])(gm)
    assert result.modified
    assert len(gm.graph.find_nodes(op="get_attr")) == before + 1
    emb_w, head_w = get_tensor(gm, _embedding(gm).args[0]), get_tensor(gm, head.args[1])
    assert storage_key(emb_w) != storage_key(head_w) and torch.equal(emb_w, head_w)
    ref = tiny_models["llama"](tiny_ids).logits
    assert h.rel_err(run_graph(gm, tiny_ids), ref) == 0.0


def test_untied_model_is_left_alone(captured, h):
    gm = captured("mistral")
    snap = h.snapshot(gm)
    assert not UntieEmbeddings()(gm).modified
    h.assert_unchanged(gm, snap)


def test_no_embedding_is_a_clear_error(negative_graph, h):
    gm = negative_graph("gelu_mlp")
    snap = h.snapshot(gm)
    with pytest.raises(PatternError, match="no aten.embedding"):
        UntieEmbeddings()(gm)
    h.assert_unchanged(gm, snap)
