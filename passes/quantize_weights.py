"""Quantize every decoder-layer linear weight, one layer at a time, GPTQ-style sequential.

For layer 0, 1, …: gather the layer's input statistics on the calibration states (which already
went through the quantized earlier layers), quantize each of its linear weights (GPTQ with those
statistics, or RTN), bind the dequantized weights in the split module, then run the layer with its
new weights to produce the next layer's states. lm_head lies outside the decoder layers and stays
as it is. Returns the integer codes and scales per weight attribute, for packing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from asaf_fx.passes.gptq import quantize_gptq
from asaf_fx.passes.graph_utils import aten, get_tensor, is_op, set_tensor
from asaf_fx.passes.layerwise import LayerwiseRunner, State
from asaf_fx.passes.linear_stats import LinearStats, collect_linear_stats
from asaf_fx.passes.rtn import QuantizedWeight, check_bits, quantize_rtn
from asaf_fx.passes.split_layers import decoder_linears, split_decoder_layers

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
    runner: LayerwiseRunner, states: list[State], spec: WeightQuantSpec | Mapping[str, WeightQuantSpec | None],
    on_stats: Callable[[str, LinearStats], None] | None = None,
    before_layer: Callable[[LayerwiseRunner, int, list[State]], None] | None = None,
) -> dict[str, QuantizedWeight]:
    """Quantize all decoder-layer linears of ``runner``'s module in place (see module docstring).

    ``spec`` applies to every linear, or maps weight attributes to their own spec (None, or
    missing: keep that weight in float). ``on_stats(target, stats)`` sees the input statistics
    of each GPTQ-quantized weight (calibration re-quantizes pruned weights from them).
    ``before_layer(runner, layer, states)`` sees each layer's input states before its weights change
    (the activation clip search runs there, on the same inputs GPTQ sees).
    """
    module = runner.split.module
    spec_of = (lambda _: spec) if isinstance(spec, WeightQuantSpec) else spec.get
    results: dict[str, QuantizedWeight] = {}
    for layer in range(runner.num_layers):
        if before_layer is not None:
            before_layer(runner, layer, states)
        specs = {t: s for t in linear_weight_targets(runner, layer) if (s := spec_of(t)) is not None}
        gptq = any(s.method == "gptq" for s in specs.values())
        stats = collect_linear_stats(runner, layer, states) if gptq else {}
        for target, s in specs.items():
            weight = module.get_parameter(target) if target in dict(module.named_parameters()) else module.get_buffer(target)
            if s.method == "gptq":
                if on_stats is not None:
                    on_stats(target, stats[target])
                q = quantize_gptq(weight.detach(), stats[target].hessian, s.bits, s.group_size,
                                  damp=s.damp, act_order=s.act_order, clip_search=s.clip_search)
            else:
                q = quantize_rtn(weight.detach(), s.bits, s.group_size, clip_search=s.clip_search)
            set_tensor(module, target, q.dequantize(weight.dtype).to(weight.device))
            results[target] = q
        states[:] = [runner.run_layer(layer, state) for state in states]
    return results


def quantize_decoder_weights(
    gm: GraphModule, specs: Sequence[WeightQuantSpec | None], calibration: Sequence[torch.Tensor] = (),
    on_stats: Callable[[str, LinearStats], None] | None = None,
    before_layer: Callable[[LayerwiseRunner, int, list[State]], None] | None = None,
) -> list[QuantizedWeight | None]:
    """Quantized weights of ``gm``'s decoder linears, one ``spec`` each (None: stays float), in
    :func:`decoder_linears` order; ``gm`` itself is untouched.

    GPTQ runs ``gm`` layer by layer on the ``calibration`` batches (token ids); RTN needs none,
    unless ``before_layer(runner, layer, states)`` asks to see every layer's calibration inputs.
    """
    linears = [n for layer in decoder_linears(gm) for n in layer]
    if len(specs) != len(linears):
        raise ValueError(f"{len(specs)} weight specs for {len(linears)} decoder linears")
    if before_layer is None and not any(s is not None and s.method == "gptq" for s in specs):
        return [None if s is None else quantize_rtn(get_tensor(gm, n.args[1]).detach(), s.bits, s.group_size,
                                                    clip_search=s.clip_search) for n, s in zip(linears, specs)]
    if not calibration:
        raise ValueError("GPTQ needs calibration data: pass calibration= (token ids) or use w_method='rtn'")
    runner = LayerwiseRunner(split_decoder_layers(gm))
    states = [runner.start(batch, False) for batch in calibration]
    found = quantize_layer_weights(runner, states, {n.args[1].target: s for n, s in zip(linears, specs)}, on_stats,
                                   before_layer)
    return [found.get(n.args[1].target) for n in linears]
