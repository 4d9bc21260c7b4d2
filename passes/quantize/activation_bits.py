"""A copy of a lowered graph whose per-token activation quantizers use other bits.

Every ``quantize_per_token`` and ``hadamard_rotate_quantize`` node (the quantizers
``lower_linears`` inserts before the decoder linears) gets ``bits`` instead of the value it had;
found by op and by the op schema's ``bits`` argument, nothing else changes. The weights are not
touched: GPTQ fits them on unquantized activations, so a linear's weights are the same whether its
input is quantized to 4 or to 8 bits, and a copy with other activation bits is exactly what
``asaf_fx.compile`` would build with those bits for that part of the model (up to a clip ratio
chosen by ``a_clip="mse"``, which the copy keeps). Calibration uses it to measure what 8-bit inputs
in one decoder layer are worth without compiling the model again.
"""

from __future__ import annotations

import copy

import torch
from torch.fx import GraphModule

import asaf_fx.triton_kernels.ops  # noqa: F401  registers the kernel ops
from asaf_fx.passes.graph_utils import is_op

ops = torch.ops.asaf_fx
QUANTIZERS = (ops.quantize_per_token, ops.hadamard_rotate_quantize)


def with_activation_bits(gm: GraphModule, bits: int) -> GraphModule:
    """``gm`` copied with every activation quantizer at ``bits`` (4 or 8)."""
    if bits not in (4, 8):
        raise ValueError(f"activation bits must be 4 or 8 (16: leave the input unquantized), got {bits!r}")
    graph = copy.deepcopy(gm.graph)
    for node in graph.nodes:
        if is_op(node, *QUANTIZERS):
            index = [a.name for a in node.target._schema.arguments].index("bits")
            node.args = (*node.args[:index], bits, *node.args[index + 1:])
    copied = GraphModule(gm, graph, class_name=type(gm).__name__)
    copied.meta.update(gm.meta)
    return copied
