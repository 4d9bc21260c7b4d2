"""Pass infrastructure: a result type, a clear error type and a manager that checks every pass.

Mirrors ``torch.fx.passes.infra``: a pass takes a GraphModule and returns ``PassResult(graph_module,
modified)``. ``PassManager`` runs passes in order and, after each one that changed the graph's
structure or a tensor's shape, lints it, regenerates its code and re-propagates shapes
(``node.meta["val"]``) with fake tensors on the example inputs recorded at capture, so a pass that
leaves a broken graph is named at once.

Shape propagation dispatches each distinct (op, argument metadata) once per run: a decoder's layers
repeat the same ops on the same shapes, so one layer's worth of fake dispatches serves them all.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import GraphModule, Node
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

log = logging.getLogger(__name__)

META_KEY = "asaf_fx"  # gm.meta[META_KEY]: capture record (kind, example inputs, rotations, ...)


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the (possibly rewritten in place) module and whether it changed."""

    graph_module: GraphModule
    modified: bool


class PatternError(ValueError):
    """A pass did not find the graph pattern it needs; names the node where matching failed."""

    def __init__(self, message: str, node: Node | None = None) -> None:
        where = f" (at node {node.name!r}: {node.format_node()})" if node is not None else ""
        super().__init__(message + where)
        self.node = node


class PassFailedError(RuntimeError):
    """A pass ran but left a graph that does not lint or does not propagate shapes."""


GraphPass = Callable[[GraphModule], PassResult]


def pass_name(p: GraphPass) -> str:
    return getattr(p, "name", None) or getattr(p, "__name__", None) or type(p).__name__


def _meta_key(value: Any) -> Any:
    """What an op's output metadata can depend on in ``value``; raises TypeError for the unhashable."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.stride(), value.storage_offset(), value.dtype, value.device,
                value.requires_grad)
    if isinstance(value, (list, tuple)):
        return type(value), tuple(_meta_key(v) for v in value)
    if isinstance(value, dict):
        return dict, tuple((k, _meta_key(v)) for k, v in value.items())
    if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
        raise TypeError("symbolic value")  # only concrete example inputs are memoised
    hash(value)
    return type(value), value


class _MemoisedFakeProp(FakeTensorProp):
    """FakeTensorProp that reuses the result of an earlier node with the same op and argument metadata.

    Only metadata is read from ``node.meta["val"]`` (shape, dtype, strides), so nodes may share one
    fake result; ops whose result metadata depends on more than their arguments' are not memoised.
    """

    def __init__(self, gm: GraphModule, mode: FakeTensorMode) -> None:
        super().__init__(gm, mode)
        self._memo: dict[Any, Any] = {}

    def run_node(self, n: Node) -> Any:
        if (n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload) or n.target._schema.is_mutable
                or torch.Tag.data_dependent_output in n.target.tags):
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        try:
            key = (n.target, _meta_key(args), _meta_key(kwargs))
        except TypeError:
            return super().run_node(n)
        if key not in self._memo:
            self._memo[key] = (super().run_node(n), n.meta.get("val"))
        else:
            n.meta["val"] = self._memo[key][1]
        return self._memo[key][0]


def propagate_shapes(gm: GraphModule, example_inputs: Sequence[Any] | None = None) -> None:
    """Recompute ``node.meta["val"]`` for every node with fake tensors (no real compute).

    ``example_inputs`` are in placeholder order; by default the ones recorded at capture.
    """
    if example_inputs is None:
        example_inputs = gm.meta.get(META_KEY, {}).get("example_inputs")
    if example_inputs is None:
        raise ValueError("no example inputs to propagate shapes with; capture the graph with asaf_fx.passes.capture")
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    # Autograd runs above the fake mode and sees the real tensors the graph reads. With grad on, the
    # decode graph's index_copy_ into its real static-cache tensors gives them a backward graph that
    # reaches the weights, and every later propagation chains onto it: the model's parameters and
    # each pass's weights would stay alive as long as the compiled model.
    with torch.no_grad():
        _MemoisedFakeProp(gm, mode).propagate(*example_inputs)


def check_graph(gm: GraphModule) -> None:
    """Lint, regenerate code and re-propagate shapes; raises whatever goes wrong."""
    gm.graph.lint()
    gm.recompile()
    propagate_shapes(gm)


def _structure(gm: GraphModule) -> tuple:
    """What node shapes depend on: every node's op, target and inputs, and the shape and dtype of every
    tensor the module holds."""
    def arg_key(value: Any) -> Any:
        if isinstance(value, Node):
            return ("node", value.name)
        if isinstance(value, (list, tuple)):
            return type(value), tuple(arg_key(v) for v in value)
        if isinstance(value, dict):
            return dict, tuple((k, arg_key(v)) for k, v in value.items())
        return repr(value)

    nodes = tuple((n.name, n.op, n.target if isinstance(n.target, str) else id(n.target), arg_key(n.args),
                   arg_key(n.kwargs)) for n in gm.graph.nodes)
    tensors = tuple((name, tuple(t.shape), t.dtype) for name, t in
                    itertools.chain(gm.named_parameters(), gm.named_buffers()))
    return nodes, tensors


class PassManager:
    """Runs ``passes`` in order; after each that modified the graph, checks it (see module doc)."""

    def __init__(self, passes: Sequence[GraphPass], *, check: bool | str = True) -> None:
        if check not in (True, False, "end"):
            raise ValueError(f"check must be True, False or 'end', got {check!r}")
        self.passes = list(passes)
        self.check = check

    # A pass that computes a weight from one that requires grad (a capture's parameters do) would
    # otherwise store it with a backward graph that keeps the old weight alive.
    @torch.no_grad()
    def __call__(self, gm: GraphModule) -> PassResult:
        modified = False
        for p in self.passes:
            name = pass_name(p)
            before = _structure(gm) if self.check is True else None
            result = p(gm)
            if not isinstance(result, PassResult):
                raise TypeError(f"pass {name} returned {type(result).__name__}, expected PassResult")
            gm = result.graph_module
            modified |= result.modified
            log.debug("pass %s: modified=%s", name, result.modified)
            # A pass that changed only tensor values (a rotation folded into weights) leaves every
            # node's shape as it was: propagating them again would cost a full fake run for nothing.
            if result.modified and self.check is True and _structure(gm) != before:
                try:
                    check_graph(gm)
                except Exception as exc:
                    raise PassFailedError(f"pass {name} left an invalid graph: {exc}") from exc
            gm.meta.setdefault(META_KEY, {}).setdefault("passes", []).append(name)
        if modified and self.check == "end":
            try:
                check_graph(gm)
            except Exception as exc:
                names = ", ".join(pass_name(p) for p in self.passes)
                raise PassFailedError(f"passes {names} left an invalid graph: {exc}") from exc
        return PassResult(gm, modified)
