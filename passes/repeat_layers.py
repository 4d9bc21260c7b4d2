"""Capture a deep model by tracing its first decoder layers and repeating the last one traced.

``torch.export`` spends about the same time on every decoder layer it traces, and a Llama-family
model runs one block of code once per layer. So an L-layer model is traced with its layer list cut
to its first ``TRACED`` layers, and layers TRACED..L−1 are written into the graph as copies of the
last traced layer, each reading its own weights and writing its own KV-cache tensors.

A copy is made only where the graph shows it is sound. Layers are told apart by the residual
stream (``split_layers``), and the last traced layer must be the one before it node for node, with
every layer-indexed name advanced by one (``layers.1.`` → ``layers.2.``, ``key_cache_1`` →
``key_cache_2``). What a layer reads from outside itself comes in four kinds: the previous layer's
output; weights named by layer index (each copy reads its own); tensors it writes in place, the
static cache (each copy gets a fresh one of the same shape, as a whole trace gives every layer);
and values built before the layers — positions, RoPE tables, masks — which a copy takes from the
last traced layer, or, where they are built from layer-indexed tensors, finds (or rebuilds, when no
op writes in place on the way) for its own index. Anything else, and any model whose layers differ
in class, attributes, tensor shapes or hooks, is traced whole (``repeat_last_layer`` returns False and changes nothing).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Hashable, Iterator
from typing import Any

import torch
from torch.fx import GraphModule, Node

from asaf_fx.passes.graph_utils import attr_tensor, bind_tensor, written_attrs
from asaf_fx.passes.infra import PatternError
from asaf_fx.passes.split_layers import layer_ends, layer_partitions

TRACED = 3  # two layers to compare, the first one apart: layer 0 reads the embedding, not a layer


class NotRepeatable(Exception):
    """The traced layers do not prove that the last one can stand for the untraced ones."""


def decoder_stack(root: torch.nn.Module, num_layers: int) -> str | None:
    """Path of the one ModuleList of ``num_layers`` interchangeable layers, or None.

    Interchangeable: the same class and, module by module, the same attributes (``layer_idx``
    aside), tensor shapes and dtypes, and no hooks.
    """
    if num_layers <= TRACED:
        return None
    stacks = [name for name, m in root.named_modules()
              if isinstance(m, torch.nn.ModuleList) and len(m) == num_layers]
    if len(stacks) != 1:
        return None
    layers = root.get_submodule(stacks[0])
    signatures = {_signature(layer) for layer in layers}
    return stacks[0] if len(signatures) == 1 else None


def _signature(layer: torch.nn.Module) -> Hashable:
    parts = []
    for name, m in layer.named_modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return object()  # unique: never equal to another layer's
        attrs = tuple(sorted((k, v) for k, v in vars(m).items()
                             if not k.startswith("_") and k not in ("layer_idx", "training")
                             and isinstance(v, (bool, int, float, str, type(None)))))
        tensors = tuple((k, tuple(t.shape), t.dtype, t.device) for k, t in
                        (*m._parameters.items(), *m._buffers.items()) if t is not None)
        parts.append((name, type(m), attrs, tensors))
    return tuple(parts)


@contextlib.contextmanager
def first_layers(root: torch.nn.Module, path: str, count: int) -> Iterator[None]:
    """Temporarily hold only the first ``count`` layers of the ModuleList at ``path``."""
    owner_path, _, attr = path.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    full = getattr(owner, attr)
    setattr(owner, attr, torch.nn.ModuleList(list(full)[:count]))
    try:
        yield
    finally:
        setattr(owner, attr, full)


def renamed(target: str, old: int, new: int) -> str:
    """``target`` with every dot- or underscore-delimited index ``old`` replaced by ``new``."""
    return re.sub(rf"(?<=[._]){old}(?=[._]|$)", str(new), target)


def repeat_last_layer(gm: GraphModule, root: torch.nn.Module, num_layers: int) -> bool:
    """Extend ``gm`` (``root`` traced with its first TRACED layers) to ``num_layers`` layers.

    ``root`` must hold all its layers again: the copies' weights are read from it. Returns False,
    with ``gm`` untouched, when the graph does not prove the copies sound.
    """
    try:
        plan = _Plan(gm, root, num_layers)
    except (NotRepeatable, PatternError):
        return False
    for index in range(TRACED, num_layers):
        plan.append_copy(index)
    gm.recompile()
    return True


class _Plan:
    """Checks that the last traced layer repeats the one before it, then appends copies of it."""

    def __init__(self, gm: GraphModule, root: torch.nn.Module, num_layers: int) -> None:
        self.gm, self.root = gm, root
        ends = layer_ends(gm)
        if len(ends) != TRACED:
            raise NotRepeatable(f"traced {len(ends)} layers, expected {TRACED}")
        partition = layer_partitions(gm, ends)
        blocks = [[n for n in gm.graph.nodes if partition.get(n) == k + 1 and n.op != "get_attr"]
                  for k in range(TRACED)]
        odd = next((n for block in blocks for n in block if n.op != "call_function"), None)
        if odd is not None:
            raise NotRepeatable(f"layer node {odd.name} is a {odd.op}, not an op")
        self.last = TRACED - 1
        self.block, self.template_end, self.before = blocks[-1], ends[-1], ends[-2]
        self.end = self.template_end  # the output of the last layer so far
        self.prologue = {n for n in gm.graph.nodes if partition.get(n) == 0}
        self.written = written_attrs(gm)
        self.index: dict[Hashable, Node] = {}
        self.memos: dict[int, dict] = {}  # layer index read → memo of _key
        for node in gm.graph.nodes:
            if node in self.prologue:
                self.index.setdefault(self._key_for(node, self.last), node)
        self._check_outputs(blocks[-1], ends[-1])
        self._check_outputs(blocks[-2], ends[-2])
        self._compare(blocks[-2], blocks[-1], ends[-3], ends[-2])
        inside = set(self.block)
        self.outside_users = [u for u in self.end.users if u not in inside]
        self.inputs = list(dict.fromkeys(a for n in self.block for a in n.all_input_nodes
                                         if a not in inside and a is not self.before))
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.made: dict[tuple[Node, int], Node] = {}
        for index in range(TRACED, num_layers):  # everything can be had before anything is written
            for node in self.inputs:
                self._counterpart(node, index, build=False)
        self.cursor = self.block[-1]

    # --- checks ---

    @staticmethod
    def _check_outputs(block: list[Node], end: Node) -> None:
        inside = set(block)
        leaks = [n for n in block if n is not end and any(u not in inside for u in n.users)]
        if leaks:
            raise NotRepeatable(f"{leaks[0].name} is read outside its layer")

    def _key_for(self, node: Node, index: int) -> Hashable:
        """``node``'s key with the last traced layer's index read as ``index``."""
        return self._key(node, self.last, index, self.memos.setdefault(index, {}))

    def _key(self, node: Any, old: int, new: int, memo: dict) -> Hashable:
        """What a value outside the layers computes, with layer index ``old`` read as ``new``."""
        if isinstance(node, (list, tuple)):
            return type(node).__name__, tuple(self._key(v, old, new, memo) for v in node)
        if isinstance(node, dict):
            return "dict", tuple((k, self._key(v, old, new, memo)) for k, v in node.items())
        if not isinstance(node, Node):
            return "value", repr(node)
        if node not in memo:
            if node.op == "get_attr":
                memo[node] = "attr", renamed(node.target, old, new)
            elif node.op == "call_function":
                memo[node] = (str(node.target), self._key(node.args, old, new, memo),
                              self._key(node.kwargs, old, new, memo))
            else:
                memo[node] = node.op, node.name
        return memo[node]

    def _compare(self, first: list[Node], second: list[Node], first_in: Node, second_in: Node) -> None:
        """``second`` must be ``first`` with layer index last−1 read as last, node for node."""
        if len(first) != len(second):
            raise NotRepeatable(f"the last two traced layers have {len(first)} and {len(second)} nodes")
        pairs = dict(zip(first, second, strict=True))
        pairs[first_in] = second_in
        memo_first: dict = {}

        def same(a: Any, b: Any) -> bool:
            if isinstance(a, (list, tuple)):
                return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
            if isinstance(a, dict):
                return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
            if not isinstance(a, Node) or not isinstance(b, Node):
                return not isinstance(b, Node) and type(a) is type(b) and a == b
            if a in pairs:
                return pairs[a] is b
            if a.op == "get_attr" or b.op == "get_attr":
                return a.op == b.op and self._same_attr(a, b)
            return self._key(a, self.last - 1, self.last, memo_first) == self._key_for(b, self.last)

        for a, b in pairs.items():
            if a is first_in:
                continue
            if a.target != b.target or not same(a.args, b.args) or not same(a.kwargs, b.kwargs):
                raise NotRepeatable(f"{b.name} does not repeat {a.name}")

    def _same_attr(self, a: Node, b: Node) -> bool:
        ta, tb = attr_tensor(self.gm, a.target), attr_tensor(self.gm, b.target)
        if not isinstance(ta, torch.Tensor) or (ta.shape, ta.dtype) != (tb.shape, tb.dtype):
            return False
        if (a in self.written) != (b in self.written):
            return False
        if a in self.written:
            return a is not b  # each layer writes its own state
        indexed = renamed(a.target, self.last - 1, self.last) == b.target
        return indexed or a is b or torch.equal(ta, tb)

    # --- copying ---

    def _counterpart(self, node: Node, index: int, build: bool) -> Node | None:
        """The value layer ``index`` reads where the last traced layer reads ``node`` (from outside
        the layer). With ``build`` False only checks that it can be had; otherwise finds or makes it."""
        if (node, index) in self.made:
            return self.made[node, index]
        key = self._key_for(node, index)
        if node not in self.written and key == self._key_for(node, self.last):
            return node  # the same value for every layer
        found = self.index.get(key)
        if found is not None and node not in self.written:
            if self.order[found] > self.order[self.block[-1]]:
                raise NotRepeatable(f"{found.name}, layer {index}'s {node.name}, comes after the layers")
            return found
        if node.op == "get_attr":
            made = self._new_attr(node, index, build)
        elif node.op == "call_function" and not _writes(node):
            args = [self._counterpart(a, index, build) for a in node.all_input_nodes]
            made = None
            if build:
                env = dict(zip(node.all_input_nodes, args, strict=True))
                with self.gm.graph.inserting_after(self.cursor):
                    made = self.cursor = self.gm.graph.node_copy(node, lambda a: env[a])
        else:
            raise NotRepeatable(f"no counterpart of {node.name} for layer {index}")
        if build:
            self.made[node, index] = made
        return made

    def _new_attr(self, node: Node, index: int, build: bool) -> Node | None:
        """A get_attr for layer ``index``'s own tensor: a fresh copy of written state (each layer's
        cache starts as the traced layer's does), else the weight its renamed target names."""
        if node in self.written:
            target = f"{renamed(node.target, self.last, index)}_repeated"
            value = attr_tensor(self.gm, node.target).clone() if build else None
        else:
            target, value = renamed(node.target, self.last, index), None
            for owner in (self.gm, self.root):
                with contextlib.suppress(AttributeError):
                    value = attr_tensor(owner, target)
                    break
            if value is None:
                raise NotRepeatable(f"no tensor {target} for layer {index}")
        if not build:
            return None
        bind_tensor(self.gm, target, value)
        with self.gm.graph.inserting_after(self.cursor):
            self.cursor = self.gm.graph.get_attr(target)
        return self.cursor

    def append_copy(self, index: int) -> None:
        env: dict[Node, Node] = {self.before: self.end}
        for node in self.inputs:
            env[node] = self._counterpart(node, index, build=True)
        graph = self.gm.graph
        for node in self.block:
            with graph.inserting_after(self.cursor):
                copy = graph.node_copy(node, lambda a: env[a])
            stack = node.meta.get("nn_module_stack")
            if stack:
                copy.meta["nn_module_stack"] = {renamed(k, self.last, index): (renamed(v[0], self.last, index), *v[1:])
                                                for k, v in stack.items()}
            env[node] = self.cursor = copy
        for user in self.outside_users:
            user.replace_input_with(self.end, env[self.template_end])
        self.end = env[self.template_end]


def _writes(node: Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is None or any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
