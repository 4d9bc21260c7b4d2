"""Small graph helpers shared by the passes: op tests, walking through layout-only ops, parameters.

Parameters are read and written through the ``get_attr`` nodes that use them. A rewrite never
changes a tensor in place: the captured module shares its tensors with the Hugging Face model, and
callers compare against that model.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch.fx import GraphModule, Node

aten = torch.ops.aten

# Ops that only cast or re-index rows: a per-row transform of the last axis commutes with them.
_ROW_PASSTHROUGH = {aten.to, aten._to_copy, aten.clone, aten.contiguous, aten.alias, aten.detach}
# Ops that move heads/tokens around but keep the last (head_dim) axis whole.
_HEAD_LAYOUT = {
    aten.view, aten.reshape, aten._unsafe_view, aten.transpose, aten.permute, aten.expand,
    aten.unsqueeze, aten.slice, aten.contiguous, aten.clone, aten.alias, aten.to, aten._to_copy,
}


def packet(node: Node):
    """The OpOverloadPacket of a call_function node (``aten.linear``), else None."""
    if node.op != "call_function":
        return None
    return getattr(node.target, "overloadpacket", node.target)


def is_op(node: object, *packets) -> bool:
    return isinstance(node, Node) and packet(node) in packets


def ndim(node: Node) -> int | None:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else None


def data_users(node: Node) -> list[Node]:
    """Users that consume the value (metadata asserts are not consumers)."""
    return [u for u in node.users if not is_op(u, aten._assert_tensor_metadata)]


def is_row_passthrough(node: Node) -> bool:
    """True when ``node`` applies the identity to each row's last axis (casts, batch/seq slices,
    rows picked by index: the positions whose logits are kept)."""
    if is_op(node, *_ROW_PASSTHROUGH):
        return True
    if is_op(node, aten.slice):
        dim = node.args[1] if len(node.args) > 1 else 0
        nd = ndim(node.args[0])
        return nd is not None and dim % nd != nd - 1
    if is_op(node, aten.index):
        indices, nd = node.args[1], ndim(node.args[0])
        return nd is not None and len(indices) < nd  # the last axis is never indexed
    return False


def row_consumers(node: Node) -> list[tuple[Node, Node]]:
    """(consumer, the value it reads) pairs reached from ``node`` through row pass-through ops."""
    out: list[tuple[Node, Node]] = []
    for u in data_users(node):
        if is_row_passthrough(u) and u.args[0] is node:
            out.extend(row_consumers(u))
        else:
            out.append((u, node))
    return out


def source_through(node: Node, allowed: Callable[[Node], bool]) -> Node:
    """Walk back along the first argument while ``allowed(node)``; index_copy_ follows its source."""
    while isinstance(node, Node) and allowed(node):
        node = node.args[3] if is_op(node, aten.index_copy_, aten.index_copy) else node.args[0]
    return node


def is_head_layout(node: Node) -> bool:
    return is_op(node, *_HEAD_LAYOUT, aten.index_copy_, aten.index_copy)


def is_linear(node: object) -> bool:
    return is_op(node, aten.linear) and isinstance(node.args[1], Node) and node.args[1].op == "get_attr"


def linear_bias(node: Node) -> Node | None:
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return bias if isinstance(bias, Node) else None


def get_tensor(gm: GraphModule, node: Node) -> torch.Tensor:
    if node.op != "get_attr":
        raise TypeError(f"node {node.name} is {node.op}, not a parameter (get_attr)")
    return attr_tensor(gm, node.target)


def attr_tensor(gm: torch.nn.Module, target: str) -> torch.Tensor:
    """The parameter, buffer or constant at dotted ``target``."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_tensor(gm: GraphModule, target: str, value: torch.Tensor) -> None:
    """Bind a new tensor at ``target`` (replacing, never writing into the old one)."""
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    old = getattr(owner, name, None)
    if isinstance(old, torch.nn.Parameter) or name in owner._parameters:
        owner._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        if hasattr(owner, name):
            delattr(owner, name)
        owner.register_buffer(name, value)


