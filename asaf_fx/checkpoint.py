"""``asaf_fx.save`` / ``asaf_fx.load``: a compiled model as safetensors + JSON, rebuilt without unpickling.

A checkpoint is a directory holding

* ``model.safetensors`` — every tensor the compiled graphs read: packed INT4 codes (uint8), their
  scales, the weights that stay float (embeddings, lm_head, 8/16-bit linears), rotation constants.
  Keys are ``forward/<attribute>`` and ``decode/<attribute>``; a decode attribute bound to a
  forward tensor (``share_weights``) is stored once and listed under ``aliases``. The decode
  graph's KV-cache buffers are state, not weights, and are not stored. The header records the
  schema and the sha256 of the JSON body;
* ``asaf_fx.json`` — the graphs themselves (``asaf_fx.passes.graph_json``: nodes, calling
  convention, attribute shapes), the transformers config, the QuantConfig, the plan, the decode
  cache length, EOS ids, versions, the sha256 of each graph's code, and the sha256 of
  ``model.safetensors``;
* optionally the tokenizer's files (``save(..., tokenizer=)``), for ``python -m asaf_fx eval DIR``.

``load`` rebuilds each graph from its JSON and binds the tensors from the file, memory-mapped,
refusing any missing, unexpected or misshapen one; no model is built and no pass runs again, so a
checkpoint loads in seconds and computes exactly what the saved model computed (every tensor is
stored in the row-major layout the compiled graph already used). The rebuilt code must hash as
the saved code did. The two file hashes bind the files to each other: editing either one is
refused. Files are written tensors first, JSON last, each atomically, so an interrupted save never
leaves a directory that loads; ``save`` refuses a directory that already holds a checkpoint unless
asked to overwrite it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule

import asaf_fx.triton_kernels.ops  # noqa: F401  registers the kernel ops the graphs call
from asaf_fx._atomic import atomic_path, sha256_file, write_text_atomic
from asaf_fx.compiled_model import CompiledModel
from asaf_fx.config import QuantConfig
from asaf_fx.passes.graph_json import GraphFormatError, graph_from_json, graph_to_json
from asaf_fx.passes.graph_utils import aten, get_tensor, is_op, written_attrs
from asaf_fx.passes.infra import propagate_shapes
from asaf_fx.plan import Plan

log = logging.getLogger(__name__)

SCHEMA = "asaf_fx.checkpoint/2"
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


def graph_tensors(gm: GraphModule) -> dict[str, torch.Tensor]:
    """Every tensor attribute the graph reads through a ``get_attr`` node, except mutated state."""
    state = {n.target for n in written_attrs(gm)}
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
    return {
        "forward": model.forward_graph,
        **({"decode": model.decode_graph} if model.decode_graph is not None else {}),
    }


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


def save(model: CompiledModel, path: str | os.PathLike, *, tokenizer=None, overwrite: bool = False) -> CheckpointInfo:
    """Write ``model`` (from ``asaf_fx.compile``) to the directory ``path``; see the module docstring.

    ``tokenizer``, if given, is saved beside it (``save_pretrained``) so that
    ``python -m asaf_fx eval DIR`` can read text. A directory that already holds a checkpoint is
    refused unless ``overwrite``. Returns the tensors file's size, total and per kind.
    """
    from safetensors.torch import save_file

    if not isinstance(model, CompiledModel):
        raise TypeError(
            f"asaf_fx.save takes the CompiledModel that asaf_fx.compile returns, got {type(model).__name__}"
        )
    folder = Path(path)
    if not overwrite and any((folder / name).exists() for name in (CONFIG_FILE, TENSORS_FILE)):
        raise FileExistsError(f"asaf_fx.save: {folder} already holds a checkpoint; choose another directory or pass "
                              "overwrite=True")
    graphs = _graphs(model)
    try:
        described = {kind: graph_to_json(gm, {n.target for n in written_attrs(gm)}) for kind, gm in graphs.items()}
        json.dumps(described)
    except (GraphFormatError, TypeError, ValueError) as exc:
        raise CheckpointError(f"asaf_fx.save: the compiled graphs cannot be written as JSON ({exc})") from exc
    stored, aliases = _collect(graphs)
    folder.mkdir(parents=True, exist_ok=True)
    by_kind: dict[str, int] = {}
    for key, tensor in stored.items():
        kind, _, target = key.partition("/")
        name = _kind(graphs[kind], target, tensor)
        by_kind[name] = by_kind.get(name, 0) + tensor.numel() * tensor.element_size()
    body = {
        "schema": SCHEMA,
        "model_config": json.loads(model.config.to_json_string(use_diff=False)),
        "dtype": str(_embedding_dtype(model.forward_graph)).removeprefix("torch."),
        "quant": model.quant.to_dict(),
        "plan": None if model.plan is None else json.loads(model.plan.to_json()),
        "max_cache_len": model.max_cache_len,
        "decode_batch": model.decode_batch,
        "eos_token_ids": model.eos_token_ids,
        "graphs": {kind: {"code_sha256": _code_sha256(gm), "graph": described[kind]} for kind, gm in graphs.items()},
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


def _hf_config(values: dict[str, Any]):
    """The transformers config the checkpoint recorded (no model is built from it)."""
    from transformers import AutoConfig

    values = dict(values)
    model_type = values.pop("model_type", None)
    if not isinstance(model_type, str):
        raise CheckpointError("asaf_fx.load: the saved transformers config has no model_type; save the model again")
    return AutoConfig.for_model(model_type, **values)


def _rebuild(kind: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor], aliases: dict[str, str],
             device: torch.device, used: set[str]) -> GraphModule:
    """One graph from its JSON, reading its tensors from the file (shared ones through ``aliases``)."""
    body = entry["graph"]
    own = {}
    for name, spec in body["attributes"].items():
        if spec["state"]:
            continue
        key = f"{kind}/{name}"
        source = aliases.get(key, key)
        if source not in tensors:
            raise CheckpointError(f"asaf_fx.load: {TENSORS_FILE} lacks tensor {key} that the {kind} graph reads; "
                                  "save the model again")
        own[name] = tensors[source]
        used.add(source)
    gm = graph_from_json(body, own, device)
    propagate_shapes(gm)  # node shapes, which inspect() and the kernels' fake functions read
    return gm


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
        aliases = dict(config["aliases"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"asaf_fx.load: {folder / CONFIG_FILE} lacks or garbles a field ({exc!r}); "
                              "save the model again") from exc
    device = torch.device(device)
    tensors = load_file(str(folder / TENSORS_FILE), device=str(device))
    graphs: dict[str, GraphModule] = {}
    used: set[str] = set()
    try:
        for kind, entry in config["graphs"].items():
            graphs[kind] = _rebuild(kind, entry, tensors, aliases, device, used)
    except (GraphFormatError, KeyError, TypeError) as exc:
        raise CheckpointError(f"asaf_fx.load: {folder / CONFIG_FILE} does not describe a graph this asaf_fx can "
                              f"rebuild ({exc!r}); save the model again") from exc
    unexpected = sorted(set(tensors) - used)
    if unexpected or "forward" not in graphs:
        raise CheckpointError(f"asaf_fx.load: {TENSORS_FILE} holds tensors no graph reads ({unexpected[:5]}) or no "
                              "forward graph; it was written for another model — save the model again")
    for kind, gm in graphs.items():
        if config["graphs"][kind].get("code_sha256") != _code_sha256(gm):
            raise CheckpointError(f"asaf_fx.load: the rebuilt {kind} graph differs from the saved one (written with "
                                  f"{config.get('versions')}, loading with {versions}); load with the versions that "
                                  "wrote it, or compile and save the model again")
    return CompiledModel(graphs["forward"], graphs.get("decode"), _hf_config(config["model_config"]), quant,
                         plan=plan, eos_token_id=config.get("eos_token_ids"), backend=backend)



def load_saved(path: str | os.PathLike, **kwargs) -> tuple[CompiledModel, Any]:
    """(``load(path)``, the tokenizer saved beside it) — what ``python -m asaf_fx eval MODEL_DIR`` reads."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if folder.is_dir() and not (folder / "tokenizer_config.json").is_file():  # before the slow rebuild
        raise FileNotFoundError(f"{folder} holds no tokenizer; save one beside the model with "
                                "asaf_fx.save(model, dir, tokenizer=tokenizer)")
    model = load(folder, **kwargs)
    return model, AutoTokenizer.from_pretrained(str(folder))
