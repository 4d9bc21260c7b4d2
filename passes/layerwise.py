"""Run a :class:`LayerSplit` part by part, keeping only the values later parts still need.

``state = runner.start_tokens(input_ids)`` runs the prologue; ``runner.run_layer(i, state)`` advances
through decoder layer i; ``runner.finish(state)`` runs the epilogue and returns the logits.
After each part the state drops every value no later part reads, so a state taken before layer i
is exactly what resuming at layer i needs (the hidden states plus shared values such as RoPE
tables and masks): calibration caches it to evaluate layers i..p−1 without re-running 0..i−1.
States hold references, not copies; ``run_layer`` returns a new state and leaves its input alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.fx import GraphModule, Interpreter, Node

from asaf_fx.passes.capture import graph_inputs
from asaf_fx.passes.split_layers import LayerSplit

State = dict[Node, Any]
LayerCall = Callable[[GraphModule, tuple], Any]


class LayerwiseRunner:
    def __init__(self, split: LayerSplit) -> None:
        self.split = split
        module = split.module
        order = [split.prologue, *split.layers, split.epilogue]
        part_of = {name: k for k, name in enumerate(order)}
        self._last = len(order) - 1
        segment: dict[Node, int] = {}
        for node in module.graph.nodes:
            if node.op == "placeholder":
                segment[node] = 0
            elif node.op == "call_module":
                segment[node] = part_of[node.target]
            elif node.op == "call_function":  # getitem on a part's outputs
                segment[node] = max(segment[a] for a in node.all_input_nodes)
            elif node.op == "output":
                segment[node] = self._last
        for node in module.graph.nodes:
            if node.op == "get_attr":
                segment[node] = min((segment[u] for u in node.users), default=0)
        self._segments: list[list[Node]] = [[] for _ in order]
        for node in module.graph.nodes:
            self._segments[segment[node]].append(node)
        # The last part that reads each value: after it, the value can be dropped.
        self._last_use = {n: max((segment[u] for u in n.users), default=segment[n]) for n in module.graph.nodes}
        self._interpreter = Interpreter(module, garbage_collect_values=False)
        self._calls = {part_of[n.target]: n for n in module.graph.nodes if n.op == "call_module"}

    @property
    def num_layers(self) -> int:
        return self.split.num_layers

    def layer_module(self, layer: int) -> GraphModule:
        return getattr(self.split.module, self.split.layers[layer])

    def parameter_targets(self, layer: int) -> dict[str, str]:
        """Placeholder name in the layer's submodule → attribute of the parameter it receives."""
        call = self._calls[layer + 1]
        placeholders = [n.name for n in self.layer_module(layer).graph.find_nodes(op="placeholder")]
        return {
            placeholder: arg.target
            for placeholder, arg in zip(placeholders, call.args, strict=True)
            if isinstance(arg, Node) and arg.op == "get_attr"
        }

    def _run(self, index: int, state: State, call: LayerCall | None = None,
             replace: Mapping[str, torch.Tensor] | None = None) -> State:
        interpreter = self._interpreter
        env = dict(state)
        interpreter.env = env
        for node in self._segments[index]:
            if node.op == "get_attr":
                env[node] = interpreter.fetch_attr(node.target)
            elif (call is not None or replace) and node is self._calls.get(index):
                args = interpreter.fetch_args_kwargs_from_env(node)[0]
                if replace:
                    # By argument, not in env: a constant shared by several layers (one Hadamard
                    # factor per width) is fetched once, before the first layer that reads it.
                    args = tuple(replace.get(a.target, v) if isinstance(a, Node) and a.op == "get_attr" else v
                                 for a, v in zip(node.args, args, strict=True))
                submodule = getattr(self.split.module, node.target)
                env[node] = submodule(*args) if call is None else call(submodule, args)
            elif node.op == "output":
                env[node] = interpreter.fetch_args_kwargs_from_env(node)[0][0]
            else:
                env[node] = interpreter.run_node(node)
        return {n: v for n, v in env.items() if self._last_use[n] > index or n.op == "output"}

    def start_tokens(self, input_ids: torch.Tensor) -> State:
        """Run the prologue on token ids (B, T), scored from an empty cache."""
        return self.start(*graph_inputs(self.split.source, input_ids))

    def start(self, *inputs: Any) -> State:
        """Run the prologue on the graph's inputs (``asaf_fx.passes.capture.graph_inputs``)."""
        self._interpreter.args_iter = iter(inputs)
        with torch.no_grad():
            return self._run(0, {})

    def run_layer(self, layer: int, state: State, call: LayerCall | None = None,
                  replace: Mapping[str, torch.Tensor] | None = None) -> State:
        """Advance ``state`` through decoder layer ``layer``.

        ``call(submodule, args)``, if given, runs the layer's submodule instead of ``submodule(*args)``
        (to record statistics, say); it must return what the submodule returns. ``replace`` maps
        attributes of the split module (weights, constants) to tensors this layer reads instead,
        for this call only — how calibration runs a pruned variant of one layer.
        """
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} is out of range for {self.num_layers} decoder layers")
        if replace:
            read = set(self.parameter_targets(layer).values())
            unknown = sorted(set(replace) - read)
            if unknown:
                raise KeyError(f"layer {layer} reads no attribute named {unknown}")
        with torch.no_grad():
            return self._run(layer + 1, state, call, replace)

    def finish(self, state: State) -> tuple:
        """Run the epilogue; returns the graph's output (the logits)."""
        with torch.no_grad():
            env = self._run(self._last, state)
        return next(v for n, v in env.items() if n.op == "output")

    def run(self, *inputs: Any) -> tuple:
        state = self.start(*inputs)
        for layer in range(self.num_layers):
            state = self.run_layer(layer, state)
        return self.finish(state)
