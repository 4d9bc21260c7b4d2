"""Rotate the inputs of down_proj and o_proj online (QuaRot's Hadamards before the two linears
whose inputs the residual rotation cannot reach).

Preserves: every output up to float rounding. For a linear ``y = W x`` whose input x has width n,
``W x == W' hadamard_rotate(x, R_m)`` with ``W' = W · kron(H_{2^k}/√2^k, R_m)``: the rotation is
folded into W offline and applied to x by a graph node calling ``torch.ops.asaf_fx.hadamard_rotate``.
Any width n = 2^k·m works, so pruned widths do too.

* down_proj: x = silu(gate(x))·up(x), the SwiGLU product, whose outliers otherwise wreck 4-bit
  activations.
* o_proj: x = the attention output, all heads side by side. The head-wise V/O rotation already
  mixes within each head; this full-width rotation also spreads outliers across heads.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

import asaf_fx.triton_kernels.ops  # noqa: F401  registers torch.ops.asaf_fx.hadamard_rotate
from asaf_fx.passes.graph_utils import add_constant, aten, first_node, get_tensor, is_op, update_tensor
from asaf_fx.passes.infra import META_KEY, PassResult, PatternError
from asaf_fx.passes.patterns import attention_output_linear, find_swiglus
from asaf_fx.passes.rotate.rotations import online_rotation


def rotate_linear_input(gm: GraphModule, linear: Node, seed: int, tag: str) -> None:
    """Insert ``hadamard_rotate`` on ``linear``'s input and fold the rotation into its weight."""
    width = get_tensor(gm, linear.args[1]).shape[1]
    rotation = online_rotation(width, seed, tag)
    right = add_constant(gm, f"asaf_hadamard_right_{tag}_{width}", rotation.right.to(torch.float32), first_node(gm))
    source = linear.args[0]
    with gm.graph.inserting_before(linear):
        rot = gm.graph.call_function(torch.ops.asaf_fx.hadamard_rotate.default, (source, right))
    rot.meta["asaf_fx"] = {"rotation": f"online_hadamard_{tag}", "width": int(width)}
    rot.meta["nn_module_stack"] = linear.meta.get("nn_module_stack", {})
    linear.replace_input_with(source, rot)
    update_tensor(gm, linear.args[1], rotation.apply)


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
            rotate_linear_input(gm, mlp.down, self.seed, "down")
        gm.meta.setdefault(META_KEY, {}).setdefault("rotations", []).append(
            {"pass": self.name, "seed": self.seed, "count": len(mlps)})
        return PassResult(gm, True)


class OnlineHadamardOut:
    """Insert ``hadamard_rotate`` before each attention's output projection and fold it in."""

    name = "online_hadamard_out"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def __call__(self, gm: GraphModule) -> PassResult:
        sdpas = [n for n in gm.graph.nodes if is_op(n, aten.scaled_dot_product_attention)]
        if not sdpas:
            raise PatternError("online_hadamard_out: no scaled_dot_product_attention in the graph")
        for sdpa in sdpas:
            o_proj = attention_output_linear(sdpa)
            if o_proj is None:
                raise PatternError("online_hadamard_out: the attention output does not reach a single linear", sdpa)
            rotate_linear_input(gm, o_proj, self.seed, "out")
        gm.meta.setdefault(META_KEY, {}).setdefault("rotations", []).append(
            {"pass": self.name, "seed": self.seed, "count": len(sdpas)})
        return PassResult(gm, True)
