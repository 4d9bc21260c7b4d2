"""Choose each linear's activation clip ratio by the error it causes in that linear's output.

Per-token symmetric quantization scales a row x by ``clip · max|x|``: a smaller clip saturates the
few largest entries and rounds all the others more finely. Which side wins depends on the layer
(on SmolLM2 most inputs want 0.7–0.75, a few down_proj inputs carrying outlier tokens want
0.9–1.0), so one global ratio is a compromise. For a decoder layer, on the calibration states,
this runs the layer and, for every linear whose input is quantized at ``bits`` and for every ratio
``c`` on :data:`CLIP_GRID`, sums ``‖(Q_c(x) − x) Wᵀ‖²`` over the calibration rows, where ``Q_c`` is
the quantize-dequantize rule the kernels apply. Linears reading the same value at the same bits
(q/k/v, gate/up) share one quantization in the lowered graph, so they share one choice: the ratio
with the smallest error summed over them.

Like :mod:`asaf_fx.passes.linear_stats`, only one layer runs at a time on cached states; memory
beyond the layer's own activations is one quantized copy of one input. At most :data:`MAX_ROWS`
rows of each input are read.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.fx import GraphModule, Interpreter, Node

from asaf_fx.passes.graph_utils import aten, is_op
from asaf_fx.passes.layerwise import LayerwiseRunner, State
from asaf_fx.triton_kernels.quantize import quantize_rows_torch

# 1.0, 0.95, ..., 0.5: below half the range the rounding gain no longer pays for the saturation.
CLIP_GRID = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))
# Rows per input the errors are summed over (the first calibration batches): ample to rank 11
# ratios, and it bounds the search's cost on long calibration sets.
MAX_ROWS = 8192


class _ErrorRecorder(Interpreter):
    """Runs one layer submodule, adding each searched input's output error per clip ratio."""

    def __init__(self, module: GraphModule, targets: dict[str, str], bits: Mapping[str, int],
                 errors: dict[tuple[str, ...], torch.Tensor], rows: dict[tuple[str, ...], int]) -> None:
        super().__init__(module)
        self.targets, self.bits, self.errors, self.rows = targets, bits, errors, rows

    def _target(self, node: Node) -> str | None:
        if is_op(node, aten.linear) and isinstance(node.args[1], Node):
            return self.targets.get(node.args[1].name)
        return None

    def run_node(self, node: Node):
        target = self._target(node)
        if target in self.bits:
            # Every linear reading this input at these bits: their weights are all in env already
            # (placeholders run first), so the group's error is summed in one go, at its first member.
            source, bits = node.args[0], self.bits[target]
            members = [u for u in source.users if self.bits.get(self._target(u)) == bits]
            group = tuple(self._target(u) for u in members)
            if node is members[0] and self.rows.get(group, 0) < MAX_ROWS:
                x = self.env[source].detach()
                rows = x.reshape(-1, x.shape[-1])[:MAX_ROWS - self.rows.get(group, 0)].to(torch.float32)
                weight = torch.cat([self.env[u.args[1]].detach().to(torch.float32) for u in members])
                # ‖D Wᵀ‖² = Σ_rows d (WᵀW) dᵀ: whichever of the two products is narrower.
                gram = weight.T @ weight if weight.shape[0] > weight.shape[1] else None
                error = self.errors.setdefault(group, torch.zeros(len(CLIP_GRID), dtype=torch.float64))
                for i, clip in enumerate(CLIP_GRID):
                    codes, scale = quantize_rows_torch(rows, bits, clip)
                    delta = codes.to(torch.float32) * scale[:, None] - rows
                    error[i] += float(
                        ((delta @ gram) * delta).sum() if gram is not None else (delta @ weight.T).square().sum()
                    )
                self.rows[group] = self.rows.get(group, 0) + rows.shape[0]
        return super().run_node(node)


def search_activation_clips(runner: LayerwiseRunner, layer: int, states: list[State],
                            bits: Mapping[str, int]) -> dict[str, float]:
    """The clip ratio for each linear of decoder layer ``layer`` named in ``bits`` (weight
    attribute → activation bits < 16), chosen on ``states`` as the module docstring says."""
    targets = runner.parameter_targets(layer)
    wanted = {t: b for t, b in bits.items() if t in targets.values()}
    if not wanted:
        return {}
    errors: dict[tuple[str, ...], torch.Tensor] = {}
    rows: dict[tuple[str, ...], int] = {}
    for state in states:
        if rows and min(rows.values()) >= MAX_ROWS:
            break
        runner.run_layer(layer, state, call=lambda module, args: _ErrorRecorder(module, targets, wanted, errors,
                                                                                rows).run(*args))
    chosen = {}
    for group, error in errors.items():
        chosen.update(dict.fromkeys(group, CLIP_GRID[int(error.argmin())]))
    return chosen