def update_tensor(gm: GraphModule, node: Node, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace the tensor behind ``node`` by ``fn(tensor as float64)`` cast back to its dtype."""
    old = get_tensor(gm, node)
    with torch.no_grad():
        new = fn(old.detach().to(torch.float64)).to(old.dtype).contiguous()
    set_tensor(gm, node.target, new)


def bind_tensor(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Hold ``value`` at dotted ``target`` in ``gm``, making the containers on the way."""
    *path, name = target.split(".")
    owner = gm
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    if isinstance(value, torch.nn.Parameter):
        owner.register_parameter(name, value)
    else:
        owner.register_buffer(name, value)


def written_attrs(gm: GraphModule) -> set[Node]:
    """The get_attr nodes some op writes in place: state (the static KV cache), not weights."""
    written = set()
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is None:
            continue
        for argument, value in zip(schema.arguments, node.args, strict=False):
            if isinstance(value, Node) and value.op == "get_attr" and argument.alias_info is not None \
                    and argument.alias_info.is_write:
                written.add(value)
    return written


def storage_key(t: torch.Tensor) -> tuple[int, tuple[int, ...]]:
    """Identifies tensors that share memory (tied weights) even through different attributes."""
    return t.untyped_storage().data_ptr(), tuple(t.shape)


def embedding_storages(gm: GraphModule) -> set[tuple[int, tuple[int, ...]]]:
    return {storage_key(get_tensor(gm, n.args[0])) for n in gm.graph.nodes
            if is_op(n, aten.embedding) and n.args[0].op == "get_attr"}


def add_constant(gm: GraphModule, name: str, value: torch.Tensor, before: Node) -> Node:
    """Register ``value`` as a buffer named ``name`` (reused if equal) and return a get_attr node.

    The buffer goes to the device of the graph's other tensors: rotations are built on the CPU
    (seeded CPU generators), and a kernel must get all its operands on one device.
    """
    device = next(itertools.chain(gm.parameters(), gm.buffers()), value).device
    value = value.to(device)
    if hasattr(gm, name):
        if not torch.equal(getattr(gm, name), value):
            raise ValueError(f"buffer {name} already holds a different tensor")
    else:
        gm.register_buffer(name, value)
    for n in gm.graph.find_nodes(op="get_attr"):
        if n.target == name:
            return n
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(name)


def drop_dead_tensors(gm: GraphModule) -> None:
    """Erase nodes nothing uses and free every parameter or buffer no ``get_attr`` reads any more
    (weights a pass replaced, an untied embedding's original), so the graph holds only its own."""
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    used = {n.target for n in gm.graph.find_nodes(op="get_attr")}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            owner_path, _, attr = name.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            owner._parameters.pop(attr, None)
            owner._buffers.pop(attr, None)
    gm.recompile()


def drop_input_guards(gm: GraphModule) -> None:
    """Remove the input-shape guard module ``torch.export`` calls first (``_guards_fn``).

    It holds code generated at export time, which no file can carry, so a graph with it could not be
    rebuilt from a checkpoint as it was compiled; and it checks the exported inputs, not the flat
    ones the captured graph takes. ``CompiledModel`` builds the graph's inputs itself.
    """
    for node in list(gm.graph.find_nodes(op="call_module")):
        if node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()


def make_tensors_contiguous(gm: GraphModule) -> None:
    """Hold every tensor the graph reads in row-major order, keeping tensors it shares shared.

    A checkpoint stores tensors contiguous; a transposed view (e.g. an orthogonal factor built as
    ``q.T``) would multiply in another order after loading and differ in the last bits.
    """
    done: dict[int, torch.Tensor] = {}
    for name, tensor in list(gm.named_parameters()) + list(gm.named_buffers()):
        if not tensor.is_contiguous():
            key = id(tensor)
            if key not in done:
                done[key] = tensor.detach().contiguous()
            set_tensor(gm, name, done[key])


def first_node(gm: GraphModule) -> Node:
    """A node before which module constants can be inserted (after the placeholders)."""
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            return n
    raise ValueError("empty graph")


def count_op(gm: GraphModule, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)

