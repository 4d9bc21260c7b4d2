"""Quantize keys and values asymmetrically per token and head (simulated: quantize, dequantize).

Preserves: nothing exactly — every (token, head) row of K and V becomes its ``bits``-bit
asymmetric approximation ``q · scale + zero`` (``torch.ops.asaf_fx.kv_quantize`` /
``kv_dequantize``, one group per head by default). Keys are taken after RoPE and after the online
Q/K rotation (run ``rotate_qk`` first: rotated keys quantize far better); values straight out of
v_proj, where the head-wise V/O rotation already acted. In the static-cache decode graph the
quantized values are what gets written into the cache, so the cache holds exactly what a packed
cache would return. (The cache buffers themselves stay in the model's float dtype: the saving in
cache memory needs a cache that stores codes, which this pass does not build.)
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

import asaf_fx.triton_kernels.ops  # noqa: F401  registers the kv ops
from asaf_fx.passes.graph_utils import aten, data_users, is_head_layout, is_op, source_through
from asaf_fx.passes.infra import META_KEY, PassResult, PatternError

KV_QUANTIZE = torch.ops.asaf_fx.kv_quantize.default
KV_DEQUANTIZE = torch.ops.asaf_fx.kv_dequantize.default


def _fake_quantize(gm: GraphModule, value: Node, bits: int, group_size: int, what: str) -> None:
    users = data_users(value)
    dtype = value.meta["val"].dtype
    with gm.graph.inserting_before(value.next):  # keeps insertion order: value, packed, parts, restored
        packed = gm.graph.call_function(KV_QUANTIZE, (value, bits, group_size))
        parts = [gm.graph.call_function(operator.getitem, (packed, i)) for i in range(3)]
        restored = gm.graph.call_function(KV_DEQUANTIZE, (*parts, bits, group_size, dtype))
    for node in (packed, *parts, restored):
        node.meta["nn_module_stack"] = value.meta.get("nn_module_stack", {})
        node.meta["asaf_fx"] = {"kv_bits": bits, "kv": what}
    for user in users:
        user.replace_input_with(value, restored)


class QuantizeKV:
    """Asymmetric ``bits``-bit keys and values for every attention (groups of ``group_size``; None = head_dim)."""

    name = "quantize_kv"

    def __init__(self, bits: int, group_size: int | None = None) -> None:
        if bits not in (4, 8):
            raise ValueError(f"KV-cache bits must be 4 or 8 to quantize (16 means: skip this pass), got {bits}")
        self.bits, self.group_size = bits, group_size

    def __call__(self, gm: GraphModule) -> PassResult:
        sdpas = [n for n in gm.graph.nodes if is_op(n, aten.scaled_dot_product_attention)]
        if not sdpas:
            raise PatternError("quantize_kv: no scaled_dot_product_attention in the graph")
        done: set[Node] = set()
        for sdpa in sdpas:
            head_dim = int(sdpa.args[1].meta["val"].shape[-1])
            group = self.group_size or head_dim
            if head_dim % group:
                raise ValueError(f"quantize_kv: group size {group} does not divide head_dim {head_dim}")
            for what, arg in (("key", sdpa.args[1]), ("value", sdpa.args[2])):
                source = source_through(arg, is_head_layout)
                if source.op != "call_function" or "val" not in source.meta:
                    raise PatternError(
                        f"quantize_kv: the {what} of {sdpa.name} does not come from a computed value", source
                    )
                if source not in done:  # GQA: query heads may share one K/V source
                    _fake_quantize(gm, source, self.bits, group, what)
                    done.add(source)
        gm.meta.setdefault(META_KEY, {})["kv_cache"] = {"bits": self.bits, "group_size": self.group_size,
                                                         "count": len(done)}
        return PassResult(gm, True)
