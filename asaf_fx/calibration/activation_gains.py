"""Which decoder layers get 8-bit activations: each layer's measured gain, and the choice.

At W4A4 a small model loses most of its accuracy to the 4-bit activations, and not evenly: on
SmolLM2-135M one layer's inputs at 8 bits lower the perplexity by 0–8 % depending on the layer
(docs/results.md, "Which layers carry the 4-bit activation loss"). :func:`measure_activation_gains`
measures, for every layer l, ξ_l: the relative perplexity change (negative: the improvement) of the
rotated-quantized model when the inputs of l's linears are quantized to 8 bits instead, on held-out
calibration windows — the same
quantity, meter and windows as the sparsity table's ξ. The variant of a layer is its lowered
graph with the activation quantizers at other bits (``passes/quantize/activation_bits.py``); its weights
are the base model's, which is what ``compile`` builds, since GPTQ fits weights on unquantized
activations. :meth:`ActivationGains.choose` then pins the ``count`` layers with the most negative
ξ (those that help at all) to 8 bits in a QuantConfig.

Single-layer gains are not additive (eight layers together give less than the sum of their eight
gains), so the choice ranks layers rather than predicting the mixed model's perplexity: measure it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from asaf_fx.calibration.measure import DegradationMeter
from asaf_fx.calibration.variants import build_calibration_model
from asaf_fx.compile import calibration_batches
from asaf_fx.config import QuantConfig
from asaf_fx.passes.quantize.activation_bits import with_activation_bits
from asaf_fx.passes.quantize.quantize_weights import linear_weight_targets

BITS = 8  # what a chosen layer's inputs are raised to (16 would also drop the integer GEMM)


@dataclass(frozen=True)
class ActivationGains:
    """ξ of each decoder layer with its linears' inputs at 8 bits (negative: the model improves).

    Attributes:
        gains: ξ per layer, the relative perplexity change (the sign matters: a KL to the base
            model could not tell a layer that helps from one that hurts).
        linears: the weight names of each layer's linears (what a QuantConfig override names).
    """

    gains: list[float]
    linears: list[list[str]]

    def choose(self, quant: QuantConfig, count: int) -> tuple[list[int], QuantConfig]:
        """The (at most) ``count`` layers with the most negative ξ, ascending, and ``quant`` with
        the 4-bit inputs of those layers at 8 bits (pinned, keeping the other settings; a 16-bit
        input stays 16-bit, as in the measured variant). Layers whose ξ is not negative are never
        chosen: their measured gain is nothing or noise."""
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= len(self.gains):
            raise ValueError(f"count={count!r}: choose between 0 and {len(self.gains)} layers")
        ranked = sorted(range(len(self.gains)), key=lambda layer: (self.gains[layer], layer))
        layers = sorted([layer for layer in ranked if self.gains[layer] < 0][:count])
        raised = [name for layer in layers for name in self.linears[layer] if quant.for_linear(name).a_bits < BITS]
        return layers, quant.pin({name: {"a_bits": BITS} for name in raised})

    def to_dict(self) -> dict[str, Any]:
        return {"bits": BITS, "gains": list(self.gains), "linears": [list(n) for n in self.linears]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ActivationGains:
        if data.get("bits") != BITS:
            raise ValueError(f"activation gains measured at {data.get('bits')!r} bits; this version raises inputs "
                             f"to {BITS}")
        return cls([float(g) for g in data["gains"]], [list(n) for n in data["linears"]])


def measure_activation_gains(model: torch.nn.Module, quant: QuantConfig, calibration, held_out, *,
                             known: Mapping[int, float] | None = None,
                             on_layer: Callable[[int, float], None] | None = None) -> ActivationGains:
    """Measure every decoder layer's ξ with its linears' inputs at 8 bits (see the module docstring).

    Args:
        model: the float model (left unchanged).
        quant: the base config; some decoder linear's input must be at 4 bits.
        calibration: token ids GPTQ (and an ``a_clip="mse"`` search) are fitted on, as for ``compile``.
        held_out: other token ids, the ξ are measured on; never the evaluation text.
        known: ξ of layers measured before (an interrupted run's progress): not measured again.
        on_layer: called with (layer, ξ) after each measurement (progress).
    """
    if quant.a_bits != 4 and not any(s.get("a_bits") == 4 for s in quant.overrides.values()):
        raise ValueError(f"no decoder linear's input is at 4 bits in this QuantConfig (a_bits={quant.a_bits}): "
                         "there is nothing to raise to 8 bits; use e.g. a_bits=4")
    cal = build_calibration_model(model, quant, calibration, sparsities=())
    runner = cal.runner
    linears = [linear_weight_targets(runner, layer) for layer in range(runner.num_layers)]
    meter = DegradationMeter(cal, calibration_batches(held_out, getattr(model.config, "max_position_embeddings", None)),
                             "ppl")
    known = dict(known or {})
    gains = []
    for layer in range(runner.num_layers):
        if layer in known:
            gains.append(float(known[layer]))
            continue
        raised = with_activation_bits(runner.layer_module(layer), BITS)

        def run_layer(index, state, raised=raised, layer=layer):
            call = (lambda _, args: raised(*args)) if index == layer else None
            return runner.run_layer(index, state, call=call)

        gains.append(meter.degradation(layer, run_layer))
        if on_layer is not None:
            on_layer(layer, gains[-1])
    return ActivationGains(gains, linears)

