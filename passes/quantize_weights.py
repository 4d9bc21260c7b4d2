"""Quantize every decoder-layer linear weight, one layer at a time, GPTQ-style sequential.

For layer 0, 1, …: gather the layer's input statistics on the calibration states (which already
went through the quantized earlier layers), quantize each of its linear weights (GPTQ with those
statistics, or RTN), bind the dequantized weights in the split module, then run the layer with its
new weights to produce the next layer's states. lm_head lies outside the decoder layers and stays
as it is. Returns the integer codes and scales per weight attribute, for packing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from asaf_fx.passes.gptq import quantize_gptq
from asaf_fx.passes.graph_utils import aten, is_op, set_tensor
from asaf_fx.passes.layerwise import LayerwiseRunner, State
from asaf_fx.passes.linear_stats import collect_linear_stats
from asaf_fx.passes.rtn import QuantizedWeight, check_bits, quantize_rtn

METHODS = ("rtn", "gptq")


@dataclass(frozen=True)
class WeightQuantSpec:
    """bits 4 or 8; group_size None = per output channel; GPTQ options as in :func:`quantize_gptq`."""

    bits: int = 4
    group_size: int | None = None
    method: str = "gptq"
    damp: float = 0.01
    act_order: bool = True
    clip_search: bool = True

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.method not in METHODS:
            raise ValueError(f"weight method must be one of {METHODS}, got {self.method!r}")


def linear_weight_targets(runner: LayerwiseRunner, layer: int) -> list[str]:
    """Attributes of the weights of the layer's ``aten.linear`` nodes, in graph order."""
    targets = runner.parameter_targets(layer)
    found = []
    for node in runner.layer_module(layer).graph.nodes:
        if is_op(node, aten.linear) and isinstance(node.args[1], Node) and node.args[1].name in targets:
            found.append(targets[node.args[1].name])
    return found


def quantize_layer_weights(
    runner: LayerwiseRunner, states: list[State], spec: WeightQuantSpec
) -> dict[str, QuantizedWeight]:
    """Quantize all decoder-layer linears of ``runner``'s module in place (see module docstring)."""
    module = runner.split.module
    results: dict[str, QuantizedWeight] = {}
    for layer in range(runner.num_layers):
        targets = linear_weight_targets(runner, layer)
        stats = collect_linear_stats(runner, layer, states) if spec.method == "gptq" else {}
        for target in targets:
            weight = module.get_parameter(target) if target in dict(module.named_parameters()) else module.get_buffer(target)
            if spec.method == "gptq":
                q = quantize_gptq(weight.detach(), stats[target].hessian, spec.bits, spec.group_size,
                                  damp=spec.damp, act_order=spec.act_order, clip_search=spec.clip_search)
            else:
                q = quantize_rtn(weight.detach(), spec.bits, spec.group_size, clip_search=spec.clip_search)
            set_tensor(module, target, q.dequantize(weight.dtype).to(weight.device))
            results[target] = q
        states[:] = [runner.run_layer(layer, state) for state in states]
    return results
