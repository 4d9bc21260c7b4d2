"""Rotate the residual stream by a seeded orthogonal Q, absorbed entirely into weights.

Preserves: every output up to float rounding. With Q orthogonal the stream x becomes x·Q:
embeddings E → E·Q, linears that read the stream W → W·Q, linears that write it W → Qᵀ·W
(bias b → b·Q). Unscaled RMSNorm commutes with Q (‖xQ‖ = ‖x‖), so run ``FoldNorms`` first.
Works for any hidden size (see ``rotations.residual_rotation``). No node is added, except around a
tied lm_head's norm scale γ (``FoldNorms`` leaves it): the head reads E·Q, the embedding's own
rotated matrix, so its input ``n ⊙ γ`` becomes ``((n' Kᵀ) ⊙ γ) K`` with ``n' = n·Q`` and
``Q = diag(±1)·K``, ``K = kron(H/√2^k, R)``: two ``hadamard_rotate`` nodes per token (the signs
cancel), and one matrix instead of two.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

import asaf_fx.triton_kernels.ops  # noqa: F401  registers torch.ops.asaf_fx.hadamard_rotate
from asaf_fx.passes.graph_utils import (
    add_constant,
    embedding_storages,
    first_node,
    get_tensor,
    linear_bias,
    row_consumers,
    set_tensor,
    storage_key,
    update_tensor,
)
from asaf_fx.passes.infra import META_KEY, PassResult, PatternError
from asaf_fx.passes.patterns import RMSNorm
from asaf_fx.passes.rotate.residual import find_residual_stream
from asaf_fx.passes.rotate.rotations import Rotation, residual_rotation


def _rotate_around_scale(gm: GraphModule, norm: RMSNorm, q: Rotation) -> None:
    """``n' ⊙ γ`` → ``((n' Kᵀ) ⊙ γ) K`` (see the module doc); the sign diagonal of Q cancels."""
    width = q.width
    right = add_constant(gm, f"asaf_residual_right_{width}", q.right.to(torch.float32), first_node(gm))
    back = add_constant(gm, f"asaf_residual_right_t_{width}", q.right.T.contiguous().to(torch.float32),
                        first_node(gm))
    scale = norm.weight_mul
    # The scale is the one weight no pass rewrites; a copy keeps the compiled graph off the model's memory.
    update_tensor(gm, norm.weight, lambda gamma: gamma)
    with gm.graph.inserting_before(scale):
        undo = gm.graph.call_function(torch.ops.asaf_fx.hadamard_rotate.default, (norm.output, back))
    scale.replace_input_with(norm.output, undo)
    with gm.graph.inserting_after(scale):
        redo = gm.graph.call_function(torch.ops.asaf_fx.hadamard_rotate.default, (scale, right))
    scale.replace_all_uses_with(redo, delete_user_cb=lambda user: user is not redo)
    scale.meta["asaf_fx"] = {"head_scale": int(width)}
    for node in (undo, redo):
        node.meta["asaf_fx"] = {"rotation": "residual_head_scale", "width": int(width)}
        node.meta["nn_module_stack"] = scale.meta.get("nn_module_stack", {})


class RotateResidual:
    """Rotate the residual stream (``kind`` = "hadamard" or "orthogonal", seeded)."""

    name = "rotate_residual"

    def __init__(self, seed: int = 0, kind: str = "hadamard") -> None:
        self.seed, self.kind = seed, kind

    def __call__(self, gm: GraphModule) -> PassResult:
        rs = find_residual_stream(gm)
        width = get_tensor(gm, rs.embeddings[0].args[0]).shape[1]
        tied = embedding_storages(gm)
        heads = {user for m in rs.head_scales for user, _ in row_consumers(m.weight_mul)}
        for lin in rs.readers + rs.writers:
            w = get_tensor(gm, lin.args[1])
            if storage_key(w) in tied and lin not in heads:
                raise PatternError("rotate_residual: linear shares its weight with an embedding; "
                                   "run UntieEmbeddings first", lin)
            size = w.shape[1] if lin in rs.readers else w.shape[0]
            if size != width:
                raise PatternError(f"rotate_residual: linear has width {size} on the residual side, "
                                   f"the embedding has {width}", lin)
        if rs.head_scales and self.kind != "hadamard":
            raise PatternError(f"rotate_residual: a {self.kind!r} rotation cannot keep a tied lm_head's norm scale "
                               "online; run UntieEmbeddings and FoldNorms first", rs.head_scales[0].weight_mul)
        q = residual_rotation(width, self.seed, self.kind)
        rotated: dict[tuple, torch.Tensor] = {}  # original storage -> its rotation, for shared matrices
        done: set[str] = set()

        def rotate(node: Node, fn) -> None:
            if node.target in done:
                return
            done.add(node.target)
            key = storage_key(get_tensor(gm, node))
            if key in rotated:
                set_tensor(gm, node.target, rotated[key])
                return
            update_tensor(gm, node, fn)
            rotated[key] = get_tensor(gm, node)

        for e in rs.embeddings:
            rotate(e.args[0], q.apply)
        for lin in rs.readers:
            rotate(lin.args[1], q.apply)
        for lin in rs.writers:
            rotate(lin.args[1], q.apply_left_transposed)
            if (bias := linear_bias(lin)) is not None:
                rotate(bias, q.apply)
        for norm in rs.head_scales:
            _rotate_around_scale(gm, norm, q)
        gm.meta.setdefault(META_KEY, {}).setdefault("rotations", []).append(
            {"pass": self.name, "kind": self.kind, "seed": self.seed, "width": int(width),
             "readers": len(rs.readers), "writers": len(rs.writers)})
        return PassResult(gm, True)
