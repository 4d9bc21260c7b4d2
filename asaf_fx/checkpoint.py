"""``asaf_fx.save`` / ``asaf_fx.load``: a compiled model as safetensors + JSON, rebuilt without unpickling.

A checkpoint is a directory holding

* ``model.safetensors`` — every tensor the compiled graphs read: packed INT4 codes (uint8), their
  scales, the weights that stay float (embeddings, lm_head, 8/16-bit linears), rotation constants.
  Keys are ``forward/<attribute>`` and ``decode/<attribute>``; a decode attribute bound to a
  forward tensor (``share_weights``) is stored once and listed under ``aliases``. The decode
  graph's KV-cache buffers are state, not weights, and are not stored. The header records the
  schema and the sha256 of the JSON body;
* ``asaf_fx.json`` — what rebuilds the graphs: the transformers config, the QuantConfig, the plan,
  the pruned MLP widths, the decode cache length, EOS ids, versions, the sha256 of each graph's
  code, and the sha256 of ``model.safetensors``;
* optionally the tokenizer's files (``save(..., tokenizer=)``), for ``python -m asaf_fx.eval DIR``.

``load`` rebuilds the graph *structure* — a seeded random-init model from the saved config, the
same passes ``asaf_fx.compile`` runs (:func:`asaf_fx.compile.rewrite`), placeholders where compile
used calibration data — then binds every tensor from the file, refusing any name, shape or dtype
that differs from what the rebuilt graphs read. The two hashes bind the two files to each other:
editing either one is refused. Files are written tensors first, JSON last, each atomically, so an
interrupted save never leaves a directory that loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule

import asaf_fx.ops  # noqa: F401  registers the kernel ops the graphs call
from asaf_fx._atomic import atomic_path, sha256_file, write_text_atomic
from asaf_fx.compile import rewrite
from asaf_fx.compiled import CompiledModel
from asaf_fx.config import CLIP_SEARCH, QuantConfig
from asaf_fx.passes.capture import capture_decode, capture_forward
from asaf_fx.passes.graph_utils import aten, get_tensor, is_op, set_tensor
from asaf_fx.passes.infra import META_KEY
from asaf_fx.passes.lower_linears import LinearLowering
from asaf_fx.passes.prune_mlp import MlpPruning
from asaf_fx.passes.rtn import QuantizedWeight
from asaf_fx.passes.split_layers import decoder_linears
from asaf_fx.sparsity_plan import Plan

log = logging.getLogger(__name__)

SCHEMA = "asaf_fx.checkpoint/1"
CONFIG_FILE = "asaf_fx.json"
TENSORS_FILE = "model.safetensors"
_ROTATION_OPS = (torch.ops.asaf_fx.hadamard_rotate, torch.ops.asaf_fx.hadamard_rotate_quantize)
_INT4_OPS = (torch.ops.asaf_fx.w4a16_linear, torch.ops.asaf_fx.w4a_int_linear)


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded: missing, tampered with, or from another version."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What ``save`` wrote: the directory, the tensors file's size, and its bytes per kind of tensor."""

    path: Path
    tensors_bytes: int
    bytes_by_kind: dict[str, int] = field(default_factory=dict)


# --- which tensors a graph reads ---


def _mutated(gm: GraphModule) -> set[str]:
    """Attributes the graph writes in place (the static KV cache): state, not weights."""
    written = set()
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        first = node.args[0] if node.args else None
        if schema is None or not schema.arguments or getattr(first, "op", None) != "get_attr":
            continue
        alias = schema.arguments[0].alias_info
        if alias is not None and alias.is_write:
            written.add(first.target)
    return written


def graph_tensors(gm: GraphModule) -> dict[str, torch.Tensor]:
    """Every tensor attribute the graph reads through a ``get_attr`` node, except mutated state."""
    state = _mutated(gm)
    found = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        if node.target in state or node.target in found:
            continue
        value = get_tensor(gm, node)
        if isinstance(value, torch.Tensor):
            found[node.target] = value
    return found


