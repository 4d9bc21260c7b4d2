"""Rotate queries and keys after RoPE online, so the KV cache holds rotated keys.

Preserves: attention scores exactly up to float rounding: (q·H)(k·H)ᵀ = q·kᵀ for orthogonal H.
A ``torch.ops.asaf_fx.hadamard_rotate`` node is inserted on the last axis (head_dim, any size:
H = kron(H_{2^k}/√2^k, R_m)) after both RoPE outputs of every attention; in the static-cache graph
the key is rotated before it is written to the cache. This is what KV-cache quantization needs.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

import asaf_fx.triton_kernels.ops  # noqa: F401  registers torch.ops.asaf_fx.hadamard_rotate
from asaf_fx.passes.graph_utils import add_constant, data_users, first_node
from asaf_fx.passes.infra import META_KEY, PassResult
from asaf_fx.passes.patterns import require_attentions
from asaf_fx.passes.rotate.rotations import online_rotation


class RotateQueryKey:
    """Insert ``hadamard_rotate`` after the query and key RoPE of every attention."""

    name = "rotate_qk"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def __call__(self, gm: GraphModule) -> PassResult:
        attentions = require_attentions(gm, "rotate_qk")
        targets: dict = {}  # RoPE output -> head_dim; a dict keeps graph order and drops repeats
        for att in attentions:
            targets.update({att.q: att.head_dim, att.k: att.head_dim})
        for rope, hd in targets.items():
            right = online_rotation(hd, self.seed, "query-key").right
            right_node = add_constant(gm, f"asaf_hadamard_right_qk_{hd}", right.to(torch.float32), first_node(gm))
            users = data_users(rope)
            with gm.graph.inserting_after(rope):
                rot = gm.graph.call_function(torch.ops.asaf_fx.hadamard_rotate.default, (rope, right_node))
            rot.meta["asaf_fx"] = {"rotation": "rotate_qk", "width": int(hd)}
            rot.meta["nn_module_stack"] = rope.meta.get("nn_module_stack", {})
            for u in users:
                u.replace_input_with(rope, rot)
        gm.meta.setdefault(META_KEY, {}).setdefault("rotations", []).append(
            {"pass": self.name, "seed": self.seed, "count": len(targets)})
        return PassResult(gm, True)
