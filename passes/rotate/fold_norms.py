"""Fold RMSNorm scales into the linears that read the normalised tensor.

Preserves: every output up to float rounding (weights are rewritten in float64 and cast back).
``linear(w ⊙ n, W) == linear(n, W · diag(w))`` for each linear consuming the norm, so the scale
multiply is removed from the graph. Afterwards every RMSNorm is ``x · rsqrt(mean(x²) + eps)``,
which commutes with orthogonal rotations of x; that is what residual rotation relies on.
A norm read only by an lm_head that shares its matrix with the embedding (tied embeddings) keeps
its scale: folding it would change the embedding too. ``RotateResidual`` rotates around that scale,
so the matrix stays shared; run ``UntieEmbeddings`` first to fold it instead.
"""

from __future__ import annotations

from torch.fx import GraphModule

from asaf_fx.passes.graph_utils import (
    aten,
    embedding_storages,
    get_tensor,
    is_linear,
    is_op,
    row_consumers,
    storage_key,
    update_tensor,
)
from asaf_fx.passes.infra import PassResult, PatternError
from asaf_fx.passes.patterns import RMSNorm, find_rmsnorms

_UNSUPPORTED_NORMS = (aten.layer_norm, aten.native_layer_norm, aten.group_norm, aten.rms_norm)


def tied_head_scale(gm: GraphModule, norm: RMSNorm, tied: set) -> bool:
    """Whether ``norm`` has a scale that only linears sharing an embedding's matrix read."""
    if norm.weight_mul is None:
        return False
    readers = [user for user, _ in row_consumers(norm.weight_mul)]
    return all(is_linear(user) and storage_key(get_tensor(gm, user.args[1])) in tied for user in readers)


def _consumers(norm: RMSNorm) -> list:
    """The linears reading the scaled norm output (through casts); anything else is an error."""
    linears = []
    for user, value in row_consumers(norm.weight_mul):
        if not is_linear(user) or user.args[0] is not value:
            raise PatternError(
                f"fold_norms: the RMSNorm scaled at {norm.weight_mul.name} is read by {user.name} "
                f"({user.target}); only linears can absorb its scale", user)
        linears.append(user)
    return linears


class FoldNorms:
    """Fold every RMSNorm scale (``weight * normalized``) into its consuming linears."""

    name = "fold_norms"

    def __call__(self, gm: GraphModule) -> PassResult:
        for n in gm.graph.nodes:
            if is_op(n, *_UNSUPPORTED_NORMS):
                raise PatternError("fold_norms: unsupported normalisation (only RMSNorm written as "
                                   "pow/mean/rsqrt/mul is supported)", n)
        norms = find_rmsnorms(gm)
        if not norms:
            raise PatternError("fold_norms: no RMSNorm pattern (x * rsqrt(mean(x**2, -1) + eps)) in the graph")
        tied = embedding_storages(gm)
        weighted = [(m, _consumers(m)) for m in norms if m.weight_mul is not None and not tied_head_scale(gm, m, tied)]
        # Check everything before changing anything, so a failed match leaves the graph as it was.
        seen: dict[str, str] = {}
        for norm, linears in weighted:
            for lin in linears:
                if storage_key(get_tensor(gm, lin.args[1])) in tied:
                    raise PatternError(f"fold_norms: {lin.name} shares its weight with an embedding and reads a norm "
                                       "that other linears read too; run UntieEmbeddings first", lin)
                if lin.args[1].target in seen:
                    raise PatternError(f"fold_norms: weight {lin.args[1].target} is shared with "
                                       f"{seen[lin.args[1].target]}; untie it first", lin)
                seen[lin.args[1].target] = lin.name
        for norm, linears in weighted:
            scale = get_tensor(gm, norm.weight).detach()
            for lin in linears:
                update_tensor(gm, lin.args[1], lambda w, s=scale: w * s.to(w.dtype).unsqueeze(0))
            norm.weight_mul.replace_all_uses_with(norm.output)
            gm.graph.erase_node(norm.weight_mul)
            if not norm.weight.users:
                gm.graph.erase_node(norm.weight)
        return PassResult(gm, bool(weighted))
