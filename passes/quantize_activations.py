"""Quantize the input of every decoder-layer linear per token (simulated: quantize, then dequantize).

Preserves: nothing exactly — each row x of a linear's input becomes ``q · scale`` with
``q, scale = torch.ops.asaf_fx.quantize_per_token(x, bits, clip_ratio)``, the same rule the W4A4 /
W4A8 GEMMs apply, so accuracy measured here is what the integer kernels will deliver. lm_head
keeps 16-bit inputs: linears after the residual stream's last add (the epilogue) are left alone.
Run after the rotation passes, so that the rotated (outlier-free) values are what gets quantized.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule

import asaf_fx.ops  # noqa: F401  registers torch.ops.asaf_fx.quantize_per_token
from asaf_fx.passes.graph_utils import aten, is_op
from asaf_fx.passes.infra import META_KEY, PassResult, PatternError
from asaf_fx.passes.split_layers import residual_chain

QUANTIZE = torch.ops.asaf_fx.quantize_per_token.default


class QuantizeActivations:
    """Per-token symmetric ``bits``-bit inputs (with ``clip_ratio``) for every decoder linear."""

    name = "quantize_activations"

    def __init__(self, bits: int, clip_ratio: float = 1.0) -> None:
        if bits not in (4, 8):
            raise ValueError(f"activation bits must be 4 or 8 to quantize (16 means: skip this pass), got {bits}")
        if not 0.0 < clip_ratio <= 1.0:
            raise ValueError(f"clip_ratio must lie in (0, 1], got {clip_ratio}")
        self.bits, self.clip_ratio = bits, clip_ratio

    def __call__(self, gm: GraphModule) -> PassResult:
        chain = residual_chain(gm)
        if not chain:
            raise PatternError("quantize_activations: no residual adds, so no decoder layers to quantize")
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        last_add = order[chain[-1]]
        linears = [n for n in gm.graph.nodes if is_op(n, aten.linear) and order[n] < last_add]
        if not linears:
            raise PatternError("quantize_activations: no linear inside the decoder layers")
        for linear in linears:
            x = linear.args[0]
            with gm.graph.inserting_before(linear):
                quantized = gm.graph.call_function(QUANTIZE, (x, self.bits, self.clip_ratio))
                codes = gm.graph.call_function(operator.getitem, (quantized, 0))
                scale = gm.graph.call_function(operator.getitem, (quantized, 1))
                wide = gm.graph.call_function(aten.unsqueeze.default, (scale, -1))
                values = gm.graph.call_function(aten.mul.Tensor, (codes, wide))
                restored = gm.graph.call_function(aten._to_copy.default, (values,), {"dtype": x.meta["val"].dtype})
            for node in (quantized, codes, scale, wide, values, restored):
                node.meta["nn_module_stack"] = linear.meta.get("nn_module_stack", {})
                node.meta["asaf_fx"] = {"activation_bits": self.bits}
            linear.replace_input_with(x, restored)
        gm.meta.setdefault(META_KEY, {}).setdefault("activations", []).append(
            {"pass": self.name, "bits": self.bits, "clip_ratio": self.clip_ratio, "linears": len(linears)})
        return PassResult(gm, True)
