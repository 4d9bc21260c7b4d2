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

from asaf_fx.passes.graph_utils import aten, get_tensor, is_op, set_tensor
from asaf_fx.passes.layerwise import LayerwiseRunner, State
from asaf_fx.passes.linear_stats import LinearStats, collect_linear_stats
from asaf_fx.passes.quantize.gptq import quantize_gptq
from asaf_fx.passes.quantize.reuse import quantize_reusing
from asaf_fx.passes.quantize.rtn import QuantizedWeight, check_bits, quantize_rtn
from asaf_fx.passes.split_layers import decoder_linears, split_decoder_layers


@dataclass(frozen=True)
class LinearQuant:
    """How one linear is quantized, from the config to the kernel: its weight and its input.

    ``w_bits`` 4, 8 or 16 (16: the weight stays float); ``w_group_size`` None = one scale per output
    channel; ``w_method`` names a quantizer in :data:`WEIGHT_METHODS`; ``w_clip_search`` lets it
    shrink each row's range by MSE. ``a_bits`` 4, 8 or 16 and ``a_clip`` (a ratio, or ``"mse"``:
    chosen on calibration data) describe the per-token quantization of the linear's input.
    ``damp`` and ``act_order`` are GPTQ's options.
    """

    w_bits: int = 16
    a_bits: int = 16
    w_group_size: int | None = None
    a_clip: float | str = 1.0
    w_method: str = "rtn"
    w_clip_search: bool = True
    damp: float = 0.01
    act_order: bool = True

    def __post_init__(self) -> None:
        if self.w_bits != 16:
            check_bits(self.w_bits)
        if self.w_method not in WEIGHT_METHODS:
            raise ValueError(f"weight method must be one of {tuple(WEIGHT_METHODS)}, got {self.w_method!r}")

    @property
    def quantizes_weight(self) -> bool:
        return self.w_bits < 16

    @property
    def needs_hessian(self) -> bool:
        """Whether the weight quantizer reads the layer's input statistics (calibration data)."""
        return self.quantizes_weight and WEIGHT_METHODS[self.w_method].needs_hessian

    def quantize_weight(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> QuantizedWeight:
        """Integer codes and scales of an (out_features, in_features) ``weight``."""
        if not self.quantizes_weight:
            raise ValueError("w_bits=16: this linear's weight is not quantized")
        if self.needs_hessian and hessian is None:
            raise ValueError(f"{self.w_method} needs the input Hessian of the linear (calibration data)")
        method = WEIGHT_METHODS[self.w_method]
        settings = (method.quantize, self.w_bits, self.w_group_size, self.w_clip_search, self.damp, self.act_order)
        return quantize_reusing(settings, weight, hessian, lambda: method.quantize(weight, hessian, self))


@dataclass(frozen=True)
class WeightMethod:
    """A weight quantizer: ``quantize(weight, hessian or None, settings) -> QuantizedWeight``, a
    deterministic function of its arguments (``reuse_quantized_weights`` relies on it)."""

    quantize: Callable[[torch.Tensor, torch.Tensor | None, LinearQuant], QuantizedWeight]
    needs_hessian: bool


WEIGHT_METHODS: dict[str, WeightMethod] = {}


def register_weight_method(name: str, *, needs_hessian: bool):
    """Decorator: make ``w_method=name`` quantize weights with the decorated function."""

    def register(fn: Callable[[torch.Tensor, torch.Tensor | None, LinearQuant], QuantizedWeight]):
        WEIGHT_METHODS[name] = WeightMethod(fn, needs_hessian)
        return fn

    return register


@register_weight_method("rtn", needs_hessian=False)
def _rtn(weight: torch.Tensor, hessian: torch.Tensor | None, q: LinearQuant) -> QuantizedWeight:
    return quantize_rtn(weight, q.w_bits, q.w_group_size, clip_search=q.w_clip_search)


@register_weight_method("gptq", needs_hessian=True)
def _gptq(weight: torch.Tensor, hessian: torch.Tensor | None, q: LinearQuant) -> QuantizedWeight:
    return quantize_gptq(weight, hessian, q.w_bits, q.w_group_size, damp=q.damp, act_order=q.act_order,
                         clip_search=q.w_clip_search)


def linear_weight_targets(runner: LayerwiseRunner, layer: int) -> list[str]:
    """Attributes of the weights of the layer's ``aten.linear`` nodes, in graph order."""
    targets = runner.parameter_targets(layer)
    found = []
    for node in runner.layer_module(layer).graph.nodes:
        if is_op(node, aten.linear) and isinstance(node.args[1], Node) and node.args[1].name in targets:
            found.append(targets[node.args[1].name])
    return found


def quantize_layer_weights(
    runner: LayerwiseRunner, states: list[State], spec: LinearQuant | Mapping[str, LinearQuant | None],
    on_stats: Callable[[str, LinearStats], None] | None = None,
    before_layer: Callable[[LayerwiseRunner, int, list[State]], None] | None = None,
) -> dict[str, QuantizedWeight]:
    """Quantize all decoder-layer linears of ``runner``'s module in place (see module docstring).

    ``spec`` applies to every linear, or maps weight attributes to their own spec (None, missing
    or 16 bits: keep that weight in float). ``on_stats(target, stats)`` sees the input statistics
    of each GPTQ-quantized weight (calibration re-quantizes pruned weights from them).
    ``before_layer(runner, layer, states)`` sees each layer's input states before its weights change
    (the activation clip search runs there, on the same inputs GPTQ sees).
    """
    module = runner.split.module
    spec_of = (lambda _: spec) if isinstance(spec, LinearQuant) else spec.get
    results: dict[str, QuantizedWeight] = {}
    for layer in range(runner.num_layers):
        if before_layer is not None:
            before_layer(runner, layer, states)
        specs = {t: s for t in linear_weight_targets(runner, layer)
                 if (s := spec_of(t)) is not None and s.quantizes_weight}
        needs_stats = any(s.needs_hessian for s in specs.values())
        stats = collect_linear_stats(runner, layer, states) if needs_stats else {}
        for target, s in specs.items():
            weight = (
                module.get_parameter(target) if target in dict(module.named_parameters()) else module.get_buffer(target)
            )
            hessian = None
            if s.needs_hessian:
                if on_stats is not None:
                    on_stats(target, stats[target])
                hessian = stats[target].hessian
            q = s.quantize_weight(weight.detach(), hessian)
            set_tensor(module, target, q.dequantize(weight.dtype).to(weight.device))
            results[target] = q
        states[:] = [runner.run_layer(layer, state) for state in states]
    return results


def quantize_decoder_weights(
    gm: GraphModule, specs: Sequence[LinearQuant | None], calibration: Sequence[torch.Tensor] = (),
    on_stats: Callable[[str, LinearStats], None] | None = None,
    before_layer: Callable[[LayerwiseRunner, int, list[State]], None] | None = None,
) -> list[QuantizedWeight | None]:
    """Quantized weights of ``gm``'s decoder linears, one ``spec`` each (None or 16 bits: stays
    float), in :func:`decoder_linears` order; ``gm`` itself is untouched.

    A quantizer that reads input statistics (GPTQ) runs ``gm`` layer by layer on the
    ``calibration`` batches (token ids); RTN needs none, unless ``before_layer(runner, layer,
    states)`` asks to see every layer's calibration inputs.
    """
    linears = [n for layer in decoder_linears(gm) for n in layer]
    if len(specs) != len(linears):
        raise ValueError(f"{len(specs)} weight specs for {len(linears)} decoder linears")
    if before_layer is None and not any(s is not None and s.needs_hessian for s in specs):
        return [s.quantize_weight(get_tensor(gm, n.args[1]).detach()) if s is not None and s.quantizes_weight else None
                for n, s in zip(linears, specs)]
    if not calibration:
        methods = sorted({s.w_method for s in specs if s is not None and s.needs_hessian})
        raise ValueError(f"{', '.join(m.upper() for m in methods) or 'this setting'} needs calibration data: pass "
                         "calibration= (token ids) or use w_method='rtn'")
    runner = LayerwiseRunner(split_decoder_layers(gm))
    states = [runner.start_tokens(batch) for batch in calibration]
    found = quantize_layer_weights(runner, states, {n.args[1].target: s for n, s in zip(linears, specs)}, on_stats,
                                   before_layer)
    return [found.get(n.args[1].target) for n in linears]
