"""Pruning whole MLP channels: the pass, the channel choice, and what compile does with a plan."""

import pytest
import torch

import asaf_fx
from asaf_fx.inspection import layers, model_totals
from asaf_fx.passes.capture import run_graph
from asaf_fx.passes.infra import PassManager, PatternError
from asaf_fx.passes.layerwise import LayerwiseRunner
from asaf_fx.passes.patterns import find_swiglus
from asaf_fx.passes.prune.prune_mlp import MlpPruning, PruneMlpChannels, layer_linear_flops, select_mlp_channels
from asaf_fx.passes.split_layers import split_decoder_layers

CALIBRATION = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(3))


def test_pruned_graph_equals_the_model_with_those_channels_zeroed(captured, tiny_models, tiny_ids, h):
    gm = captured("mistral")
    keeps = [torch.tensor([0, 5, 7, 100, 159]), None]
    PassManager([PruneMlpChannels([None if k is None else MlpPruning(k) for k in keeps])])(gm)
    mlps = find_swiglus(gm)
    assert gm.get_parameter(mlps[0].down.args[1].target).shape == (96, 5)
    assert gm.get_parameter(mlps[0].gate.args[1].target).shape == (5, 96)
    assert gm.get_parameter(mlps[1].up.args[1].target).shape == (160, 96)
    masked = h.make_tiny("mistral")
    with torch.no_grad():
        gate = masked.model.layers[0].mlp.gate_proj.weight
        dropped = torch.ones(160, dtype=torch.bool)
        dropped[keeps[0]] = False
        gate[dropped] = 0  # silu(0) = 0: the channel contributes nothing
    assert h.rel_err(run_graph(gm, tiny_ids), masked(tiny_ids).logits) < 1e-5
    assert gm.meta["asaf_fx"]["mlp_widths"] == [{"width": 160, "kept": 5}, {"width": 160, "kept": 160}]


def test_prune_pass_checks_its_inputs(captured):
    gm = captured("llama")
    with pytest.raises(PatternError, match="2 SwiGLU MLPs but 1 prunings"):
        PruneMlpChannels([None])(gm)
    bad = MlpPruning(torch.arange(10), down_weight=torch.zeros(96, 9))
    with pytest.raises(ValueError, match="refitted down_proj weight has shape"):
        PruneMlpChannels([bad, None])(gm)


def test_selection_removes_whole_blocks_of_the_least_important_channels(captured):
    gm = captured("qwen2")
    flops = layer_linear_flops(gm)
    assert flops == [2 * (96 * 96 * 2 + 96 * 48 * 2 + 3 * 96 * 160)] * 2
    runner = LayerwiseRunner(split_decoder_layers(gm))
    states = [runner.start_tokens(CALIBRATION)]
    prunings = select_mlp_channels(runner, states, [0.2, 0.0], granularity=16, refit=True)
    assert prunings[1] is None
    keep = prunings[0].keep
    # 20% of the layer's FLOPs is 51.2 channels: rounded to 3 blocks of 16.
    assert len(keep) == 160 - 48 and torch.equal(keep, torch.sort(keep).values)
    assert prunings[0].down_weight.shape == (96, 112)


def test_refit_lowers_the_error_on_calibration_data(tiny_models, h):
    model = tiny_models["llama"]
    ref = model(CALIBRATION).logits
    plan = asaf_fx.uniform_plan(2, 0.25)
    errors = {}
    for refit in (False, True):
        cm = asaf_fx.compile(model, plan, calibration=CALIBRATION,
                             prune=asaf_fx.PruneConfig(granularity=16, refit=refit))
        errors[refit] = h.rel_err(cm(CALIBRATION).logits, ref)
    assert 0 < errors[True] < errors[False]


def test_compiled_plan_removes_its_flops_and_bytes(tiny_models, tiny_ids):
    model = tiny_models["llama"]
    dense = asaf_fx.compile(model)
    plan = asaf_fx.uniform_plan(2, 0.2)
    cm = asaf_fx.compile(model, plan, calibration=CALIBRATION, max_cache_len=32)
    before, after = model_totals(dense), model_totals(cm)
    assert after["dense_flops"] == before["flops"]
    # granularity 32: 64 of 160 channels per layer, 2·3·96·64 FLOPs each → 25% of the layer
    assert after["flops"] == pytest.approx(before["flops"] * 0.75)
    assert after["weight_bytes"] == pytest.approx(before["weight_bytes"] * 0.75)
    assert [round(i.sparsity, 4) for i in layers(cm.graph) if i.name.isdigit()] == [0.25, 0.25]
    # the decode graph has the same pruned weights (shared), so greedy decoding agrees with the forward graph
    out = cm.generate(tiny_ids[:1, :4], max_new_tokens=4)
    for step in range(4, 8):
        assert cm(out[:, :step]).logits[0, -1].argmax() == out[0, step]


def test_plan_errors(tiny_models):
    model = tiny_models["llama"]
    with pytest.raises(ValueError, match="covers 3 decoder layers but the model has 2"):
        asaf_fx.compile(model, asaf_fx.uniform_plan(3, 0.1), calibration=CALIBRATION)
    with pytest.raises(ValueError, match="needs calibration data"):
        asaf_fx.compile(model, asaf_fx.uniform_plan(2, 0.1))
    with pytest.raises(ValueError, match="at granularity 32 at most 128 can go"):
        asaf_fx.compile(model, asaf_fx.uniform_plan(2, 0.95), calibration=CALIBRATION)
    with pytest.raises(TypeError, match="plan must be an asaf_fx.Plan"):
        asaf_fx.compile(model, {"groups": []})
