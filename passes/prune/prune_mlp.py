"""Remove whole SwiGLU intermediate channels: rows of gate_proj and up_proj, columns of down_proj.

Preserves: nothing exactly — this is pruning. With down_proj not refitted, the pruned MLP equals
the unpruned one with the removed channels' activations h_j forced to zero. The weights really
shrink, so every later pass and kernel (the online Hadamard before down_proj included) works on
the smaller width.

Which channels go is decided elsewhere (:func:`select_mlp_channels`, from calibration statistics);
the pass only applies a list of kept indices per MLP, in graph order = decoder-layer order. It must
run before the online Hadamard before down_proj, whose rotation mixes down_proj's columns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from asaf_fx.passes.graph_utils import get_tensor, linear_bias, set_tensor, update_tensor
from asaf_fx.passes.infra import META_KEY, PassResult, PatternError
from asaf_fx.passes.layerwise import LayerwiseRunner, State
from asaf_fx.passes.linear_stats import LinearStats, collect_linear_stats
from asaf_fx.passes.patterns import find_swiglus
from asaf_fx.passes.prune.channel_selection import (
    channel_importance,
    channels_to_keep,
    channels_to_remove,
    refit_down_proj,
)
from asaf_fx.passes.split_layers import decoder_linears


@dataclass(frozen=True)
class MlpPruning:
    """Kept channel indices (ascending) of one MLP, and optionally its refitted down_proj weight."""

    keep: torch.Tensor
    down_weight: torch.Tensor | None = None


class PruneMlpChannels:
    """Apply one :class:`MlpPruning` (or None: leave it whole) to each SwiGLU MLP, in layer order."""

    name = "prune_mlp"

    def __init__(self, prunings: Sequence[MlpPruning | None]) -> None:
        self.prunings = list(prunings)

    def __call__(self, gm: GraphModule) -> PassResult:
        mlps = find_swiglus(gm)
        if len(mlps) != len(self.prunings):
            raise PatternError(f"prune_mlp: the graph has {len(mlps)} SwiGLU MLPs but {len(self.prunings)} "
                               "prunings were given (one per decoder layer)")
        widths = []
        for mlp, pruning in zip(mlps, self.prunings, strict=True):
            width = get_tensor(gm, mlp.down.args[1]).shape[1]
            kept = width if pruning is None else len(pruning.keep)
            widths.append({"width": int(width), "kept": int(kept)})
            if pruning is None or kept == width:
                continue
            keep = pruning.keep.to(torch.long)
            for linear in (mlp.gate, mlp.up):
                update_tensor(gm, linear.args[1], lambda w: w[keep])
                if (bias := linear_bias(linear)) is not None:
                    update_tensor(gm, bias, lambda b: b[keep])
            down = get_tensor(gm, mlp.down.args[1])
            if pruning.down_weight is not None:
                if pruning.down_weight.shape != (down.shape[0], kept):
                    raise ValueError(f"prune_mlp: refitted down_proj weight has shape "
                                     f"{tuple(pruning.down_weight.shape)}, "
                                     f"expected {(down.shape[0], kept)}")
                set_tensor(gm, mlp.down.args[1].target, pruning.down_weight.to(down.dtype).contiguous())
            else:
                update_tensor(gm, mlp.down.args[1], lambda w: w[:, keep])
        gm.meta.setdefault(META_KEY, {})["mlp_widths"] = widths
        return PassResult(gm, True)


def layer_linear_flops(gm: GraphModule) -> list[int]:
    """Linear FLOPs per token (2 per multiply-add) of each decoder layer, from its weights' shapes."""
    return [sum(2 * get_tensor(gm, n.args[1]).numel() for n in layer) for layer in decoder_linears(gm)]


def channels_removed(gm: GraphModule, sparsities: Sequence[float], granularity: int = 32) -> list[int]:
    """MLP channels each decoder layer of ``gm`` loses at its sparsity (0 where it is 0)."""
    return [
        channels_to_remove(flops, *get_tensor(gm, mlp.down.args[1]).shape, sparsity, granularity) if sparsity > 0 else 0
        for flops, mlp, sparsity in zip(layer_linear_flops(gm), find_swiglus(gm), sparsities, strict=True)
    ]


def _down_inputs(runner: LayerwiseRunner, states: list[State], wanted: Callable[[int], bool]
                 ) -> Iterator[tuple[int, str, torch.Tensor, LinearStats | None]]:
    """Per decoder layer: (layer, down_proj weight attribute, its weight, statistics of its input
    on ``states`` — or None where ``wanted(layer)`` is false). ``states`` advance through every
    (unpruned) layer, so each layer's statistics come from the inputs the dense model sees."""
    mlps = find_swiglus(runner.split.source)
    if len(mlps) != runner.num_layers:
        raise ValueError(f"{len(mlps)} SwiGLU MLPs found for {runner.num_layers} decoder layers")
    for layer, mlp in enumerate(mlps):
        target = mlp.down.args[1].target
        down = get_tensor(runner.split.source, mlp.down.args[1]).detach()  # the split module reads the same tensor
        stats = collect_linear_stats(runner, layer, states)[target] if wanted(layer) else None
        yield layer, target, down, stats
        states[:] = [runner.run_layer(layer, state) for state in states]


def channel_statistics(runner: LayerwiseRunner, states: list[State], refit: bool
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """What :func:`select_mlp_channels` decides from, for every layer: the :func:`channel_importance`
    of its MLP channels and, with ``refit``, the ``E[h hᵀ]`` of down_proj's input its refit solves
    with (else None)."""
    importances, grams = [], []
    for _, _, down, stats in _down_inputs(runner, states, lambda _: True):
        importances.append(channel_importance(down, stats.mean_square))
        grams.append(stats.hessian / stats.rows if refit else None)
    return importances, grams


def select_mlp_channels(
    runner: LayerwiseRunner,
    states: list[State],
    sparsities: Sequence[float],
    granularity: int = 32,
    refit: bool = True,
) -> list[MlpPruning | None]:
    """Which channels each layer keeps at its sparsity, from activation statistics on ``states``.

    ``runner`` runs the (rotated, unpruned) forward graph layer by layer; ``states`` are its
    calibration states at layer 0 and are advanced through every layer (unpruned), so each layer's
    statistics come from the same inputs the dense model sees. Layers with sparsity 0 are skipped.
    """
    if len(sparsities) != runner.num_layers:
        raise ValueError(f"{len(sparsities)} sparsities for {runner.num_layers} decoder layers")
    removed = channels_removed(runner.split.source, sparsities, granularity)
    result: list[MlpPruning | None] = []
    for layer, _, down, stats in _down_inputs(runner, states, lambda i: removed[i] > 0):
        if stats is None:
            result.append(None)
            continue
        keep = channels_to_keep(channel_importance(down, stats.mean_square), removed[layer])
        refitted = refit_down_proj(down, stats.hessian / stats.rows, keep) if refit else None
        result.append(MlpPruning(keep, refitted))
    return result
