"""Replace each decoder-layer linear by the kernel that runs it at its bit widths.

For every ``aten.linear`` inside the decoder layers (graph order; lm_head stays as it is), given
its :class:`LinearLowering`:

* 4-bit weight, 16-bit input → ``w4a16_linear(x, packed, scales, bias, group_size)``;
* 4-bit weight, 4/8-bit input → ``quantize_per_token(x)`` then ``w4a_int_linear`` on the codes;
  when x is an online ``hadamard_rotate`` read by nothing else, the rotation and the quantization
  fuse into one ``hadamard_rotate_quantize``. Linears reading the same x (q/k/v, gate/up) share
  one quantization;
* 4-bit linears that read the same x with the same settings (q/k/v, gate/up) become one kernel
  call on their weights stacked by output channel, each reading its slice of the output: one
  launch instead of three or two, and a weight stream long enough to keep a GPU's memory busy
  in decode;
* 8- or 16-bit weight: the weight stays a float tensor (8-bit: its dequantized values — there is
  no W8 kernel), and a 4/8-bit input is quantized and dequantized in the graph, the same
  ``quantize_per_token`` rule the integer GEMMs apply.

Preserves: the simulated quantized model exactly up to float rounding: ``w4a_int_linear`` on
``quantize_per_token`` codes computes what the dequantized weights times the dequantized
activations compute, and every output channel of a stacked call is the one its own call computes
(integer sums are exact in any order). Unstacked packed tensors are bound as given and stacked ones
are built once per pass object, so two graphs lowered by one ``LowerLinears`` share their memory.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

import asaf_fx.triton_kernels.ops  # noqa: F401  registers the kernel ops
from asaf_fx.passes.graph_utils import (
    add_constant,
    data_users,
    drop_dead_tensors,
    get_tensor,
    is_op,
    linear_bias,
    set_tensor,
)
from asaf_fx.passes.infra import META_KEY, PassResult, PatternError
from asaf_fx.passes.quantize.rtn import QuantizedWeight
from asaf_fx.passes.split_layers import decoder_linears

ops = torch.ops.asaf_fx


@dataclass(frozen=True)
class LinearLowering:
    """How one linear runs: its quantized weight (None: unchanged float) and its input bits."""

    weight: QuantizedWeight | None = None
    packed: torch.Tensor | None = None  # pack_int4(weight.codes) for 4-bit weights, made once
    a_bits: int = 16
    a_clip: float = 1.0

    @classmethod
    def make(cls, weight: QuantizedWeight | None, a_bits: int = 16, a_clip: float = 1.0) -> LinearLowering:
        packed = ops.pack_int4(weight.codes) if weight is not None and weight.bits == 4 else None
        return cls(weight, packed, a_bits, a_clip)


def _tag(nodes: Sequence[Node], like: Node, info: dict) -> None:
    for node in nodes:
        node.meta["nn_module_stack"] = like.meta.get("nn_module_stack", {})
        node.meta["asaf_fx"] = dict(info)


class LowerLinears:
    name = "lower_linears"

    def __init__(self, lowerings: Sequence[LinearLowering]) -> None:
        self.lowerings = list(lowerings)
        self._stacked: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, gm: GraphModule) -> PassResult:
        linears = [n for layer in decoder_linears(gm) for n in layer]
        if len(linears) != len(self.lowerings):
            raise PatternError(f"lower_linears: {len(linears)} decoder linears in the graph, "
                               f"{len(self.lowerings)} lowerings given")
        for index, (linear, low) in enumerate(zip(linears, self.lowerings, strict=True)):
            shape = tuple(get_tensor(gm, linear.args[1]).shape)
            if low.weight is not None and tuple(low.weight.codes.shape) != shape:
                raise PatternError(f"lower_linears: linear {index} has weight {shape}, its lowering "
                                   f"{tuple(low.weight.codes.shape)}", linear)
        quantized: dict[tuple, tuple[Node, Node]] = {}  # (input, bits, clip) -> (codes, scale)
        before = gm.graph.find_nodes(op="placeholder")[-1].next
        for group in self._stacks(linears):
            linear, low = linears[group[0]], self.lowerings[group[0]]
            weight_node, x = linear.args[1], linear.args[0]
            dtype = x.meta["val"].dtype
            if low.packed is None:
                if low.weight is not None:
                    set_tensor(gm, weight_node.target, low.weight.dequantize(get_tensor(gm, weight_node).dtype))
                if low.a_bits < 16:
                    codes, scale = self._quantize(gm, quantized, x, low, linear)
                    with gm.graph.inserting_before(linear):
                        wide = gm.graph.call_function(torch.ops.aten.unsqueeze.default, (scale, -1))
                        values = gm.graph.call_function(torch.ops.aten.mul.Tensor, (codes, wide))
                        restored = gm.graph.call_function(torch.ops.aten._to_copy.default, (values,), {"dtype": dtype})
                    _tag((wide, values, restored), linear, {"activation_bits": low.a_bits})
                    linear.replace_input_with(x, restored)
                continue
            prefix = weight_node.target.replace(".", "_") + (f"_stack{len(group)}" if len(group) > 1 else "")
            packed_t, scales_t = self._weights(group)
            packed = add_constant(gm, f"{prefix}_int4", packed_t, before)
            scales = add_constant(gm, f"{prefix}_scales", scales_t, before)
            bias = linear_bias(linear) if len(group) == 1 else self._stacked_bias(gm, [linears[i] for i in group],
                                                                                 prefix, before)
            groupsize = low.weight.group_size
            if low.a_bits < 16:
                codes, scale = self._quantize(gm, quantized, x, low, linear)
                call = (ops.w4a_int_linear.default, (codes, scale, packed, scales, bias, groupsize, dtype, low.a_bits))
            else:
                call = (ops.w4a16_linear.default, (x, packed, scales, bias, groupsize, dtype))
            with gm.graph.inserting_before(linear):
                new = gm.graph.call_function(*call)
            names = [linears[i].args[1].target for i in group]
            info = {"w_bits": 4, "a_bits": low.a_bits, "group_size": groupsize, "weight": names[0]}
            _tag((new,), linear, info | ({"stacked_weights": names} if len(group) > 1 else {}))
            if len(group) == 1:
                new.meta["val"] = linear.meta.get("val")
                linear.replace_all_uses_with(new)
                gm.graph.erase_node(linear)
                continue
            start = 0
            for i in group:
                member, width = linears[i], self.lowerings[i].packed.shape[0]
                with gm.graph.inserting_before(member):
                    part = gm.graph.call_function(torch.ops.aten.slice.Tensor, (new, -1, start, start + width))
                part.meta["val"] = member.meta.get("val")
                _tag((part,), member, {"stack_slice": member.args[1].target})
                member.replace_all_uses_with(part)
                gm.graph.erase_node(member)
                start += width
        drop_dead_tensors(gm)  # the float weights the packed ones replaced
        gm.meta.setdefault(META_KEY, {})["lowered"] = {
            "linears": len(linears), "int4": sum(low.packed is not None for low in self.lowerings)}
        return PassResult(gm, True)

    def _stacks(self, linears: Sequence[Node]) -> list[list[int]]:
        """Indices of the linears, grouped: 4-bit linears that read the same node with the same
        input bits, clip, scale groups and bias presence share one call; all others stand alone.
        Groups are listed at their first member, so each call goes where its first linear was."""
        groups: dict[tuple, list[int]] = {}
        out = []
        for index, (linear, low) in enumerate(zip(linears, self.lowerings, strict=True)):
            if low.packed is None:
                out.append([index])
                continue
            key = (linear.args[0], low.a_bits, low.a_clip if low.a_bits < 16 else None, low.weight.group_size,
                   linear_bias(linear) is not None)
            if key in groups:
                groups[key].append(index)
            else:
                groups[key] = [index]
                out.append(groups[key])
        return out

    def _weights(self, group: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed codes and scales of ``group`` stacked by output channel (the lowering's own
        tensors for one linear), built once however many graphs this pass lowers."""
        key = tuple(group)
        if key not in self._stacked:
            lows = [self.lowerings[i] for i in group]
            if len(lows) == 1:
                self._stacked[key] = (lows[0].packed, lows[0].weight.scales)
            else:
                self._stacked[key] = (torch.cat([low.packed for low in lows]),
                                      torch.cat([low.weight.scales for low in lows]))
        return self._stacked[key]

    @staticmethod
    def _stacked_bias(gm: GraphModule, members: Sequence[Node], prefix: str, before: Node) -> Node | None:
        biases = [linear_bias(m) for m in members]
        if biases[0] is None:
            return None
        return add_constant(gm, f"{prefix}_bias", torch.cat([get_tensor(gm, b) for b in biases]), before)

    @staticmethod
    def _quantize(gm: GraphModule, cache: dict, x: Node, low: LinearLowering, linear: Node) -> tuple[Node, Node]:
        key = (x, low.a_bits, low.a_clip)
        if key not in cache:
            fuse = is_op(x, ops.hadamard_rotate) and len(data_users(x)) == 1
            with gm.graph.inserting_before(linear):
                if fuse:
                    quant = gm.graph.call_function(
                        ops.hadamard_rotate_quantize.default, (*x.args, low.a_bits, low.a_clip)
                    )
                else:
                    quant = gm.graph.call_function(ops.quantize_per_token.default, (x, low.a_bits, low.a_clip))
                codes = gm.graph.call_function(operator.getitem, (quant, 0))
                scale = gm.graph.call_function(operator.getitem, (quant, 1))
            _tag((quant, codes, scale), linear, {"activation_bits": low.a_bits, "fused_rotation": fuse})
            cache[key] = (codes, scale)
        return cache[key]
