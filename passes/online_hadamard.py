"""Rotate the input of every SwiGLU down projection online (QuaRot's H before down_proj).

Preserves: every output up to float rounding. For h = silu(gate(x))·up(x) of width n,
``down(h) == down'(hadamard_rotate(h, R_m))`` with W_down' = W_down · kron(H_{2^k}/√2^k, R_m):
the rotation is folded into W_down offline and applied to h by a graph node calling
``torch.ops.asaf_fx.hadamard_rotate``. Any width n = 2^k·m works, so pruned widths do too.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

import asaf_fx.ops  # noqa: F401  registers torch.ops.asaf_fx.hadamard_rotate
from asaf_fx.passes.graph_utils import add_constant, first_node, get_tensor, update_tensor
from asaf_fx.passes.infra import META_KEY, PassResult, PatternError
from asaf_fx.passes.patterns import find_swiglus
from asaf_fx.passes.rotations import online_rotation


class OnlineHadamardDown:
    """Insert ``hadamard_rotate`` before each SwiGLU ``down`` linear and fold it into the weight."""

    name = "online_hadamard_down"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def __call__(self, gm: GraphModule) -> PassResult:
        mlps = find_swiglus(gm)
        if not mlps:
            raise PatternError("online_hadamard_down: no SwiGLU (down(silu(gate(x)) * up(x))) in the graph")
        for mlp in mlps:
            width = get_tensor(gm, mlp.down.args[1]).shape[1]
            rotation = online_rotation(width, self.seed, "down")
            right_node = add_constant(gm, f"asaf_hadamard_right_down_{width}", rotation.right.to(torch.float32),
                                      first_node(gm))
            with gm.graph.inserting_before(mlp.down):
                rot = gm.graph.call_function(torch.ops.asaf_fx.hadamard_rotate.default, (mlp.product, right_node))
            rot.meta["asaf_fx"] = {"rotation": "online_hadamard_down", "width": int(width)}
            rot.meta["nn_module_stack"] = mlp.down.meta.get("nn_module_stack", {})
            mlp.down.replace_input_with(mlp.product, rot)
            update_tensor(gm, mlp.down.args[1], rotation.apply)
        gm.meta.setdefault(META_KEY, {}).setdefault("rotations", []).append(
            {"pass": self.name, "seed": self.seed, "count": len(mlps)})
        return PassResult(gm, True)
