"""What calibration measures: pruned variants of one layer equal compile with a plan pruning that
layer, and ξ is computed from the logits as its docstring says."""

import math

import pytest
import torch
import torch.nn.functional as F

import asaf_fx
from asaf_fx.calibration.measure import DegradationMeter
from asaf_fx.calibration.variants import build_calibration_model
from asaf_fx.plan import Group, Plan

CALIBRATION = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(3))
SPARSITIES = (0.1, 0.2)  # granularity 32 on the tiny MLP (160): 32 and 64 channels


def one_layer_plan(num_layers: int, layer: int, sparsity: float) -> Plan:
    groups = [Group(i, i + 1, sparsity if i == layer else 0.0) for i in range(num_layers)]
    return Plan(tuple(groups), flops=1.0, dense_flops=1.0, predicted_degradation=0.0, max_degradation=0.01,
                method="test")


def run_with(cal, ids, assignment):
    runner = cal.runner
    state = runner.start_tokens(ids)
    for layer in range(runner.num_layers):
        state = runner.run_layer(layer, state, replace=cal.variant(layer, assignment[layer]) if layer in assignment
                                 else None)
    return runner.finish(state)


# RTN: nothing downstream depends on data, so any layer matches. GPTQ: the last layer only (compile
# re-calibrates the layers after a pruned one on its outputs; the table measures the base's).
# Calibration runs simulated kernels: equal up to float rounding, which can flip an activation
# code now and then (seen with GPTQ weights at A8: 3e-3), hence A16 with GPTQ here.
@pytest.mark.parametrize("quant,layer,refit", [
    (asaf_fx.QuantConfig(), 0, True),
    (asaf_fx.QuantConfig(), 0, False),
    (asaf_fx.QuantConfig(w_bits=4, a_bits=4, kv_bits=4, w_method="rtn", a_clip=0.9), 0, True),
    (asaf_fx.QuantConfig(w_bits=4, a_bits=16, kv_bits=8, w_method="gptq"), 1, True),
], ids=["rotation-only", "rotation-only-no-refit", "w4a4kv4-rtn", "w4a16kv8-gptq"])
def test_variant_equals_compile_with_a_plan_pruning_that_layer(tiny_models, tiny_ids, h, quant, layer, refit):
    model = tiny_models["llama"]
    cal = build_calibration_model(model, quant, CALIBRATION, SPARSITIES, granularity=32, refit=refit)
    assert cal.removed == [[32, 64], [32, 64]]
    base = asaf_fx.compile(model, quant=quant, calibration=CALIBRATION)
    assert h.rel_err(run_with(cal, tiny_ids, {}), base(tiny_ids).logits) < 1e-3
    pruned = asaf_fx.compile(model, one_layer_plan(2, layer, SPARSITIES[1]), quant=quant, calibration=CALIBRATION,
                             prune=asaf_fx.PruneConfig(granularity=32, refit=refit))
    got = run_with(cal, tiny_ids, {layer: 1})
    assert h.rel_err(got, pruned(tiny_ids).logits) < 1e-3
    assert h.rel_err(got, base(tiny_ids).logits) > 1e-2  # the variant really changed something


def _nll(logits, ids):
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))


@pytest.mark.parametrize("metric", ["ppl", "kl"])
def test_meter_computes_the_metric_from_the_pruned_logits(tiny_models, metric):
    model = tiny_models["qwen2"]
    quant = asaf_fx.QuantConfig(w_bits=4, a_bits=4, kv_bits=4, w_method="rtn")
    cal = build_calibration_model(model, quant, CALIBRATION, SPARSITIES, granularity=32)
    batches = list(CALIBRATION.split(4))
    meter = DegradationMeter(cal, batches, metric)
    assert meter({}) == 0.0
    assignment = {0: 0, 1: 1}
    value = meter(assignment)
    assert meter.layer_forwards == 2 * len(batches)  # starts at layer 0: two layers per batch
    meter({1: 0})
    assert meter.layer_forwards == 3 * len(batches)  # starts at layer 1: the cached input is reused
    base = [run_with(cal, b, {}) for b in batches]
    pruned = [run_with(cal, b, assignment) for b in batches]
    tokens = sum(b[:, 1:].numel() for b in batches)
    if metric == "ppl":
        nll = sum(_nll(p, b) - _nll(q, b) for p, q, b in zip(pruned, base, batches))
        expected = math.expm1(nll / tokens)
    else:
        expected = sum(float(F.kl_div(F.log_softmax(p[:, :-1], -1), F.log_softmax(q[:, :-1], -1), log_target=True,
                                      reduction="sum")) for p, q in zip(pruned, base)) / tokens
        assert expected > 0
    assert abs(value) > 1e-6  # something was pruned, so the comparison below means something
    assert value == pytest.approx(expected, rel=1e-3, abs=1e-8)


def test_unknown_metric_is_refused(tiny_models):
    cal = build_calibration_model(tiny_models["llama"], asaf_fx.QuantConfig(), CALIBRATION, SPARSITIES)
    with pytest.raises(ValueError, match="unknown degradation metric 'mse'"):
        DegradationMeter(cal, [CALIBRATION], "mse")


def test_block_errors_match_the_spread_of_independent_blocks():
    from asaf_fx.calibration.measure import BLOCK_TOKENS, block_sums, mean_stderr

    # 64 rows of 3 blocks each (the last one short) of i.i.d. values: the error of their mean is
    # σ/√T; the batch-means estimate over 192 blocks lands within a few percent of it.
    values = torch.randn(64, 2 * BLOCK_TOKENS + 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sums, sizes = block_sums(values)
    assert sums.shape == (192,) and sizes.tolist()[:3] == [BLOCK_TOKENS, BLOCK_TOKENS, 50]
    assert float(sums.sum()) == pytest.approx(float(values.sum()))
    assert mean_stderr(sums, sizes) == pytest.approx(1 / math.sqrt(values.numel()), rel=0.15)
    assert math.isnan(mean_stderr(sums[:1], sizes[:1]))  # one block says nothing about the spread


@pytest.mark.parametrize("metric", ["ppl", "kl"])
def test_meter_reports_the_standard_error_of_the_paired_differences(tiny_models, metric):
    model = tiny_models["qwen2"]
    cal = build_calibration_model(model, asaf_fx.QuantConfig(w_bits=4, a_bits=4, kv_bits=4, w_method="rtn"),
                                  CALIBRATION, SPARSITIES, granularity=32)
    batches = list(CALIBRATION.split(4))
    meter = DegradationMeter(cal, batches, metric)
    value, stderr = meter.measure({0: 1})
    assert value == meter({0: 1})
    # 23 predicted tokens per row: one block per window, 8 windows; the error of their mean
    per_window = []
    for batch in batches:
        base, pruned = run_with(cal, batch, {})[:, :-1], run_with(cal, batch, {0: 1})[:, :-1]
        if metric == "ppl":
            diff = (F.cross_entropy(pruned.transpose(1, 2), batch[:, 1:], reduction="none")
                    - F.cross_entropy(base.transpose(1, 2), batch[:, 1:], reduction="none"))
        else:
            diff = F.kl_div(F.log_softmax(pruned, -1), F.log_softmax(base, -1), log_target=True,
                            reduction="none").sum(-1)
        per_window += diff.double().mean(-1).tolist()
    expected = torch.tensor(per_window).std().item() / math.sqrt(len(per_window))
    scale = math.exp(math.log1p(value)) if metric == "ppl" else 1.0
    assert stderr > 0 and stderr == pytest.approx(scale * expected, rel=1e-3)
