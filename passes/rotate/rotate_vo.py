"""Rotate each attention head's values by an orthogonal H, absorbed into v_proj and o_proj.

Preserves: every output up to float rounding. Attention output per query head is a convex
combination of its key/value head's value rows, so rotating every value head by H (v_proj rows
per head: W_v → Hᵀ·W_v, bias b → b·H) rotates every attention head output by H, which o_proj
undoes (W_o → W_o · blockdiag(H, ..., H)). Grouped-query attention works because all heads share
one H. Any head_dim: H = kron(H_{2^k}/√2^k, R_m). No node is added.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from asaf_fx.passes.graph_utils import get_tensor, linear_bias, update_tensor
from asaf_fx.passes.infra import META_KEY, PassResult, PatternError
from asaf_fx.passes.patterns import require_attentions
from asaf_fx.passes.rotate.rotations import online_rotation


def _blockdiag(h: torch.Tensor, blocks: int) -> torch.Tensor:
    return torch.block_diag(*([h] * blocks))


class RotateValueOutput:
    """Head-wise rotation of V, undone in o_proj, for every attention in the graph."""

    name = "rotate_vo"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def __call__(self, gm: GraphModule) -> PassResult:
        attentions = require_attentions(gm, "rotate_vo")
        for att in attentions:
            wv, wo = get_tensor(gm, att.v_proj.args[1]), get_tensor(gm, att.o_proj.args[1])
            if wv.shape[0] % att.head_dim or wo.shape[1] % att.head_dim:
                raise PatternError(f"rotate_vo: v_proj/o_proj widths {wv.shape[0]}/{wo.shape[1]} are not "
                                   f"multiples of head_dim {att.head_dim}", att.sdpa)
        for att in attentions:
            hd = att.head_dim
            v_weight = get_tensor(gm, att.v_proj.args[1])
            h = online_rotation(hd, self.seed, "value").matrix().to(v_weight.device)  # built on the CPU
            kv_heads = v_weight.shape[0] // hd
            q_heads = get_tensor(gm, att.o_proj.args[1]).shape[1] // hd
            update_tensor(gm, att.v_proj.args[1], lambda w, b=_blockdiag(h, kv_heads): b.T @ w)
            if (bias := linear_bias(att.v_proj)) is not None:
                update_tensor(gm, bias, lambda v, b=_blockdiag(h, kv_heads): v @ b)
            update_tensor(gm, att.o_proj.args[1], lambda w, b=_blockdiag(h, q_heads): w @ b)
        gm.meta.setdefault(META_KEY, {}).setdefault("rotations", []).append(
            {"pass": self.name, "seed": self.seed, "count": len(attentions), "width": attentions[0].head_dim})
        return PassResult(gm, True)
