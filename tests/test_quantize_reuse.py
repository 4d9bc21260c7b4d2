"""Quantized weights reused within a scope: found by content, exact, bounded, and never outside it."""

from __future__ import annotations

import pytest
import torch

import asaf_fx
from asaf_fx.config import QuantConfig
from asaf_fx.passes.quantize import quantize_weights as qw
from asaf_fx.passes.quantize.reuse import reuse_quantized_weights
from asaf_fx.passes.quantize.rtn import QuantizedWeight
from asaf_fx.plan import uniform_plan


@pytest.fixture
def counted():
    calls = []

    @qw.register_weight_method("counted-for-test", needs_hessian=True)
    def method(weight, hessian, q):
        calls.append(1)
        codes = torch.clamp(torch.round(weight @ hessian.to(weight.dtype)), -8, 7).to(torch.int8)
        return QuantizedWeight(codes, torch.ones(weight.shape[0], 1), q.w_bits, weight.shape[1])

    yield qw.LinearQuant(w_bits=4, w_method="counted-for-test"), calls
    del qw.WEIGHT_METHODS["counted-for-test"]


def test_a_weight_is_quantized_once_per_content_within_the_scope(counted):
    spec, calls = counted
    generator = torch.Generator().manual_seed(0)
    weight, hessian = torch.randn(4, 6, generator=generator), torch.randn(6, 6, generator=generator)
    with reuse_quantized_weights() as stats:
        first = spec.quantize_weight(weight, hessian)
        first.codes.zero_()  # the caller owns its copy: the stored result must not change
        again = spec.quantize_weight(weight.clone(), hessian.clone())  # other tensors, same bytes
        assert len(calls) == 1 and (stats.hits, stats.misses) == (1, 1)
        assert torch.equal(again.codes, torch.clamp(torch.round(weight @ hessian), -8, 7).to(torch.int8))
        other = hessian.clone()
        other[0, 0] = torch.nextafter(other[0, 0], torch.tensor(10.0))  # one bit apart
        spec.quantize_weight(weight, other)
        spec.quantize_weight(weight, hessian.to(torch.float64))  # same values, another dtype
        qw.LinearQuant(w_bits=8, w_method="counted-for-test").quantize_weight(weight, hessian)
        assert len(calls) == 4
    spec.quantize_weight(weight, hessian)  # outside the scope nothing is kept
    assert len(calls) == 5


def test_the_store_is_bounded_least_recently_used_first(counted):
    spec, calls = counted
    weights = [torch.full((4, 6), float(k)) for k in range(3)]
    hessian = torch.eye(6)
    with reuse_quantized_weights(max_bytes=2 * (4 * 6 + 4 * 4)):  # two results' codes and scales
        for w in weights:
            spec.quantize_weight(w, hessian)
        spec.quantize_weight(weights[2], hessian)  # kept
        spec.quantize_weight(weights[0], hessian)  # dropped as the oldest: computed again
    assert len(calls) == 4
    with pytest.raises(ValueError, match="max_bytes"):
        with reuse_quantized_weights(max_bytes=-1):
            pass


def test_recompiling_inside_the_scope_reuses_gptq_and_changes_nothing(tiny_models, tiny_ids):
    model = tiny_models["llama"]
    quant = QuantConfig(w_bits=4, a_bits=8, kv_bits=8, w_method="gptq")
    calibration = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(7))
    plan = uniform_plan(model.config.num_hidden_layers, 0.3)
    alone = asaf_fx.compile(model, plan, quant=quant, calibration=calibration)
    with reuse_quantized_weights() as stats:
        asaf_fx.compile(model, quant=quant, calibration=calibration)
        misses = stats.misses
        base = asaf_fx.compile(model, quant=quant, calibration=calibration)
        assert stats.hits == misses and stats.misses == misses  # the second base: every weight found
        pruned = asaf_fx.compile(model, plan, quant=quant, calibration=calibration)
        # Layer 0's attention reads the same inputs in both: its q, k, v and o are found again.
        assert stats.hits >= misses + 4 and stats.misses > misses
    assert torch.equal(pruned(tiny_ids).logits, alone(tiny_ids).logits)
    assert not torch.equal(base(tiny_ids).logits, alone(tiny_ids).logits)
