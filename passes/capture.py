"""Capture a Hugging Face causal LM as one aten graph with ``torch.export`` (non-strict).

The graph serves every use: scoring a whole sequence, prefilling a prompt into the KV cache and
decoding one token at a time. It is called as

    gm(input_ids, position_ids, cache_position, attention_mask, logit_positions, k_0, v_0, ..., v_{L-1})

``input_ids`` and ``position_ids`` are (B, T); ``cache_position`` (T,) says which cache slots the
T tokens fill; ``attention_mask`` (B, S) marks the cache slots that hold a real token of each row
(left padding: False); ``logit_positions`` (K,) which of the T positions get logits (all of them to
score, the last one to prefill); ``k_i``, ``v_i`` are layer i's cache, (B, kv_heads, S, head_dim),
written in place at ``cache_position``. A query attends to the slots its row marks, up to its own
position, and always to its own slot (a padding query then stays finite). B, T, S and K are
dynamic: the caller owns the cache and chooses its batch and length per call. The graph returns
the logits (B, K, V).

``gm.meta["asaf_fx"]`` records the kind, example inputs in placeholder order (for shape
propagation), the cache layout, the model config and how many decoder layers were traced: three
where the others can be written as checked copies (``repeat_layers``), else all.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch.export import Dim
from torch.fx import GraphModule
from torch.fx.graph import CodeGen

from asaf_fx.passes.graph_utils import attr_tensor, bind_tensor, drop_input_guards, written_attrs
from asaf_fx.passes.infra import META_KEY, propagate_shapes
from asaf_fx.passes.repeat_layers import TRACED, decoder_stack, first_layers, repeat_last_layer

INPUTS = ("input_ids", "position_ids", "cache_position", "attention_mask", "logit_positions")


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


class _Cache:
    """What the model's attention layers write their K/V through: each layer's cache tensors, filled
    at the call's cache positions. With positions and a 4-D mask given, the model asks for nothing else."""

    is_compileable = True

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], positions: torch.Tensor) -> None:
        self.keys, self.values, self.positions = keys, values, positions

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        # Return the results of the writes, not the tensors: the graph then reads the cache after
        # the write, which is the order the passes follow (``source_through``).
        return (self.keys[layer_idx].index_copy_(2, self.positions, key),
                self.values[layer_idx].index_copy_(2, self.positions, value))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # never asked for with position_ids given; here for transformers' checks


class _Serving(torch.nn.Module):
    """The model behind the graph's calling convention (see the module docstring)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, cache_position, attention_mask, logit_positions, caches):
        slots = torch.arange(attention_mask.shape[1], device=input_ids.device)
        causal = slots[None, :] <= cache_position[:, None]
        own = slots[None, :] == cache_position[:, None]
        allowed = (attention_mask[:, None, None, :] & causal[None, None]) | own[None, None]
        cache = _Cache(list(caches[0::2]), list(caches[1::2]), cache_position)
        return self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=allowed, cache=cache,
                          use_cache=True, logits_to_keep=logit_positions).logits


def cache_layout(config) -> dict:
    """Layers, KV heads and head width of a transformers config's KV cache."""
    heads = config.num_attention_heads
    return {"layers": int(config.num_hidden_layers), "kv_heads": int(getattr(config, "num_key_value_heads", heads)),
            "head_dim": int(getattr(config, "head_dim", None) or config.hidden_size // heads)}


def new_cache(layout: dict, batch: int, length: int, dtype: torch.dtype, device) -> list[torch.Tensor]:
    """Zeroed K and V tensors for every layer, in the graph's order (k_0, v_0, k_1, ...)."""
    shape = (batch, layout["kv_heads"], length, layout["head_dim"])
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2 * layout["layers"])]


