"""A rewritten GraphModule as JSON and back: its nodes, its calling convention, its attribute names.

What a checkpoint needs to rebuild a compiled graph without capturing the model again or re-running
a pass. The graph's tensors are not in the JSON (they travel in safetensors, by attribute name);
what is, is plain data: every node with its op, target, arguments and name, the pytree specs that
map the call's arguments to placeholders and the outputs back, the shape and dtype of each
attribute, and the JSON-able part of ``gm.meta``. Nothing is executed to read it: call targets
resolve only to ``torch.ops`` overloads and the ``operator`` functions export emits, so a tampered
file can name no other code. Reading back gives the same ``gm.code``, which callers check by hash.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree

from asaf_fx.passes.graph_utils import attr_tensor
from asaf_fx.passes.infra import META_KEY

SCHEMA = "asaf_fx.graph/1"
_OPERATORS = {f"operator.{name}": getattr(operator, name) for name in ("getitem", "add", "sub", "mul", "floordiv",
                                                                      "truediv", "neg", "eq", "ne", "lt", "le",
                                                                      "gt", "ge", "and_", "or_")}


class GraphFormatError(ValueError):
    """A graph that cannot be written as JSON, or JSON that is not a graph this module wrote."""


def _target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"torch.ops.{target.namespace}.{target._schema.name.split('::', 1)[1]}.{target._overloadname}"
    for name, fn in _OPERATORS.items():
        if target is fn:
            return name
    raise GraphFormatError(f"cannot store a call to {target!r}: only torch.ops overloads and operator functions")


def _resolve_target(name: str) -> Callable:
    if name in _OPERATORS:
        return _OPERATORS[name]
    parts = name.split(".")
    if len(parts) != 5 or parts[:2] != ["torch", "ops"]:
        raise GraphFormatError(f"unknown call target {name!r}")
    try:
        overload = getattr(getattr(getattr(torch.ops, parts[2]), parts[3]), parts[4])
    except (AttributeError, RuntimeError) as exc:
        raise GraphFormatError(f"operator {name} is not registered in this torch ({exc})") from exc
    if not isinstance(overload, torch._ops.OpOverload):
        raise GraphFormatError(f"{name} is not an operator overload")
    return overload


def _encode(value: Any) -> Any:
    """A node argument as JSON: nodes by name, torch enums by name, containers tagged by kind."""
    if isinstance(value, Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return {"float": repr(value)}  # repr round-trips exactly and spells inf and nan
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {"dict": [[k, _encode(v)] for k, v in value.items()]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": None}  # the device the graph is loaded on
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    raise GraphFormatError(f"cannot store a node argument of type {type(value).__name__}: {value!r}")


def _torch_attr(kind: str, name: str, expected: type) -> Any:
    value = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(value, expected):
        raise GraphFormatError(f"unknown {kind} {name!r}")
    return value


def _decode(value: Any, nodes: Mapping[str, Node], device: torch.device) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, list):
        return [_decode(v, nodes, device) for v in value]
    if not isinstance(value, dict) or len(value) != 1:
        raise GraphFormatError(f"malformed argument {value!r}")
    (kind, body), = value.items()
    if kind == "node":
        if body not in nodes:
            raise GraphFormatError(f"argument names node {body!r} before it is defined")
        return nodes[body]
    if kind == "float":
        return float(body)
    if kind == "tuple":
        return tuple(_decode(v, nodes, device) for v in body)
    if kind == "dict":
        return {k: _decode(v, nodes, device) for k, v in body}
    if kind == "dtype":
        return _torch_attr(kind, body, torch.dtype)
    if kind == "device":
        return device
    if kind == "layout":
        return _torch_attr(kind, body, torch.layout)
    if kind == "memory_format":
        return _torch_attr(kind, body, torch.memory_format)
    raise GraphFormatError(f"unknown argument kind {kind!r}")


def _example(value: Any) -> Any:
    """Example inputs are kept by shape and dtype: shape propagation never reads their values."""
    if isinstance(value, torch.Tensor):
        return {"tensor": {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}}
    return _encode(value)


def _example_back(value: Any, device: torch.device) -> Any:
    if isinstance(value, dict) and set(value) == {"tensor"}:
        spec = value["tensor"]
        return torch.zeros(spec["shape"], dtype=_torch_attr("dtype", spec["dtype"], torch.dtype), device=device)
    return _decode(value, {}, device)


def graph_to_json(gm: GraphModule, state: set[str] = frozenset()) -> dict[str, Any]:
    """``gm`` as JSON-ready data. ``state``: attributes the graph writes in place (a KV cache),
    stored by shape and dtype and recreated as zeros; every other attribute is a tensor to save."""
    nodes = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            raise GraphFormatError(f"node {node.name} calls submodule {node.target!r}; only flat graphs are stored")
        target = _target_name(node.target) if node.op == "call_function" else node.target
        nodes.append({"name": node.name, "op": node.op, "target": target,
                      "args": _encode(node.args), "kwargs": _encode(node.kwargs)})
    codegen = gm.graph._codegen
    calling = None
    if isinstance(codegen, _PyTreeCodeGen):
        info = codegen.pytree_info
        calling = {"orig_args": list(info.orig_args),
                   "in_spec": None if info.in_spec is None else pytree.treespec_dumps(info.in_spec),
                   "out_spec": None if info.out_spec is None else pytree.treespec_dumps(info.out_spec)}
    parameters = {name for name, _ in gm.named_parameters()}
    buffers = {name for name, _ in gm.named_buffers()}
    attributes = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        tensor = attr_tensor(gm, node.target)
        if not isinstance(tensor, torch.Tensor):
            raise GraphFormatError(f"node {node.name} reads {node.target}, a {type(tensor).__name__}, not a tensor")
        kind = "parameter" if node.target in parameters else "buffer" if node.target in buffers else "constant"
        attributes[node.target] = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."),
                                   "kind": kind, "state": node.target in state}
    meta = dict(gm.meta.get(META_KEY, {}))
    meta["example_inputs"] = [_example(v) for v in meta.get("example_inputs", ())]
    return {"schema": SCHEMA, "nodes": nodes, "calling": calling, "attributes": attributes, "meta": meta}


def graph_from_json(body: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                    device: torch.device) -> GraphModule:
    """The GraphModule ``graph_to_json`` described, reading each stored attribute from ``tensors``
    (by attribute name; shapes and dtypes must match) and creating state attributes as zeros."""
    if body.get("schema") != SCHEMA:
        raise GraphFormatError(f"graph schema {body.get('schema')!r}; this asaf_fx reads {SCHEMA!r}")
    root = torch.nn.Module()
    for name, spec in body["attributes"].items():
        dtype = _torch_attr("dtype", spec["dtype"], torch.dtype)
        if spec["state"]:
            value = torch.zeros(spec["shape"], dtype=dtype, device=device)
        elif name not in tensors:
            raise GraphFormatError(f"tensor {name} is missing")
        else:
            value = tensors[name]
            if list(value.shape) != spec["shape"] or value.dtype != dtype:
                raise GraphFormatError(f"tensor {name} is {value.dtype} {tuple(value.shape)}, the graph reads "
                                       f"{dtype} {tuple(spec['shape'])}")
        _bind(root, name, value, spec["kind"])
    graph = Graph()
    nodes: dict[str, Node] = {}
    for entry in body["nodes"]:
        op, name = entry["op"], entry["name"]
        target = _resolve_target(entry["target"]) if op == "call_function" else entry["target"]
        args = _decode(entry["args"], nodes, device)
        kwargs = _decode(entry["kwargs"], nodes, device)
        if op not in ("placeholder", "get_attr", "call_function", "output"):
            raise GraphFormatError(f"node {name}: unsupported op {op!r}")
        node = graph.create_node(op, target, tuple(args), dict(kwargs), name=name)
        if node.name != name:
            raise GraphFormatError(f"node name {name!r} is not unique")
        nodes[name] = node
    calling = body.get("calling")
    if calling is not None:
        info = _PyTreeInfo(calling["orig_args"],
                           None if calling["in_spec"] is None else pytree.treespec_loads(calling["in_spec"]),
                           None if calling["out_spec"] is None else pytree.treespec_loads(calling["out_spec"]))
        graph._codegen = _PyTreeCodeGen(info)
    gm = GraphModule(root, graph)
    meta = dict(body.get("meta", {}))
    meta["example_inputs"] = tuple(_example_back(v, device) for v in meta.get("example_inputs", ()))
    gm.meta[META_KEY] = meta
    return gm


def _bind(root: torch.nn.Module, name: str, value: torch.Tensor, kind: str) -> None:
    owner = root
    *path, leaf = name.split(".")
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    if kind == "parameter":
        owner.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
    elif kind == "buffer":
        owner.register_buffer(leaf, value)
    elif kind == "constant":  # what export lifts out of the model's code (e.g. a tensor literal)
        setattr(owner, leaf, value)
    else:
        raise GraphFormatError(f"attribute {name} has unknown kind {kind!r}")

