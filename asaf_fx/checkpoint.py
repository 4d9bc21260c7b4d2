"""``asaf_fx.save`` / ``asaf_fx.load``: a compiled model as safetensors + JSON, rebuilt without unpickling.

A checkpoint is a directory holding

* ``model.safetensors`` — every tensor the compiled graph reads: packed INT4 codes (uint8), their
  scales, the weights that stay float (embeddings, lm_head, 8/16-bit linears), rotation constants,
  keyed by attribute name; attributes that share memory (tied weights) are stored once and listed
  under ``aliases``. The KV cache is an input of the graph, not stored. The header records the
  schema and the sha256 of the JSON body;
* ``asaf_fx.json`` — the graph itself (``asaf_fx.passes.graph_json``: nodes, calling convention,
  attribute shapes), the transformers config, the QuantConfig, the plan, EOS ids, versions, the
  sha256 of the graph's code, and the sha256 of ``model.safetensors``;
* optionally the tokenizer's files (``save(..., tokenizer=)``), for ``python -m asaf_fx eval DIR``.

``load`` rebuilds the graph from its JSON and binds the tensors from the file, memory-mapped,
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

SCHEMA = "asaf_fx.checkpoint/3"
OLDER_SCHEMAS = ("asaf_fx.checkpoint/1", "asaf_fx.checkpoint/2")  # two graphs (forward, decode)
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


def _collect(gm: GraphModule) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to store by attribute, aliases: attribute -> the stored attribute it shares memory with)."""
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for target, tensor in graph_tensors(gm).items():
        first = seen.setdefault(_storage_key(tensor), target)
        if first == target:
            stored[target] = tensor
        else:
            aliases[target] = first
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
    gm = model.graph
    try:
        described = graph_to_json(gm, {n.target for n in written_attrs(gm)})
        json.dumps(described)
    except (GraphFormatError, TypeError, ValueError) as exc:
        raise CheckpointError(f"asaf_fx.save: the compiled graph cannot be written as JSON ({exc})") from exc
    stored, aliases = _collect(gm)
    folder.mkdir(parents=True, exist_ok=True)
    by_kind: dict[str, int] = {}
    for target, tensor in stored.items():
        name = _kind(gm, target, tensor)
        by_kind[name] = by_kind.get(name, 0) + tensor.numel() * tensor.element_size()
    body = {
        "schema": SCHEMA,
        "model_config": json.loads(model.config.to_json_string(use_diff=False)),
        "dtype": str(_embedding_dtype(gm)).removeprefix("torch."),
        "quant": model.quant.to_dict(),
        "plan": None if model.plan is None else json.loads(model.plan.to_json()),
        "eos_token_ids": model.eos_token_ids,
        "code_sha256": _code_sha256(gm),
        "graph": described,
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
    if isinstance(config, dict) and config.get("schema") in OLDER_SCHEMAS:
        raise CheckpointError(f"asaf_fx.load: {config_path} was written by an older asaf_fx ({config['schema']}: "
                              "separate forward and decode graphs); this one stores one graph. Compile the model "
                              "again and save it")
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


def _rebuild(body: dict[str, Any], tensors: dict[str, torch.Tensor], aliases: dict[str, str],
             device: torch.device) -> GraphModule:
    """The graph from its JSON, reading its tensors from the file (shared ones through ``aliases``)."""
    own = {}
    for name, spec in body["attributes"].items():
        if spec["state"]:
            continue
        source = aliases.get(name, name)
        if source not in tensors:
            raise CheckpointError(f"asaf_fx.load: {TENSORS_FILE} lacks tensor {name} that the graph reads; "
                                  "save the model again")
        own[name] = tensors[source]
    gm = graph_from_json(body, own, device)
    propagate_shapes(gm)  # node shapes, which inspect() and the kernels' fake functions read
    return gm


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu", backend: str | None = "auto",
         max_batch: int = 1, max_cache_len: int | None = None) -> CompiledModel:
    """The CompiledModel that ``save`` wrote to ``path``; its logits equal the saved model's bit for bit.

    Reads safetensors and JSON only (nothing is unpickled). ``backend``, ``max_batch`` and
    ``max_cache_len`` as in ``asaf_fx.compile``: the KV cache is chosen here, not stored.
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
    try:
        gm = _rebuild(config["graph"], tensors, aliases, device)
    except (GraphFormatError, KeyError, TypeError) as exc:
        raise CheckpointError(f"asaf_fx.load: {folder / CONFIG_FILE} does not describe a graph this asaf_fx can "
                              f"rebuild ({exc!r}); save the model again") from exc
    used = {aliases.get(name, name) for name, spec in config["graph"]["attributes"].items() if not spec["state"]}
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise CheckpointError(f"asaf_fx.load: {TENSORS_FILE} holds tensors the graph does not read ({unexpected[:5]}); "
                              "it was written for another model — save the model again")
    if config.get("code_sha256") != _code_sha256(gm):
        raise CheckpointError(f"asaf_fx.load: the rebuilt graph differs from the saved one (written with "
                              f"{config.get('versions')}, loading with {versions}); load with the versions that "
                              "wrote it, or compile and save the model again")
    return CompiledModel(gm, _hf_config(config["model_config"]), quant, plan=plan, max_batch=max_batch,
                         max_cache_len=max_cache_len, eos_token_id=config.get("eos_token_ids"), backend=backend)


def load_saved(path: str | os.PathLike, **kwargs) -> tuple[CompiledModel, Any]:
    """(``load(path)``, the tokenizer saved beside it) — what ``python -m asaf_fx eval MODEL_DIR`` reads."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if folder.is_dir() and not (folder / "tokenizer_config.json").is_file():  # before the slow rebuild
        raise FileNotFoundError(f"{folder} holds no tokenizer; save one beside the model with "
                                "asaf_fx.save(model, dir, tokenizer=tokenizer)")
    model = load(folder, **kwargs)
    return model, AutoTokenizer.from_pretrained(str(folder))