def token_positions(mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions (B, T) of left-padded rows: each row's real tokens count from 0 (padding: 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def graph_inputs(gm: GraphModule, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 cache: list[torch.Tensor] | None = None) -> tuple:
    """The graph's inputs for scoring ``input_ids`` (B, T) from an empty cache.

    ``attention_mask`` (B, T), 1 for real tokens, allows left padding (positions then count each
    row's real tokens). Without ``cache`` a fresh one of T slots is made.
    """
    batch, length = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        mask = torch.ones(batch, length, dtype=torch.bool, device=device)
        positions = torch.arange(length, device=device).expand(batch, length)
    else:
        mask = attention_mask.to(device=device, dtype=torch.bool)
        positions = token_positions(mask)
    meta = gm.meta[META_KEY]
    if cache is None:
        cache = new_cache(meta["cache"], batch, length, cache_dtype(gm), device)
    every = torch.arange(length, device=device)
    return (input_ids, positions, every, mask, every, *cache)


def cache_dtype(gm: GraphModule) -> torch.dtype:
    return getattr(torch, gm.meta[META_KEY]["cache_dtype"])


def run_graph(gm: GraphModule, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, T, V) of ``input_ids`` through the graph, from an empty cache."""
    with torch.no_grad():
        return gm(*graph_inputs(gm, input_ids, attention_mask))


def capture_module(module: torch.nn.Module, args: tuple, kwargs: dict | None = None,
                   dynamic_shapes=None) -> GraphModule:
    """Export any module (non-strict) to a GraphModule ready for the passes (tests, custom models).

    Shapes are propagated with ``args`` followed by ``kwargs`` values, in placeholder order.
    """
    kwargs = kwargs or {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False).module()
    gm.meta[META_KEY] = {"kind": "module", "example_inputs": tuple(args) + tuple(kwargs.values()),
                         "architecture": type(module).__name__}
    propagate_shapes(gm)
    return gm


def _export(wrapper: _Serving, dtype: torch.dtype, device, layers: int) -> GraphModule:
    """Export ``wrapper`` whose model runs ``layers`` decoder layers; the caches become buffers
    (``kv_cache.key_i`` / ``value_i``) so that ``repeat_layers`` can give each copy its own."""
    # Caches for the traced layers only: every dynamic input costs export time.
    layout = {**cache_layout(wrapper.model.config), "layers": layers}
    batch, length, slots = 2, 4, 8
    ids = torch.zeros(batch, length, dtype=torch.long, device=device)
    example = (ids, torch.arange(length, device=device).expand(batch, length), torch.arange(length, device=device),
               torch.ones(batch, slots, dtype=torch.bool, device=device), torch.arange(length, device=device),
               new_cache(layout, batch, slots, dtype, device))
    both = {0: Dim.DYNAMIC, 1: Dim.DYNAMIC}
    # Dim.DYNAMIC, not named Dims: export then accepts the shape relations it derives (the cache's
    # batch is the ids' batch) instead of failing on them.
    one = {0: Dim.DYNAMIC}
    dynamic = (both, both, one, both, one, [{0: Dim.DYNAMIC, 2: Dim.DYNAMIC}] * len(example[5]))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export's notes on lifted constants are not actionable here
        gm = torch.export.export(wrapper, example, dynamic_shapes=dynamic, strict=False).module()
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    for i, node in enumerate(placeholders[len(INPUTS):]):
        if node.users:
            target = f"kv_cache.{'key' if i % 2 == 0 else 'value'}_{i // 2}"
            bind_tensor(gm, target, example[5][i])
            with gm.graph.inserting_before(node):
                node.replace_all_uses_with(gm.graph.get_attr(target))
        gm.graph.erase_node(node)
    drop_input_guards(gm)
    gm.graph.set_codegen(CodeGen())  # flat positional inputs: the cache list grows when layers are repeated
    output = gm.graph.output_node()
    output.args = (output.args[0][0],)  # the logits alone
    # A plain GraphModule (export's input-spec hook would refuse the flat inputs) whose attributes
    # carry the model's own names (``model.layers.0...``, ``lm_head.weight``), not the wrapper's.
    root = torch.nn.Module()
    for node in gm.graph.find_nodes(op="get_attr"):
        value = attr_tensor(gm, node.target)
        node.target = node.target.removeprefix("model.")
        bind_tensor(root, node.target, value)
    return GraphModule(root, gm.graph)


def _caches_to_inputs(gm: GraphModule) -> int:
    """Turn the written cache buffers back into placeholders after the data inputs, layer by layer."""
    gm.graph.eliminate_dead_code()  # shape reads of unused caches
    written = sorted(written_attrs(gm), key=lambda n: _cache_order(n.target))
    stray = [n for n in gm.graph.find_nodes(op="get_attr") if n.target.startswith("kv_cache.") and n not in written]
    if stray:
        raise UnsupportedModelError(f"the graph reads the KV cache {stray[0].target} without writing it")
    anchor = list(gm.graph.find_nodes(op="placeholder"))[-1]
    for i, node in enumerate(written):
        with gm.graph.inserting_after(anchor):
            anchor = gm.graph.placeholder(f"{'k' if i % 2 == 0 else 'v'}_{i // 2}")
        node.replace_all_uses_with(anchor)
        gm.graph.erase_node(node)
    if hasattr(gm, "kv_cache"):
        delattr(gm, "kv_cache")
    gm.recompile()
    return len(written) // 2


def _cache_order(target: str) -> tuple[int, int]:
    kind, _, index = target.removeprefix("kv_cache.").removesuffix("_repeated").partition("_")
    return int(index), 0 if kind == "key" else 1


def _export_repeating(model: torch.nn.Module, export: Callable[[int], GraphModule]) -> tuple[GraphModule, int]:
    """``export(layers)`` traced with the first decoder layers only, the rest repeated in the graph
    (``repeat_layers``), or traced whole where the graph cannot prove that sound. Returns the graph
    and how many layers were traced."""
    num_layers = getattr(model.config, "num_hidden_layers", 0)
    path = decoder_stack(model, num_layers)
    if path is not None:
        with first_layers(model, path, TRACED):
            try:
                gm = export(TRACED)
            except Exception:  # noqa: BLE001 — a model that cannot run cut short is traced whole below
                gm = None
        if gm is not None and repeat_last_layer(gm, model, num_layers):
            return gm, TRACED
    return export(num_layers), num_layers


def capture(model: torch.nn.Module) -> GraphModule:
    """The one graph of ``model`` (see the module docstring); the model itself is left unchanged."""
    check_model(model)
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    wrapper = _Serving(model)
    gm, traced = _export_repeating(model, lambda layers: _export(wrapper, dtype, device, layers))
    layers = _caches_to_inputs(gm)
    layout = cache_layout(model.config)
    if layers != layout["layers"]:
        raise UnsupportedModelError(f"the graph of {type(model).__name__} writes {layers} layers' caches, its config "
                                    f"has {layout['layers']} layers")
    config = model.config
    gm.meta[META_KEY] = {"kind": "serve", "model_type": getattr(config, "model_type", None),
                         "architecture": type(model).__name__, "traced_layers": traced,
                         "cache": layout, "cache_dtype": str(dtype).removeprefix("torch.")}
    # Shapes are propagated on a small input: cheap, and any size works (dynamic export).
    gm.meta[META_KEY]["example_inputs"] = graph_inputs(gm, torch.zeros(1, 4, dtype=torch.long, device=device))
    propagate_shapes(gm)
    return gm