def _kind(gm: GraphModule, target: str, tensor: torch.Tensor) -> str:
    """int4_codes / int4_scales / rotations / float_weights / other, from the ops that read it."""
    users = [u for n in gm.graph.find_nodes(op="get_attr") if n.target == target for u in n.users]
    for user in users:
        if is_op(user, *_INT4_OPS) and tensor.dtype == torch.uint8:
            return "int4_codes"
        if is_op(user, *_INT4_OPS) and target.endswith("_scales"):  # the name LowerLinears gives them
            return "int4_scales"
        if is_op(user, *_ROTATION_OPS):
            return "rotations"
    return "float_weights" if tensor.is_floating_point() else "other"


def _storage_key(t: torch.Tensor) -> tuple:
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype


def _graphs(model: CompiledModel) -> dict[str, GraphModule]:
    return {"forward": model.forward_graph, **({"decode": model.decode_graph} if model.decode_graph is not None else {})}


def _collect(graphs: dict[str, GraphModule]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to store by key, aliases: key -> key of the stored tensor it shares memory with)."""
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for kind, gm in graphs.items():
        for target, tensor in graph_tensors(gm).items():
            key = f"{kind}/{target}"
            first = seen.setdefault(_storage_key(tensor), key)
            if first == key:
                stored[key] = tensor
            else:
                aliases[key] = first
    return stored, aliases


# --- hashing and JSON ---


def _canonical(body: dict[str, Any]) -> bytes:
    # Key order is kept, not sorted: QuantConfig.overrides is first-match-wins, so its order is meaning.
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def _code_sha256(gm: GraphModule) -> str:
    return hashlib.sha256(gm.code.encode("utf-8")).hexdigest()


def _versions() -> dict[str, str]:
    import transformers

    import asaf_fx

    return {"asaf_fx": asaf_fx.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _embedding_dtype(gm: GraphModule) -> torch.dtype:
    node = next(n for n in gm.graph.nodes if is_op(n, aten.embedding))
    return get_tensor(gm, node.args[0]).dtype


# --- save ---


def save(model: CompiledModel, path: str | os.PathLike, *, tokenizer=None) -> CheckpointInfo:
    """Write ``model`` (from ``asaf_fx.compile``) to the directory ``path``; see the module docstring.

    ``tokenizer``, if given, is saved beside it (``save_pretrained``) so that
    ``python -m asaf_fx.eval DIR`` can read text. Returns the tensors file's size, total and per kind.
    """
    from safetensors.torch import save_file

    if not isinstance(model, CompiledModel):
        raise TypeError(f"asaf_fx.save takes the CompiledModel that asaf_fx.compile returns, got {type(model).__name__}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    graphs = _graphs(model)
    stored, aliases = _collect(graphs)
    by_kind: dict[str, int] = {}
    for key, tensor in stored.items():
        kind, _, target = key.partition("/")
        name = _kind(graphs[kind], target, tensor)
        by_kind[name] = by_kind.get(name, 0) + tensor.numel() * tensor.element_size()
    meta = model.forward_graph.meta.get(META_KEY, {})
    body = {
        "schema": SCHEMA,
        "model_config": json.loads(model.config.to_json_string(use_diff=False)),
        "dtype": str(_embedding_dtype(model.forward_graph)).removeprefix("torch."),
        "quant": model.quant.to_dict(),
        "rotation_seed": model.quant.seed,
        "plan": None if model.plan is None else json.loads(model.plan.to_json()),
        "mlp_widths": meta.get("mlp_widths"),
        "max_cache_len": model.max_cache_len,
        "decode_batch": model.decode_batch,
        "eos_token_ids": model.eos_token_ids,
        "graphs": {kind: {"code_sha256": _code_sha256(gm)} for kind, gm in graphs.items()},
        "aliases": aliases,
        "tensor_bytes": by_kind,
        "versions": _versions(),
    }
    body_sha = hashlib.sha256(_canonical(body)).hexdigest()
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in stored.items()}
    with atomic_path(folder / TENSORS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"schema": SCHEMA, "config_sha256": body_sha})
    del tensors
    tensors_path = folder / TENSORS_FILE
    # The JSON goes last: until it lands, the directory holds no config that matches the tensors.
    write_text_atomic(folder / CONFIG_FILE, json.dumps({**body, "tensors_sha256": sha256_file(tensors_path)},
                                                       indent=2) + "\n")
    info = CheckpointInfo(folder, tensors_path.stat().st_size, dict(sorted(by_kind.items())))
    log.info("saved %s: %d bytes of tensors (%s)", folder, info.tensors_bytes, info.bytes_by_kind)
    return info


# --- load ---


def _read_config(folder: Path) -> dict[str, Any]:
    config_path, tensors_path = folder / CONFIG_FILE, folder / TENSORS_FILE
    if not folder.is_dir():
        raise FileNotFoundError(f"asaf_fx.load: {folder} is not a directory; pass the directory asaf_fx.save wrote")
    for file in (config_path, tensors_path):
        if not file.is_file():
            raise FileNotFoundError(f"asaf_fx.load: {file} is missing; the save was interrupted or the directory was "
                                    "not written by asaf_fx.save — save the model again")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"asaf_fx.load: {config_path} is not valid JSON ({exc}); save the model again") from exc
    if not isinstance(config, dict) or config.get("schema") != SCHEMA:
        found = config.get("schema") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(f"asaf_fx.load: {config_path} has schema {found!r}; this asaf_fx reads {SCHEMA!r}. "
                              "Load it with the asaf_fx version that wrote it, or save the model again with this one")
    return config


def _check_hashes(folder: Path, config: dict[str, Any]) -> None:
    from safetensors import SafetensorError, safe_open

    tensors_path = folder / TENSORS_FILE
    if config.get("tensors_sha256") != sha256_file(tensors_path):
        raise CheckpointError(f"asaf_fx.load: {tensors_path} does not match the sha256 recorded in {CONFIG_FILE}: "
                              "the tensors file was replaced, edited or truncated; save the model again")
    try:
        with safe_open(str(tensors_path), framework="pt") as f:
            header = f.metadata() or {}
    except SafetensorError as exc:
        raise CheckpointError(f"asaf_fx.load: {tensors_path} is not a safetensors file ({exc})") from exc
    body = {k: v for k, v in config.items() if k != "tensors_sha256"}
    if header.get("schema") != SCHEMA or header.get("config_sha256") != hashlib.sha256(_canonical(body)).hexdigest():
        raise CheckpointError(f"asaf_fx.load: {folder / CONFIG_FILE} was edited after saving (its sha256 differs from "
                              f"the one recorded in {TENSORS_FILE}); restore it or save the model again")


def _random_model(config: dict[str, Any], dtype: torch.dtype, device: torch.device):
    """Seeded random-init model of the saved architecture (its weights are all overwritten)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(config)
    model_type = values.pop("model_type", None)
    if not isinstance(model_type, str):
        raise CheckpointError("asaf_fx.load: the saved transformers config has no model_type; save the model again")
    hf_config = AutoConfig.for_model(model_type, **values)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval()


