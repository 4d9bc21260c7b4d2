"""Make a second graph of the same model read the first graph's tensors (one copy of the weights).

The forward and decode graphs of a compiled model are captured separately, so each starts with
its own weight attributes (under different names). Once both went through the same rewrites,
corresponding nodes — the k-th embedding, linear, kernel call or rotation of each graph — read
equal tensors; this binds the second graph's attributes to the first graph's tensor objects and
lets the duplicates go. Shapes and dtypes are checked, and values too unless the second graph
followed the passes in structure only: a mismatch means the two graphs were rewritten differently,
which is a bug worth stopping for.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

import asaf_fx.triton_kernels.ops  # noqa: F401
from asaf_fx.passes.graph_utils import aten, get_tensor, is_op, set_tensor

_OPS = (aten.embedding, aten.linear, torch.ops.asaf_fx.w4a16_linear, torch.ops.asaf_fx.w4a_int_linear,
        torch.ops.asaf_fx.hadamard_rotate, torch.ops.asaf_fx.hadamard_rotate_quantize)


def _readers(gm: GraphModule, op) -> list:
    if op == "head_scale":  # the final norm's scale a tied lm_head keeps (rotate_residual)
        return [n for n in gm.graph.nodes if is_op(n, aten.mul) and "head_scale" in n.meta.get("asaf_fx", {})]
    return [n for n in gm.graph.nodes if is_op(n, op)]


def share_weights(source: GraphModule, target: GraphModule, *, check_values: bool = True) -> int:
    """Rebind ``target``'s weight attributes to ``source``'s equal tensors; returns how many were shared.

    ``check_values=False``: the target went through the passes in structure only
    (``graph_utils.structure_only``), so only shapes and dtypes must agree.
    """
    shared = 0
    for op in (*_OPS, "head_scale"):
        ours, theirs = _readers(source, op), _readers(target, op)
        if len(ours) != len(theirs):
            raise RuntimeError(f"share_weights: {len(ours)} {op} nodes in one graph, {len(theirs)} in the other")
        for a, b in zip(ours, theirs, strict=True):
            for x, y in zip(a.all_input_nodes, b.all_input_nodes, strict=True):
                if x.op != "get_attr" or y.op != "get_attr":
                    continue
                tx, ty = get_tensor(source, x), get_tensor(target, y)
                if tx is ty:
                    continue
                same = tx.shape == ty.shape and tx.dtype == ty.dtype and (not check_values or (
                    torch.equal(tx, ty) if not tx.is_floating_point()
                    else torch.allclose(tx, ty, rtol=1e-5, atol=1e-6 * float(tx.abs().max().clamp_min(1e-30)))))
                if not same:
                    raise RuntimeError(f"share_weights: {y.target} differs from {x.target}; the graphs were "
                                       "rewritten differently")
                set_tensor(target, y.target, tx)
                shared += 1
    return shared
