"""``asaf_fx.compile``: capture a Hugging Face causal LM and rewrite it as a plan and a QuantConfig ask.

The passes run in this order on the model's one graph (scoring, prefill and decode alike):

1. capture (``torch.export``, once);
2. residual rotation: fold RMSNorm scales, rotate the residual stream (tied embeddings stay tied);
3. pruning (a plan): whole MLP channels, chosen from calibration statistics of the rotated model;
4. online rotations: Hadamards before down_proj and o_proj, head-wise V/O, Q/K after RoPE;
5. KV-cache quantization (simulated in the graph);
6. weight quantization (GPTQ or RTN, layer by layer on calibration data);
7. lowering: decoder linears become the INT4 kernel ops, with per-token activation quantization.

Every pass runs once; the transforms that need data (channel selection, least-squares refit,
GPTQ) run the graph layer by layer on calibration windows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch.fx import GraphModule

from asaf_fx.compiled_model import CompiledModel
from asaf_fx.config import CLIP_SEARCH, PruneConfig, QuantConfig
from asaf_fx.passes.capture import capture, check_model
from asaf_fx.passes.graph_utils import drop_dead_tensors, make_tensors_contiguous
from asaf_fx.passes.infra import GraphPass, PassManager, PatternError
from asaf_fx.passes.layerwise import LayerwiseRunner
from asaf_fx.passes.lower.lower_linears import LinearLowering, LowerLinears
from asaf_fx.passes.prune.prune_mlp import MlpPruning, PruneMlpChannels, select_mlp_channels
from asaf_fx.passes.quantize.activation_clip import search_activation_clips
from asaf_fx.passes.quantize.quantize_kv import QuantizeKV
from asaf_fx.passes.quantize.quantize_weights import quantize_decoder_weights
from asaf_fx.passes.rotate.fold_norms import FoldNorms
from asaf_fx.passes.rotate.online_hadamard import OnlineHadamardDown, OnlineHadamardOut
from asaf_fx.passes.rotate.rotate_qk import RotateQueryKey
from asaf_fx.passes.rotate.rotate_residual import RotateResidual
from asaf_fx.passes.rotate.rotate_vo import RotateValueOutput
from asaf_fx.passes.rotate.untie_embeddings import UntieEmbeddings
from asaf_fx.passes.split_layers import decoder_linears, layer_ends, split_decoder_layers
from asaf_fx.plan import Plan

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 4


class UnsupportedArchitectureError(ValueError):
    """The model's graph lacks a structure the passes need (see the chained PatternError)."""


def residual_passes(quant: QuantConfig) -> list[GraphPass]:
    """Rotation of the residual stream (and what it needs first); function-preserving."""
    if not quant.rotate:
        return []
    # A Hadamard rotation keeps a tied lm_head on the embedding's matrix (RotateResidual); a dense one
    # cannot apply itself online, so there the head gets its own copy to fold the final norm into.
    untie = [UntieEmbeddings()] if quant.rotation != "hadamard" else []
    return untie + [FoldNorms(), RotateResidual(quant.seed, quant.rotation)]


def online_passes(quant: QuantConfig) -> list[GraphPass]:
    """Rotations applied to values inside a layer; function-preserving. After pruning."""
    if not quant.rotate:
        return []
    return [OnlineHadamardDown(quant.seed), RotateValueOutput(quant.seed), RotateQueryKey(quant.seed),
            OnlineHadamardOut(quant.seed)]


def rotation_passes(quant: QuantConfig) -> list[GraphPass]:
    """All function-preserving QuaRot passes, in the order they must run (no pruning between)."""
    return residual_passes(quant) + online_passes(quant)