def _placeholder_prunings(widths: list[dict[str, int]] | None) -> Callable[[GraphModule], list | None]:
    """The saved MLP widths as prunings that keep the first ``kept`` channels (values are overwritten)."""
    if widths is None:
        return lambda gm: None
    try:
        prunings = [None if int(w["kept"]) == int(w["width"]) else MlpPruning(torch.arange(int(w["kept"])))
                    for w in widths]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"asaf_fx.load: malformed mlp_widths in {CONFIG_FILE} ({exc}); save the model again") from exc
    return lambda gm: prunings


def _placeholder_lowerings(quant: QuantConfig) -> Callable[[GraphModule], list[LinearLowering]]:
    """Lowerings with zero codes and unit scales of the shapes compile's quantizers produce."""

    def lowerings(gm: GraphModule) -> list[LinearLowering]:
        result = []
        for linear in (n for layer in decoder_linears(gm) for n in layer):
            settings = quant.for_linear(linear.args[1].target)
            weight = None
            if settings["w_bits"] < 16:
                rows, columns = get_tensor(gm, linear.args[1]).shape
                group = settings["w_group_size"] or columns
                device = get_tensor(gm, linear.args[1]).device
                weight = QuantizedWeight(torch.zeros(rows, columns, dtype=torch.int8, device=device),
                                         torch.ones(rows, -(-columns // group), device=device),
                                         settings["w_bits"], group)
            clip = settings["a_clip"]
            if clip == CLIP_SEARCH:
                if settings["a_bits"] < 16:
                    raise CheckpointError(f"asaf_fx.load: {CONFIG_FILE} leaves the activation clip of "
                                          f"{linear.args[1].target} to a search (a_clip={CLIP_SEARCH!r}) instead of "
                                          "the ratio compile chose; save the compiled model again")
                clip = 1.0
            result.append(LinearLowering.make(weight, settings["a_bits"], clip))
        return result

    return lowerings


def _bind(graphs: dict[str, GraphModule], tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> None:
    """Overwrite every tensor the rebuilt graphs read with the saved one; names, shapes, dtypes must agree."""
    expected = {f"{kind}/{target}": (gm, target, t) for kind, gm in graphs.items()
                for target, t in graph_tensors(gm).items()}
    missing = sorted(set(expected) - set(aliases) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(f"asaf_fx.load: {TENSORS_FILE} does not hold the tensors the rebuilt graphs read: "
                              f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
                              f"{extra[:5]}{' ...' if len(extra) > 5 else ''}; it was written for another model or "
                              "asaf_fx version — save the model again")
    bad_alias = sorted(k for k, v in aliases.items() if k not in expected or v not in tensors)
    if bad_alias:
        raise CheckpointError(f"asaf_fx.load: aliases {bad_alias[:5]} name tensors the graphs do not read; "
                              "save the model again")
    for key, (_, _, old) in expected.items():  # every check before the first write
        new = tensors[aliases.get(key, key)]
        if new.shape != old.shape or new.dtype != old.dtype:
            raise CheckpointError(f"asaf_fx.load: tensor {key} is {new.dtype} {tuple(new.shape)} in {TENSORS_FILE} but "
                                  f"the rebuilt graph reads {old.dtype} {tuple(old.shape)}; the file does not belong "
                                  "to this config — save the model again")
    for key, (gm, target, _) in expected.items():
        set_tensor(gm, target, tensors[aliases.get(key, key)])


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu", backend: str | None = "auto") -> CompiledModel:
    """The CompiledModel that ``save`` wrote to ``path``; its logits equal the saved model's bit for bit.

    Reads safetensors and JSON only (nothing is unpickled). ``backend`` as in ``asaf_fx.compile``.
    """
    from safetensors.torch import load_file

    folder = Path(path)
    config = _read_config(folder)
    _check_hashes(folder, config)
    versions = _versions()
    if config.get("versions") != versions:
        log.warning("checkpoint written with %s, loading with %s", config.get("versions"), versions)
    try:
        quant = QuantConfig.from_dict(config["quant"])
        plan = None if config["plan"] is None else Plan.from_json(json.dumps(config["plan"]))
        dtype = getattr(torch, config["dtype"])
        max_cache_len = config["max_cache_len"]
        aliases = dict(config["aliases"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"asaf_fx.load: {folder / CONFIG_FILE} lacks or garbles a field ({exc!r}); "
                              "save the model again") from exc
    device = torch.device(device)
    model = _random_model(config["model_config"], dtype, device)
    graphs = {"forward": capture_forward(model)}
    if max_cache_len is not None:
        graphs["decode"] = capture_decode(model, max_cache_len, int(config.get("decode_batch") or 1))
    rewrite(list(graphs.values()), model, quant, _placeholder_prunings(config.get("mlp_widths")),
            _placeholder_lowerings(quant))
    for kind, gm in graphs.items():
        saved = config["graphs"].get(kind, {}).get("code_sha256")
        if saved != _code_sha256(gm):
            raise CheckpointError(f"asaf_fx.load: the rebuilt {kind} graph differs from the saved one (written with "
                                  f"{config.get('versions')}, loading with {versions}); load with the versions that "
                                  "wrote it, or compile and save the model again")
    _bind(graphs, load_file(str(folder / TENSORS_FILE), device=str(device)), aliases)
    return CompiledModel(graphs["forward"], graphs.get("decode"), model.config, quant,
                         plan=plan, eos_token_id=config.get("eos_token_ids"), backend=backend)



def load_saved(path: str | os.PathLike, **kwargs) -> tuple[CompiledModel, Any]:
    """(``load(path)``, the tokenizer saved beside it) — what ``python -m asaf_fx.eval MODEL_DIR`` reads."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if folder.is_dir() and not (folder / "tokenizer_config.json").is_file():  # before the slow rebuild
        raise FileNotFoundError(f"{folder} holds no tokenizer; save one beside the model with "
                                "asaf_fx.save(model, dir, tokenizer=tokenizer)")
    model = load(folder, **kwargs)
    return model, AutoTokenizer.from_pretrained(str(folder))
