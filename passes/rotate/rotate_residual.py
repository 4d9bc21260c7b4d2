"""Rotate the residual stream by a seeded orthogonal Q, absorbed entirely into weights.

Preserves: every output up to float rounding. With Q orthogonal the stream x becomes x·Q:
embeddings E → E·Q, linears that read the stream W → W·Q, linears that write it W → Qᵀ·W
(bias b → b·Q). Unscaled RMSNorm commutes with Q (‖xQ‖ = ‖x‖), so run ``FoldNorms`` first.
Works for any hidden size (see ``rotations.residual_rotation``). No node is added.
"""

from __future__ import annotations

from torch.fx import GraphModule

from asaf_fx.passes.graph_utils import (
    embedding_storages,
    get_tensor,
    linear_bias,
    storage_key,
    update_tensor,
)
from asaf_fx.passes.infra import META_KEY, PassResult, PatternError
from asaf_fx.passes.rotate.residual import find_residual_stream
from asaf_fx.passes.rotate.rotations import residual_rotation


class RotateResidual:
    """Rotate the residual stream (``kind`` = "hadamard" or "orthogonal", seeded)."""

    name = "rotate_residual"

    def __init__(self, seed: int = 0, kind: str = "hadamard") -> None:
        self.seed, self.kind = seed, kind

    def __call__(self, gm: GraphModule) -> PassResult:
        rs = find_residual_stream(gm)
        width = get_tensor(gm, rs.embeddings[0].args[0]).shape[1]
        tied = embedding_storages(gm)
        for lin in rs.readers + rs.writers:
            w = get_tensor(gm, lin.args[1])
            if storage_key(w) in tied:
                raise PatternError("rotate_residual: linear shares its weight with an embedding; "
                                   "run UntieEmbeddings first", lin)
            size = w.shape[1] if lin in rs.readers else w.shape[0]
            if size != width:
                raise PatternError(f"rotate_residual: linear has width {size} on the residual side, "
                                   f"the embedding has {width}", lin)
        q = residual_rotation(width, self.seed, self.kind)
        for e in rs.embeddings:
            update_tensor(gm, e.args[0], q.apply, same_shape=True)
        for lin in rs.readers:
            update_tensor(gm, lin.args[1], q.apply, same_shape=True)
        for lin in rs.writers:
            update_tensor(gm, lin.args[1], q.apply_left_transposed, same_shape=True)
            if (bias := linear_bias(lin)) is not None:
                update_tensor(gm, bias, q.apply, same_shape=True)
        gm.meta.setdefault(META_KEY, {}).setdefault("rotations", []).append(
            {"pass": self.name, "kind": self.kind, "seed": self.seed, "width": int(width),
             "readers": len(rs.readers), "writers": len(rs.writers)})
        return PassResult(gm, True)
