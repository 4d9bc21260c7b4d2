"""The rotated-quantized model that calibration measures, and each layer's pruned variants.

:func:`build_calibration_model` runs ``asaf_fx.compile``'s passes on the model's graph, and where
compile would prune (after the residual rotation, before the online Hadamards) it records what a
pruned layer needs instead: each MLP's channel importance (from the rotated float model, as
compile chooses channels), its dense down_proj weight and, where compile refits down_proj, the
statistics that refit solves with; and, during GPTQ, the statistics of down_proj's input. The
linears are then lowered with *simulated* kernels — dequantized weights in float GEMMs,
activations quantized and dequantized in the graph — which compute what the INT4 kernels compute
up to float rounding (``tests/test_lower_linears.py``), at float-GEMM speed on the CPU and with
weights that are plain tensors to slice.

:meth:`CalibrationModel.variant` gives the tensors decoder layer ``i`` reads when pruned at
``sparsities[k]``, as compile would build them for a plan pruning that layer: gate/up rows of the
removed channels dropped, the kept down_proj columns (refitted as compile refits them) rotated by
the Hadamard of the new width and quantized again (GPTQ with the input statistics restricted to
the kept channels and rotated the same way). The other layers keep their base weights: a table
entry measures pruning one group of an otherwise unpruned quantized model.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from asaf_fx.compile import calibration_batches, linear_lowerings, rewrite
from asaf_fx.config import QuantConfig
from asaf_fx.passes.capture import capture, check_model
from asaf_fx.passes.graph_utils import attr_tensor, get_tensor, is_op, linear_bias
from asaf_fx.passes.layerwise import LayerwiseRunner
from asaf_fx.passes.linear_stats import LinearStats
from asaf_fx.passes.lower.lower_linears import LinearLowering
from asaf_fx.passes.patterns import SwiGLU, find_swiglus
from asaf_fx.passes.prune.channel_selection import (
    channels_to_keep,
    channels_to_remove,
    mlp_channel_flops,
    refit_down_proj,
)
from asaf_fx.passes.prune.prune_mlp import channel_statistics, layer_linear_flops
from asaf_fx.passes.rotate.rotations import online_rotation
from asaf_fx.passes.split_layers import split_decoder_layers

ops = torch.ops.asaf_fx


@dataclass(frozen=True)
class MlpSite:
    """Attributes one SwiGLU MLP reads: its weights, biases and the online Hadamard factor."""

    gate: str
    up: str
    down: str
    gate_bias: str | None
    up_bias: str | None
    rotation: str | None  # the (m, m) factor of hadamard_rotate before down_proj; None if unrotated
    hidden: int
    width: int


def _mlp_sites(gm: GraphModule, mlps: list[SwiGLU]) -> list[MlpSite]:
    """Sites of ``mlps`` (found before the online Hadamard, which the SwiGLU pattern does not cross)."""
    sites = []
    for mlp in mlps:
        source = mlp.down.args[0]
        rotation = source.args[1].target if is_op(source, ops.hadamard_rotate) else None
        hidden, width = get_tensor(gm, mlp.down.args[1]).shape
        biases = [linear_bias(n) for n in (mlp.gate, mlp.up)]
        sites.append(MlpSite(mlp.gate.args[1].target, mlp.up.args[1].target, mlp.down.args[1].target,
                             *(None if b is None else b.target for b in biases), rotation, int(hidden), int(width)))
    return sites


class CalibrationModel:
    """A layer-by-layer runner of the quantized model plus the pruned variants of every layer.

    Attributes:
        runner: runs the simulated rotated-quantized forward graph layer by layer.
        sparsities: the level grid; ``removed[i][k]`` channels of layer i go at level k.
        layer_flops: dense linear FLOPs per token of each layer; ``pruned_flops[i][k]`` after pruning.
    """

    def __init__(self, runner: LayerwiseRunner, quant: QuantConfig, sites: list[MlpSite],
                 importances: list[torch.Tensor], dense_down: list[torch.Tensor], grams: list[torch.Tensor | None],
                 refit_grams: list[torch.Tensor | None], layer_flops: list[int], sparsities: Sequence[float],
                 granularity: int, cache_size: int) -> None:
        self.runner = runner
        self.quant = quant
        self.sites = sites
        self.importances = importances
        self.dense_down = dense_down
        self.grams = grams
        self.refit_grams = refit_grams  # E[h hᵀ] per layer where pruning refits down_proj, else None
        self.layer_flops = layer_flops
        self.sparsities = list(sparsities)
        self.removed = [[channels_to_remove(flops, site.hidden, site.width, s, granularity) for s in self.sparsities]
                        for flops, site in zip(layer_flops, sites, strict=True)]
        self.pruned_flops = [[flops - r * mlp_channel_flops(site.hidden) for r in removed]
                             for flops, site, removed in zip(layer_flops, sites, self.removed, strict=True)]
        self._cache: OrderedDict[tuple[int, int], dict[str, torch.Tensor]] = OrderedDict()
        self._cache_size = cache_size

    @property
    def num_layers(self) -> int:
        return self.runner.num_layers

    def variant(self, layer: int, level: int) -> dict[str, torch.Tensor]:
        """Attribute → tensor for layer ``layer`` pruned at ``sparsities[level]`` (empty: nothing goes)."""
        key = (layer, level)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        tensors = self._build(layer, level)
        self._cache[key] = tensors
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return tensors

    def _build(self, layer: int, level: int) -> dict[str, torch.Tensor]:
        remove = self.removed[layer][level]
        if remove == 0:
            return {}
        site = self.sites[layer]
        module = self.runner.split.module
        keep = channels_to_keep(self.importances[layer], remove)
        tensors = {name: attr_tensor(module, name)[keep]
                   for name in (site.gate, site.up, site.gate_bias, site.up_bias) if name is not None}
        dense = self.dense_down[layer]
        refit = self.refit_grams[layer]
        # compile stores the refitted weight in the graph's dtype before it rotates and quantizes it
        down = (dense[:, keep] if refit is None else refit_down_proj(dense, refit, keep)).to(torch.float64)
        gram = None if self.grams[layer] is None else self.grams[layer][keep][:, keep]
        if site.rotation is not None:
            rotation = online_rotation(len(keep), self.quant.seed, "down")
            tensors[site.rotation] = rotation.right.to(torch.float32)
            down = rotation.apply(down)
            if gram is not None:
                gram = rotation.apply_left_transposed(rotation.apply(gram))
        dtype = self.dense_down[layer].dtype
        spec = self.quant.for_linear(site.down)
        if spec.quantizes_weight:
            tensors[site.down] = spec.quantize_weight(down, gram if spec.needs_hessian else None).dequantize(dtype)
        else:
            tensors[site.down] = down.to(dtype)
        return tensors


def build_calibration_model(model: torch.nn.Module, quant: QuantConfig, calibration, sparsities: Sequence[float],
                            granularity: int = 32, cache_size: int = 64, refit: bool = True) -> CalibrationModel:
    """Rotate, quantize and lower ``model``'s graph as ``asaf_fx.compile`` would (no plan),
    keeping what pruned variants of each layer need (see the module docstring).

    ``granularity`` and ``refit`` are the :class:`PruneConfig` settings the table is for.

    ``calibration`` (token ids, as compile takes them) chooses channels and calibrates GPTQ.
    ``cache_size`` bounds how many built (layer, level) variants are kept in memory.
    """
    check_model(model)
    batches = calibration_batches(calibration, getattr(model.config, "max_position_embeddings", None))
    was_training = model.training
    model.eval()
    try:
        forward = capture(model)
    finally:
        model.train(was_training)
    found: dict = {}
    down_inputs: dict[str, LinearStats] = {}

    def record_instead_of_pruning(gm: GraphModule) -> None:
        runner = LayerwiseRunner(split_decoder_layers(gm))
        found["importances"], found["refit"] = channel_statistics(
            runner, [runner.start_tokens(batch) for batch in batches], refit)
        found["flops"] = layer_linear_flops(gm)
        found["mlps"] = find_swiglus(gm)
        found["dense"] = [get_tensor(gm, mlp.down.args[1]).detach().clone() for mlp in found["mlps"]]
        return None

    def simulated_lowerings(gm: GraphModule) -> list[LinearLowering]:
        found["sites"] = _mlp_sites(gm, found["mlps"])  # before lowering fuses the Hadamard away
        downs = {mlp.down.args[1].target for mlp in found["mlps"]}
        lowerings, _ = linear_lowerings(
            gm, quant, batches, lambda t, stats: down_inputs.update({t: stats}) if t in downs else None
        )
        return [LinearLowering(low.weight, None, low.a_bits, low.a_clip) for low in lowerings]

    rewrite(forward, model, quant, record_instead_of_pruning, simulated_lowerings)
    sites = found["sites"] if "sites" in found else _mlp_sites(forward, found["mlps"])
    grams = [_unrotated_gram(down_inputs.get(site.down), site, quant.seed) for site in sites]
    return CalibrationModel(LayerwiseRunner(split_decoder_layers(forward)), quant, sites, found["importances"],
                            found["dense"], grams, found["refit"], found["flops"], sparsities, granularity, cache_size)


def _unrotated_gram(stats: LinearStats | None, site: MlpSite, seed: int) -> torch.Tensor | None:
    """Σ h hᵀ of down_proj's input before its online rotation Q: GPTQ saw Qᵀ (Σ h hᵀ) Q."""
    if stats is None:
        return None
    if site.rotation is None:
        return stats.hessian
    q = online_rotation(site.width, seed, "down").matrix()
    return q @ stats.hessian @ q.T
