"""Record, for every linear of one decoder layer, what quantization and pruning need to know.

For each linear whose weight is a parameter, the layer is run on calibration states and the
linear's input rows x (flattened over batch and sequence) are accumulated into

* ``hessian = Σ x xᵀ`` (float64, in_features²): GPTQ's H, and the Gram matrix of down_proj's input
  that the least-squares pruning refit uses;
* ``rows``: how many rows were summed, so ``hessian / rows`` is ``E[x xᵀ]`` and its diagonal the
  mean squared activation per input channel (the activation part of the pruning score).

Only one layer runs at a time and its inputs arrive as cached states, so a caller can keep the
states and the other layers' weights off the accelerator. Linears are found as ``aten.linear``
nodes whose weight is a graph input bound to a parameter, never by module names; statistics are
keyed by that parameter's attribute name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Interpreter, Node

from asaf_fx.passes.graph_utils import aten, is_op
from asaf_fx.passes.layerwise import LayerwiseRunner, State


@dataclass
class LinearStats:
    hessian: torch.Tensor
    rows: int = 0

    @property
    def mean_square(self) -> torch.Tensor:
        return torch.diagonal(self.hessian) / max(self.rows, 1)


class _Recorder(Interpreter):
    """Runs one layer submodule, adding each recorded linear's input rows to its statistics.

    Linears reading the same value (q/k/v, gate/up) share one statistics object, accumulated once.
    ``add`` is the one place rows are accumulated, so an experiment can record other statistics
    without copying the graph walk.
    """

    def __init__(self, module: GraphModule, targets: dict[str, str], stats: dict[str, LinearStats]) -> None:
        super().__init__(module)
        self.targets = targets
        self.stats = stats
        self.by_input: dict[Node, LinearStats] = {}

    def run_node(self, node: Node):
        if is_op(node, aten.linear) and isinstance(node.args[1], Node) and node.args[1].name in self.targets:
            source, target = node.args[0], self.targets[node.args[1].name]
            if source in self.by_input:
                self.stats.setdefault(target, self.by_input[source])
            else:
                x = self.env[source]
                self.by_input[source] = self.add(target, x.detach().reshape(-1, x.shape[-1]))
        return super().run_node(node)

    def add(self, target: str, rows: torch.Tensor) -> LinearStats:
        """Accumulate one batch of ``target``'s input rows (rows × in_features) into its statistics."""
        rows = rows.to(torch.float64)
        entry = self.stats.get(target)
        if entry is None:
            zeros = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=rows.device)
            entry = self.stats[target] = LinearStats(zeros)
        entry.hessian += rows.T @ rows
        entry.rows += rows.shape[0]
        return entry


def collect_linear_stats(runner: LayerwiseRunner, layer: int, states: list[State]) -> dict[str, LinearStats]:
    """Statistics of every parameter-backed linear in decoder layer ``layer`` over ``states``."""
    targets = runner.parameter_targets(layer)
    stats: dict[str, LinearStats] = {}

    def record(module: GraphModule, args: tuple):
        return _Recorder(module, targets, stats).run(*args)

    for state in states:
        runner.run_layer(layer, state, call=record)
    if not stats:
        raise ValueError(f"decoder layer {layer} has no linear whose weight is a parameter; nothing to calibrate")
    return stats
