"""Replace each decoder-layer linear by the kernel that runs it at its bit widths.

For every ``aten.linear`` inside the decoder layers (graph order; lm_head stays as it is), given
its :class:`LinearLowering`:

* 4-bit weight, 16-bit input → ``w4a16_linear(x, packed, scales, bias, group_size)``;
* 4-bit weight, 4/8-bit input → ``quantize_per_token(x)`` then ``w4a_int_linear`` on the codes;
  when x is an online ``hadamard_rotate`` read by nothing else, the rotation and the quantization
  fuse into one ``hadamard_rotate_quantize``. Linears reading the same x (q/k/v, gate/up) share
  one quantization;
* 8- or 16-bit weight: the weight stays a float tensor (8-bit: its dequantized values — there is
  no W8 kernel), and a 4/8-bit input is quantized and dequantized in the graph, the same
  ``quantize_per_token`` rule the integer GEMMs apply.

Preserves: the simulated quantized model exactly up to float rounding: ``w4a_int_linear`` on
``quantize_per_token`` codes computes what the dequantized weights times the dequantized
activations compute. The packed tensors are bound as given, so two graphs lowered with the same
lowerings share their memory.
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

    def __call__(self, gm: GraphModule) -> PassResult:
        linears = [n for layer in decoder_linears(gm) for n in layer]
        if len(linears) != len(self.lowerings):
            raise PatternError(f"lower_linears: {len(linears)} decoder linears in the graph, "
                               f"{len(self.lowerings)} lowerings given")
        quantized: dict[tuple, tuple[Node, Node]] = {}  # (input, bits, clip) -> (codes, scale)
        before = gm.graph.find_nodes(op="placeholder")[-1].next
        for index, (linear, low) in enumerate(zip(linears, self.lowerings, strict=True)):
            weight_node, x = linear.args[1], linear.args[0]
            shape = tuple(get_tensor(gm, weight_node).shape)
            if low.weight is not None and tuple(low.weight.codes.shape) != shape:
                raise PatternError(f"lower_linears: linear {index} has weight {shape}, its lowering "
                                   f"{tuple(low.weight.codes.shape)}", linear)
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
            prefix = weight_node.target.replace(".", "_")
            packed = add_constant(gm, f"{prefix}_int4", low.packed, before)
            scales = add_constant(gm, f"{prefix}_scales", low.weight.scales, before)
            bias = linear_bias(linear)
            group = low.weight.group_size
            if low.a_bits < 16:
                codes, scale = self._quantize(gm, quantized, x, low, linear)
                call = (ops.w4a_int_linear.default, (codes, scale, packed, scales, bias, group, dtype, low.a_bits))
            else:
                call = (ops.w4a16_linear.default, (x, packed, scales, bias, group, dtype))
            with gm.graph.inserting_before(linear):
                new = gm.graph.call_function(*call)
            new.meta["val"] = linear.meta.get("val")
            _tag((new,), linear, {"w_bits": 4, "a_bits": low.a_bits, "group_size": group, "weight": weight_node.target})
            linear.replace_all_uses_with(new)
            gm.graph.erase_node(linear)
        drop_dead_tensors(gm)  # the float weights the packed ones replaced
        gm.meta.setdefault(META_KEY, {})["lowered"] = {
            "linears": len(linears), "int4": sum(low.packed is not None for low in self.lowerings)}
        return PassResult(gm, True)

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
