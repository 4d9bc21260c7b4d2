"""Structure found by graph shape, never by module names: RMSNorm, SwiGLU, RoPE and attention.

Every matcher works on the aten graph that ``torch.export`` produces for Hugging Face Llama-family
models (Llama, Mistral, Qwen2, SmolLM2) and returns ``None``/an empty list when the shape differs,
so the calling pass can raise a ``PatternError`` that names the node.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import GraphModule, Node

from asaf_fx.passes.graph_utils import aten, data_users, is_head_layout, is_linear, is_op, ndim, source_through
from asaf_fx.passes.infra import PatternError


def _other(node: Node, known: Node) -> object:
    a, b = node.args[0], node.args[1]
    return b if a is known else a if b is known else None


@dataclass
class RMSNorm:
    """``weight * (x * rsqrt(mean(x², -1) + eps))``; ``output`` is the unweighted result (after casts)."""

    input: Node
    normalized: Node  # mul(x, rsqrt)
    output: Node  # normalized, or the cast that follows it
    weight_mul: Node | None
    weight: Node | None  # get_attr of the scale, when present


def match_rmsnorm(rsqrt: Node) -> RMSNorm | None:
    if not is_op(rsqrt, aten.rsqrt):
        return None
    add = rsqrt.args[0]
    if not is_op(add, aten.add) or not any(is_op(a, aten.mean) for a in add.args[:2]):
        return None
    mean = next(a for a in add.args[:2] if is_op(a, aten.mean))
    dims = mean.args[1] if len(mean.args) > 1 else None
    pw = mean.args[0]
    if not is_op(pw, aten.pow) or pw.args[1] != 2 or not isinstance(dims, (list, tuple)) or len(dims) != 1:
        return None
    x = pw.args[0]
    nd = ndim(x)
    if nd is None or dims[0] % nd != nd - 1:
        return None
    normalized = next((u for u in data_users(rsqrt) if is_op(u, aten.mul) and _other(u, rsqrt) is x), None)
    if normalized is None:
        return None
    output = normalized
    while len(data_users(output)) == 1 and is_op(data_users(output)[0], aten.to, aten._to_copy):
        output = data_users(output)[0]
    users = data_users(output)
    weight_mul = weight = None
    if len(users) == 1 and is_op(users[0], aten.mul):
        w = _other(users[0], output)
        if isinstance(w, Node) and w.op == "get_attr" and ndim(w) == 1:
            weight_mul, weight = users[0], w
    return RMSNorm(x, normalized, output, weight_mul, weight)


def find_rmsnorms(gm: GraphModule) -> list[RMSNorm]:
    return [m for n in gm.graph.nodes if (m := match_rmsnorm(n)) is not None]


@dataclass
class SwiGLU:
    """``down(silu(gate(x)) * up(x))``."""

    gate: Node
    up: Node
    product: Node  # silu(gate) * up: the input of down
    down: Node


def match_swiglu(down: Node) -> SwiGLU | None:
    if not is_linear(down) or not is_op(down.args[0], aten.mul):
        return None
    prod = down.args[0]
    act = next((a for a in prod.args[:2] if is_op(a, aten.silu)), None)
    if act is None:
        return None
    gate, up = act.args[0], _other(prod, act)
    if not (is_linear(gate) and is_linear(up)) or gate.args[0] is not up.args[0]:
        return None
    return SwiGLU(gate, up, prod, down)


def find_swiglus(gm: GraphModule) -> list[SwiGLU]:
    return [m for n in gm.graph.nodes if (m := match_swiglu(n)) is not None]


def match_rope(add: Node) -> Node | None:
    """For ``t*cos + cat(-t[..., h/2:], t[..., :h/2])*sin`` (rotate_half RoPE) return t, else None."""
    if not is_op(add, aten.add) or not all(is_op(a, aten.mul) for a in add.args[:2]):
        return None
    for m_rot, m_lin in ((add.args[0], add.args[1]), (add.args[1], add.args[0])):
        cat = next((a for a in m_rot.args[:2] if is_op(a, aten.cat)), None)
        if cat is None or len(cat.args[0]) != 2:
            continue
        neg, first = cat.args[0]
        if not (is_op(neg, aten.neg) and is_op(neg.args[0], aten.slice) and is_op(first, aten.slice)):
            continue
        t = first.args[0]
        if neg.args[0].args[0] is t and t in m_lin.args[:2]:
            return t
    return None


@dataclass
class Attention:
    """One ``scaled_dot_product_attention`` with where q, k, v come from and where it goes."""

    sdpa: Node
    q: Node  # RoPE output feeding the query
    k: Node  # RoPE output feeding the key (possibly through a static-cache write)
    v_proj: Node
    o_proj: Node
    head_dim: int


def attention_output_linear(sdpa: Node) -> Node | None:
    """The one linear (o_proj) that reads the attention output through layout-only ops, else None."""
    consumers = data_users(sdpa)
    while len(consumers) == 1 and is_head_layout(consumers[0]):
        consumers = data_users(consumers[0])
    return consumers[0] if len(consumers) == 1 and is_linear(consumers[0]) else None


def match_attention(sdpa: Node) -> Attention | str:
    """An Attention, or a string saying what did not match."""
    q, k, v = (source_through(a, is_head_layout) for a in sdpa.args[:3])
    for name, node in (("query", q), ("key", k)):
        if match_rope(node) is None:
            return f"the {name} of {sdpa.name} does not come from a rotate_half RoPE (found {node.name})"
    if not is_linear(v):
        return f"the value of {sdpa.name} does not come from a linear (found {v.name})"
    o_proj = attention_output_linear(sdpa)
    if o_proj is None:
        return f"the output of {sdpa.name} does not reach a single linear (o_proj)"
    head_dim = int(sdpa.meta["val"].shape[-1]) if "val" in sdpa.meta else None
    if head_dim is None:
        return f"{sdpa.name} has no shape metadata; propagate shapes first"
    return Attention(sdpa, q, k, v, o_proj, head_dim)


def find_attentions(gm: GraphModule) -> tuple[list[Attention], list[str]]:
    """All attentions, plus a reason for each SDPA node that did not match."""
    found, failed = [], []
    for n in gm.graph.nodes:
        if is_op(n, aten.scaled_dot_product_attention):
            m = match_attention(n)
            (found if isinstance(m, Attention) else failed).append(m)
    return found, failed


def require_attentions(gm: GraphModule, who: str) -> list[Attention]:
    """Every attention of the graph, or a PatternError (prefixed with the pass name ``who``)."""
    attentions, failed = find_attentions(gm)
    if failed:
        raise PatternError(f"{who}: {failed[0]}")
    if not attentions:
        raise PatternError(f"{who}: no scaled_dot_product_attention in the graph (load the model "
                           "with attn_implementation='sdpa')")
    return attentions