def calibration_batches(calibration, max_len: int | None, batch_size: int = CALIBRATION_BATCH) -> list[torch.Tensor]:
    """Token-id batches from a LongTensor (n_samples, seq_len) or an iterable of such tensors."""
    parts = [calibration] if isinstance(calibration, torch.Tensor) else list(calibration) if isinstance(
        calibration, Iterable) else None
    if parts is None:
        raise TypeError(f"calibration must be a LongTensor (n_samples, seq_len) or an iterable of them, "
                        f"got {type(calibration).__name__}")
    batches = []
    for i, part in enumerate(parts):
        if not isinstance(part, torch.Tensor) or part.dtype != torch.long or part.dim() != 2:
            raise TypeError(f"calibration[{i}] must be a 2-D LongTensor (n_samples, seq_len) of token ids, got "
                            f"{getattr(part, 'dtype', type(part).__name__)} {tuple(getattr(part, 'shape', ()))}")
        if max_len is not None and part.shape[1] > max_len:
            raise ValueError(f"calibration sequences of {part.shape[1]} tokens exceed the model's context of "
                             f"{max_len} positions; cut them shorter (e.g. 512)")
        batches += [b for b in part.split(batch_size) if b.numel()]
    if not batches:
        raise ValueError("calibration data is empty; pass at least one sequence of token ids")
    return batches


def _check_plan(plan: Plan | None, num_layers: int) -> list[float]:
    if plan is None:
        return [0.0] * num_layers
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be an asaf_fx.Plan, got {type(plan).__name__}")
    plan.check_layers(num_layers)
    return list(plan.layer_sparsity)


def _run(passes: list[GraphPass], gm: GraphModule, model, check: bool | str = True) -> None:
    try:
        PassManager(passes, check=check)(gm)
    except PatternError as exc:
        raise UnsupportedArchitectureError(
            f"asaf_fx.compile: {type(model).__name__} is not a supported Llama-family architecture: {exc}") from exc


def linear_lowerings(gm: GraphModule, quant: QuantConfig, calibration: list[torch.Tensor] | None,
               on_stats=None) -> tuple[list[LinearLowering], dict[str, float]]:
    """Each decoder linear's lowering, in graph order, and the clip ratio chosen for each linear
    whose setting is a search (``a_clip="mse"``; 1.0 where its input stays 16-bit)."""
    names = [n.args[1].target for layer in decoder_linears(gm) for n in layer]
    settings = [quant.for_linear(name) for name in names]
    clips = {name: 1.0 for name, s in zip(names, settings) if s.a_clip == CLIP_SEARCH}
    searched = {name: s.a_bits for name, s in zip(names, settings) if name in clips and s.a_bits < 16}
    if searched and not calibration:
        raise ValueError(f"a_clip={CLIP_SEARCH!r} chooses each activation clip on calibration data; pass calibration= "
                         "(token ids) or a fixed a_clip such as 0.9")

    def search(runner, layer, states):
        clips.update(search_activation_clips(runner, layer, states, searched))

    weights = (quantize_decoder_weights(gm, settings, calibration or (), on_stats, search if searched else None)
               if any(s.quantizes_weight for s in settings) or searched else [None] * len(names))
    lowerings = [LinearLowering.make(w, s.a_bits, clips.get(name, s.a_clip))
                 for name, w, s in zip(names, weights, settings, strict=True)]
    return lowerings, clips


def rewrite(gm: GraphModule, model, quant: QuantConfig,
            prunings: Callable[[GraphModule], list[MlpPruning | None] | None],
            lowerings: Callable[[GraphModule], list[LinearLowering]]) -> None:
    """Run compile's pass sequence on ``gm``.

    ``prunings`` and ``lowerings`` are asked at the point of the sequence where they are needed
    (after the residual rotation, after the online rotations). ``prunings`` returns None for "prune
    nothing". ``compile`` answers from calibration data; calibration also records what it needs.
    """
    _run(residual_passes(quant), gm, model)  # these refuse an unsupported architecture first
    quant.check_overrides([n.args[1].target for layer in decoder_linears(gm) for n in layer])
    chosen = prunings(gm)
    if chosen is not None:
        _run([PruneMlpChannels(chosen)], gm, model)
    _run(online_passes(quant), gm, model)
    if quant.kv_bits < 16:  # its own step: it matches the rotated keys the online passes add
        _run([QuantizeKV(quant.kv_bits)], gm, model)
    if quant.quantizes:
        _run([LowerLinears(lowerings(gm))], gm, model)
    drop_dead_tensors(gm)  # e.g. a tied embedding's original, which export leaves behind a dead node
    make_tensors_contiguous(gm)


