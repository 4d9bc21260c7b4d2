"""``asaf_fx.compile``: capture a Hugging Face causal LM and run the graph passes on it."""

from __future__ import annotations

import logging

import torch

from asaf_fx.compiled import CompiledModel
from asaf_fx.config import QuantConfig
from asaf_fx.passes.capture import capture_decode, capture_forward, check_model
from asaf_fx.passes.fold_norms import FoldNorms
from asaf_fx.passes.infra import GraphPass, PassManager, PatternError
from asaf_fx.passes.online_hadamard import OnlineHadamardDown
from asaf_fx.passes.rotate_qk import RotateQueryKey
from asaf_fx.passes.rotate_residual import RotateResidual
from asaf_fx.passes.rotate_vo import RotateValueOutput
from asaf_fx.passes.untie_embeddings import UntieEmbeddings

log = logging.getLogger(__name__)


class UnsupportedArchitectureError(ValueError):
    """The model's graph lacks a structure the passes need (see the chained PatternError)."""


def rotation_passes(quant: QuantConfig) -> list[GraphPass]:
    """The function-preserving QuaRot passes, in the order they must run."""
    if not quant.rotate:
        return []
    return [UntieEmbeddings(), FoldNorms(), RotateResidual(quant.seed, quant.rotation),
            OnlineHadamardDown(quant.seed), RotateValueOutput(quant.seed), RotateQueryKey(quant.seed)]


def compile(model: torch.nn.Module, plan=None, *, quant: QuantConfig | None = None, calibration=None,
            decode: bool = True, max_cache_len: int = 256) -> CompiledModel:  # noqa: A001 (public name)
    """Capture ``model`` and rewrite it as ``quant`` asks; the model itself is left unchanged.

    Args:
        model: a transformers decoder-only causal LM (Llama, Mistral, Qwen2, SmolLM2, ...).
        plan: structured-sparsity plan (not supported yet: must be None).
        quant: rotation/quantization settings; default ``QuantConfig()`` (rotation only, 16 bits).
        calibration: calibration token ids for GPTQ / sensitivity (not supported yet: must be None).
        decode: also capture the static-KV-cache decode graph used by ``generate``.
        max_cache_len: positions in the static KV cache (prompt + new tokens).
    """
    quant = QuantConfig() if quant is None else quant
    if not isinstance(quant, QuantConfig):
        raise TypeError(f"quant must be an asaf_fx.QuantConfig, got {type(quant).__name__}")
    if plan is not None:
        raise NotImplementedError("asaf_fx.compile: sparsity plans are not implemented yet; pass plan=None")
    if calibration is not None:
        raise NotImplementedError("asaf_fx.compile: calibration is not implemented yet; pass calibration=None")
    if quant.quantizes:
        raise NotImplementedError(f"asaf_fx.compile: quantization below 16 bits is not implemented yet "
                                  f"(got w/a/kv bits {quant.w_bits}/{quant.a_bits}/{quant.kv_bits}); use 16")
    check_model(model)
    was_training = model.training
    model.eval()
    try:
        graphs = [capture_forward(model)] + ([capture_decode(model, max_cache_len)] if decode else [])
    finally:
        model.train(was_training)
    for gm in graphs:
        try:
            PassManager(rotation_passes(quant))(gm)
        except PatternError as exc:
            raise UnsupportedArchitectureError(
                f"asaf_fx.compile: {type(model).__name__} is not a supported Llama-family architecture: {exc}") from exc
        log.info("compiled %s graph: passes %s", gm.meta["asaf_fx"]["kind"], gm.meta["asaf_fx"].get("passes", []))
    return CompiledModel(graphs[0], graphs[1] if decode else None, model.config, quant,
                         eos_token_id=getattr(model.generation_config, "eos_token_id", None))
