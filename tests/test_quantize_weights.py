"""Layer-by-layer weight quantization of a split graph."""

from __future__ import annotations

import pytest
import torch

from asaf_fx.passes.capture import graph_inputs, run_graph
from asaf_fx.passes.layerwise import LayerwiseRunner
from asaf_fx.passes.quantize.quantize_weights import LinearQuant, linear_weight_targets, quantize_layer_weights
from asaf_fx.passes.split_layers import split_decoder_layers


def quantized_logits(captured, arch, spec, calibration, ids):
    runner = LayerwiseRunner(split_decoder_layers(captured(arch)))
    states = [runner.start_tokens(batch) for batch in calibration]
    results = quantize_layer_weights(runner, states, spec)
    return runner.run(*graph_inputs(runner.split.source, ids)), results, runner


def calibration_batches(count=4):
    return [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(10 + s)) for s in range(count)]


def test_every_decoder_linear_is_quantized_and_lm_head_is_not(captured):
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    _, results, runner = quantized_logits(
        captured, "qwen2", LinearQuant(w_bits=4, w_method="rtn"), calibration_batches(1), ids
    )
    expected = [t for layer in range(runner.num_layers) for t in linear_weight_targets(runner, layer)]
    assert sorted(results) == sorted(expected) and len(expected) == 7 * runner.num_layers
    module = runner.split.module
    for target, q in results.items():
        assert torch.equal(module.get_parameter(target), q.dequantize())
        assert int(q.codes.abs().max()) <= 8
    assert not any("lm_head" in t for t in results)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gptq_beats_rtn_and_8_bits_are_nearly_lossless(arch, captured, tiny_ids):
    reference = run_graph(captured(arch), tiny_ids)
    calibration = calibration_batches()

    def error(spec):
        logits, _, _ = quantized_logits(captured, arch, spec, calibration, tiny_ids)
        return float(((logits - reference) ** 2).mean() / (reference**2).mean())

    rtn4 = error(LinearQuant(w_bits=4, w_method="rtn"))
    gptq4 = error(LinearQuant(w_bits=4, w_method="gptq"))
    rtn8 = error(LinearQuant(w_bits=8, w_method="rtn"))
    assert gptq4 < rtn4
    assert rtn8 < 1e-3 * rtn4 * 10 and rtn8 < 1e-3


def test_bad_spec():
    with pytest.raises(ValueError, match="weight bits must be one of"):
        LinearQuant(w_bits=3)
    with pytest.raises(ValueError, match="weight method must be one of"):
        LinearQuant(w_method="awq")


def test_a_registered_weight_method_is_used_by_name():
    from asaf_fx.passes.quantize import quantize_weights as qw
    from asaf_fx.passes.quantize.rtn import QuantizedWeight

    calls = []

    @qw.register_weight_method("zeros-for-test", needs_hessian=False)
    def zeros(weight, hessian, q):
        calls.append((tuple(weight.shape), hessian, q.w_bits))
        return QuantizedWeight(torch.zeros_like(weight, dtype=torch.int8), torch.ones(weight.shape[0], 1), q.w_bits,
                               weight.shape[1])

    try:
        q = LinearQuant(w_bits=4, w_method="zeros-for-test").quantize_weight(torch.randn(3, 5))
        assert calls == [((3, 5), None, 4)] and not q.codes.any()
        with pytest.raises(ValueError, match="needs the input Hessian"):
            LinearQuant(w_bits=4, w_method="gptq").quantize_weight(torch.randn(3, 5))
    finally:
        del qw.WEIGHT_METHODS["zeros-for-test"]