def compile(model: torch.nn.Module, plan: Plan | None = None, *, quant: QuantConfig | None = None,  # noqa: A001
            calibration=None, prune: PruneConfig | None = None, max_batch: int = 1,
            max_cache_len: int | None = None, backend: str | None = "auto") -> CompiledModel:
    """Capture ``model`` and rewrite it as ``plan`` and ``quant`` ask; the model itself is left unchanged.

    Args:
        model: a transformers decoder-only causal LM (Llama, Mistral, Qwen2, SmolLM2, ...).
        plan: structured-sparsity plan from ``asaf_fx.solve`` (one sparsity per decoder layer).
        quant: rotation/quantization settings; default ``QuantConfig()`` (rotation only, 16 bits).
        calibration: token ids for channel selection and GPTQ: a LongTensor (n_samples, seq_len) or
            an iterable of them (see ``asaf_fx.data.calibration_windows``). Needed by a plan with
            non-zero sparsity and by GPTQ.
        prune: how the plan's sparsities become removed channels; default ``PruneConfig()``.
        max_batch: most rows ``generate`` takes at once (any number up to it works).
        max_cache_len: most positions (prompt + new tokens) ``generate`` holds in the KV cache;
            default the model's context. ``asaf_fx.load`` can choose another.
        backend: ``torch.compile`` backend: "auto" = inductor on CUDA, eager on the CPU; None =
            eager; any other name is passed to ``torch.compile``.
    """
    quant = QuantConfig() if quant is None else quant
    prune = PruneConfig() if prune is None else prune
    if not isinstance(quant, QuantConfig):
        raise TypeError(f"quant must be an asaf_fx.QuantConfig, got {type(quant).__name__}")
    if not isinstance(prune, PruneConfig):
        raise TypeError(f"prune must be an asaf_fx.PruneConfig, got {type(prune).__name__}")
    check_model(model)
    if plan is not None and hasattr(model.config, "num_hidden_layers"):
        _check_plan(plan, model.config.num_hidden_layers)  # fail before the slow capture
    max_len = getattr(model.config, "max_position_embeddings", None)
    batches = None if calibration is None else calibration_batches(calibration, max_len)
    was_training = model.training
    model.eval()
    try:
        graph = capture(model)
    finally:
        model.train(was_training)

    def prunings(gm: GraphModule) -> list[MlpPruning | None] | None:
        try:
            sparsities = _check_plan(plan, len(layer_ends(gm)))
        except PatternError as exc:
            raise UnsupportedArchitectureError(f"asaf_fx.compile: {exc}") from exc
        if not any(s > 0 for s in sparsities):
            return None
        if batches is None:
            raise ValueError("a plan with non-zero sparsity needs calibration data to choose channels; pass "
                             "calibration=")
        runner = LayerwiseRunner(split_decoder_layers(gm))
        states = [runner.start_tokens(batch) for batch in batches]
        return select_mlp_channels(runner, states, sparsities, prune.granularity, prune.refit)

    chosen: dict[str, float] = {}

    def lowerings(gm: GraphModule) -> list[LinearLowering]:
        lowered, clips = linear_lowerings(gm, quant, batches)
        chosen.update(clips)
        return lowered

    rewrite(graph, model, quant, prunings, lowerings)
    quant = quant.pin({name: {"a_clip": float(clip)} for name, clip in chosen.items()}) if chosen else quant
    log.info("compiled graph: passes %s", graph.meta["asaf_fx"].get("passes", []))
    return CompiledModel(graph, model.config, quant, plan=plan, max_batch=max_batch, max_cache_len=max_cache_len,
                         eos_token_id=getattr(model.generation_config, "eos_token_id", None), backend=backend)
