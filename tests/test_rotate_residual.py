import pytest
import torch

from asaf_fx.passes.capture import run_graph
from asaf_fx.passes.graph_utils import aten, get_tensor, is_op
from asaf_fx.passes.infra import PassManager, PatternError
from asaf_fx.passes.rotate.fold_norms import FoldNorms
from asaf_fx.passes.rotate.residual import find_residual_stream
from asaf_fx.passes.rotate.rotate_residual import RotateResidual
from asaf_fx.passes.rotate.untie_embeddings import UntieEmbeddings


def _prepared(captured, arch):
    gm = captured(arch)
    PassManager([UntieEmbeddings(), FoldNorms()])(gm)
    return gm


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
def test_rotation_keeps_logits_and_rewrites_every_stream_weight(arch, kind, captured, tiny_models, tiny_ids, h):
    gm = _prepared(captured, arch)
    layers = tiny_models[arch].config.num_hidden_layers
    stream = find_residual_stream(gm)
    # q, k, v, gate, up per layer + lm_head read the stream; o_proj and down_proj write it.
    assert (len(stream.readers), len(stream.writers), len(stream.norms)) == (5 * layers + 1, 2 * layers, 2 * layers + 1)
    touched = [n.args[1] for n in stream.readers + stream.writers] + [e.args[0] for e in stream.embeddings]
    before = {n.target: get_tensor(gm, n).clone() for n in touched}
    n_nodes = len(gm.graph.nodes)
    assert PassManager([RotateResidual(seed=3, kind=kind)])(gm).modified
    assert len(gm.graph.nodes) == n_nodes  # absorbed into weights: no node added
    assert all(not torch.allclose(get_tensor(gm, n), before[n.target]) for n in touched)
    emb = get_tensor(gm, stream.embeddings[0].args[0])
    assert torch.allclose(emb.norm(dim=1), before[stream.embeddings[0].args[0].target].norm(dim=1), rtol=1e-5)
    ref = tiny_models[arch](tiny_ids).logits
    assert h.rel_err(run_graph(gm, tiny_ids), ref) < 1e-5


def test_tied_head_stays_on_the_rotated_embedding_matrix(captured, tiny_models, tiny_ids, h):
    gm = captured("llama")
    embedding = next(n for n in gm.graph.nodes if is_op(n, aten.embedding))
    before = get_tensor(gm, embedding.args[0]).clone()
    PassManager([FoldNorms(), RotateResidual(seed=3)])(gm)
    matrix = get_tensor(gm, embedding.args[0])
    head = [n for n in gm.graph.nodes if is_op(n, aten.linear)][-1]
    assert get_tensor(gm, head.args[1]) is matrix and not torch.allclose(matrix, before)
    rotations = [n for n in gm.graph.nodes if n.target == torch.ops.asaf_fx.hadamard_rotate.default]
    assert len(rotations) == 2  # around the final norm's scale
    assert h.rel_err(run_graph(gm, tiny_ids), tiny_models["llama"](tiny_ids).logits) < 1e-5


def test_dense_rotation_cannot_keep_a_tied_head_scale(captured, h):
    gm = captured("llama")
    FoldNorms()(gm)
    snap = h.snapshot(gm)
    with pytest.raises(PatternError, match="UntieEmbeddings"):
        RotateResidual(kind="orthogonal")(gm)
    h.assert_unchanged(gm, snap)


def test_unfolded_norm_is_a_clear_error(captured, h):
    gm = captured("mistral")
    snap = h.snapshot(gm)
    with pytest.raises(PatternError, match="run FoldNorms first"):
        RotateResidual()(gm)
    h.assert_unchanged(gm, snap)


def test_no_residual_stream_is_a_clear_error(negative_graph, h):
    gm = negative_graph("gelu_mlp")
    snap = h.snapshot(gm)
    with pytest.raises(PatternError, match="no aten.embedding"):
        RotateResidual()(gm)
    h.assert_unchanged(gm, snap)


def test_unsupported_stream_consumer_names_the_node(negative_graph, h):
    gm = negative_graph("layernorm_lm")
    snap = h.snapshot(gm)
    with pytest.raises(PatternError, match="unsupported consumer.*layer_norm"):
        RotateResidual()(gm)
    h.assert_unchanged(gm, snap)
