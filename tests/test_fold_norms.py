import pytest
import torch

from asaf_fx.passes.capture import run_graph
from asaf_fx.passes.infra import PassManager, PatternError
from asaf_fx.passes.patterns import find_rmsnorms
from asaf_fx.passes.rotate.fold_norms import FoldNorms
from asaf_fx.passes.rotate.untie_embeddings import UntieEmbeddings


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_folds_every_scale_and_keeps_logits(arch, captured, tiny_models, tiny_ids, h):
    gm = captured(arch)
    layers = tiny_models[arch].config.num_hidden_layers
    assert sum(m.weight_mul is not None for m in find_rmsnorms(gm)) == 2 * layers + 1
    PassManager([UntieEmbeddings(), FoldNorms()])(gm)
    norms = find_rmsnorms(gm)
    assert len(norms) == 2 * layers + 1 and all(m.weight_mul is None for m in norms)
    assert not any("layernorm_weight" in n.name or "norm_weight" in n.name for n in gm.graph.nodes)
    ref = tiny_models[arch](tiny_ids).logits
    assert h.rel_err(run_graph(gm, tiny_ids), ref) < 1e-5


def test_original_model_untouched(captured, tiny_models, tiny_ids, h):
    model = tiny_models["qwen2"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    PassManager([FoldNorms()])(captured("qwen2"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_tied_head_keeps_its_scale_and_the_shared_matrix(captured, tiny_models, tiny_ids, h):
    gm = captured("llama")  # lm_head shares the embedding matrix
    layers = tiny_models["llama"].config.num_hidden_layers
    assert FoldNorms()(gm).modified
    gm.recompile()
    scaled = [m for m in find_rmsnorms(gm) if m.weight_mul is not None]
    assert len(scaled) == 1 and len(find_rmsnorms(gm)) == 2 * layers + 1  # only the final norm keeps γ
    assert h.rel_err(run_graph(gm, tiny_ids), tiny_models["llama"](tiny_ids).logits) < 1e-5


def test_layernorm_is_rejected_by_name(negative_graph, h):
    gm = negative_graph("layernorm_lm")
    snap = h.snapshot(gm)
    with pytest.raises(PatternError, match="unsupported normalisation.*layer_norm"):
        FoldNorms()(gm)
    h.assert_unchanged(gm, snap)


def test_no_rmsnorm_is_a_clear_error(negative_graph, h):
    gm = negative_graph("gelu_mlp")
    snap = h.snapshot(gm)
    with pytest.raises(PatternError, match="no RMSNorm"):
        FoldNorms()(gm)
    h.assert_unchanged(gm, snap)
