"""Capture a Hugging Face causal LM as aten graphs with ``torch.export`` (non-strict).

Two graphs: ``capture_forward`` (whole sequences, no cache, dynamic batch and length: perplexity,
prefill, scoring) and ``capture_decode`` (token steps writing a static KV cache held as buffers in
the graph: greedy decoding). Each GraphModule records in ``gm.meta["asaf_fx"]`` its kind, the
example inputs in placeholder order (for shape propagation), the model config and how many decoder
layers were traced: three where the others can be written as checked copies (``repeat_layers``),
else all.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from torch.export import Dim
from torch.fx import GraphModule

from asaf_fx.passes.infra import META_KEY, propagate_shapes
from asaf_fx.passes.repeat_layers import TRACED, decoder_stack, first_layers, repeat_last_layer


class UnsupportedModelError(ValueError):
    """The object cannot be captured as a decoder-only causal LM."""


def check_model(model: object) -> None:
    """Clear errors for inputs the capture cannot handle."""
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedModelError(f"expected a transformers causal LM (torch.nn.Module), got {type(model).__name__}")
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a causal LM with an output head; load it with "
            "transformers.AutoModelForCausalLM")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{type(model).__name__} is an encoder-decoder model; only decoder-only LMs are "
                                    f"supported")
    meta = [name for name, p in model.named_parameters() if p.is_meta]
    if meta:
        raise UnsupportedModelError(
            f"{len(meta)} parameters are on the meta device (e.g. {meta[0]}); load real weights "
            "(no device_map='meta' / init_empty_weights) before compiling")


def _record(gm: GraphModule, kind: str, example_inputs: tuple, model, traced_layers: int | None = None) -> GraphModule:
    config = getattr(model, "config", None)
    gm.meta[META_KEY] = {"kind": kind, "example_inputs": example_inputs,
                         "model_type": getattr(config, "model_type", None),
                         "architecture": type(model).__name__, "traced_layers": traced_layers}
    propagate_shapes(gm)
    return gm


def capture_module(module: torch.nn.Module, args: tuple, kwargs: dict | None = None,
                   dynamic_shapes=None) -> GraphModule:
    """Export any module (non-strict) to a GraphModule ready for the passes (tests, custom models).

    Shapes are propagated with ``args`` followed by ``kwargs`` values, in placeholder order.
    """
    kwargs = kwargs or {}
    return _record(_export(module, args, kwargs, dynamic_shapes), "module", tuple(args) + tuple(kwargs.values()),
                   module)


def _export(module: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes) -> GraphModule:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export's notes on lifted constants are not actionable here
        return torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False).module()


def _export_repeating(root: torch.nn.Module, model, export: Callable[[], GraphModule]) -> tuple[GraphModule, int]:
    """``export()`` of ``root`` traced with its first decoder layers only, the rest repeated in the
    graph (``repeat_layers``), or traced whole where the graph cannot prove that sound. Returns the
    graph and how many layers were traced."""
    num_layers = getattr(model.config, "num_hidden_layers", 0)
    path = decoder_stack(root, num_layers)
    if path is not None:
        with first_layers(root, path, TRACED):
            try:
                gm = export()
            except Exception:  # noqa: BLE001 — a model that cannot run cut short is traced whole below
                gm = None
        if gm is not None and repeat_last_layer(gm, root, num_layers):
            return gm, TRACED
    return export(), num_layers


def capture_forward(model: torch.nn.Module, example_ids: torch.Tensor | None = None) -> GraphModule:
    """Full-sequence forward without cache; call the result as ``gm(input_ids, use_cache=False)``."""
    check_model(model)
    device = next(model.parameters()).device
    ids = example_ids if example_ids is not None else torch.zeros(2, 8, dtype=torch.long, device=device)
    # Dim.DYNAMIC, not a named Dim: export then accepts the shape relations it derives instead of
    # failing on them (named Dims must satisfy every guard over their whole range). On CUDA with GQA
    # (Llama-3-8B shapes, torch 2.11) SDPA's tracing adds `min(128·seq, 512·seq) == 128·seq`, which
    # export cannot prove for a named Dim; DYNAMIC still refuses to specialize a length to a constant.
    gm, traced = _export_repeating(model, model, lambda: _export(
        model, (ids,), {"use_cache": False}, dynamic_shapes=({0: Dim.DYNAMIC, 1: Dim.DYNAMIC}, None)))
    # Shapes are re-propagated on a small input: cheaper, and any length works (dynamic export).
    return _record(gm, "forward", (ids[:1, :4], False), model, traced)


def capture_decode(model: torch.nn.Module, max_cache_len: int = 256, batch_size: int = 1) -> GraphModule:
    """One-token decode step of ``batch_size`` sequences with a static KV cache of ``max_cache_len`` positions.

    Call the result as ``gm(input_ids=ids[:, i:i+1], cache_position=torch.tensor([i]))`` (ids of
    ``batch_size`` rows, all at position i); it returns logits and updates the cache buffers inside
    the module.
    """
    if batch_size < 1:
        raise ValueError(f"decode batch size must be at least 1, got {batch_size}")
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    check_model(model)
    device = next(model.parameters()).device
    saved = model.generation_config
    # The recipe reads the cache kind from the generation config; set it on a copy, then restore.
    model.generation_config = copy.deepcopy(saved)
    model.generation_config.cache_implementation = "static"
    model.generation_config.use_cache = True
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapper = TorchExportableModuleForDecoderOnlyLM(model, batch_size=batch_size, max_cache_len=max_cache_len,
                                                            device=device)
            ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
            pos = torch.zeros(1, dtype=torch.long, device=device)
            # The recipe exports its inner module, the one the graph's attribute names start from.
            gm, traced = _export_repeating(
                wrapper.model, model, lambda: wrapper.export(input_ids=ids, cache_position=pos, strict=False).module())
    finally:
        model.generation_config = saved
    gm.meta["max_cache_len"] = max_cache_len
    gm.meta["decode_batch"] = batch_size
    return _record(gm, "decode", (ids, pos), model, traced)
