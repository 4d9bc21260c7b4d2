"""Evaluate a causal LM: perplexity on a text file, and lm-eval tasks through lm-eval's Python API.

Both work on a transformers model and on the ``CompiledModel`` that ``asaf_fx.compile`` returns;
anything whose ``model(input_ids).logits`` is (batch, seq, vocab) will do for perplexity.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asaf_fx.data import perplexity, read_joined, token_windows

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (lm-eval seeds them again with the same value)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def read_text(path: str | Path) -> str:
    """``path`` read as ``asaf_fx.data.read_joined`` does, with errors that name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist; pass an existing UTF-8 text file")
    try:
        text = read_joined(path)
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"text file {path} is not UTF-8 ({exc.reason} at byte {exc.start}); convert it to UTF-8"
        ) from exc
    if not text.strip():
        raise ValueError(f"text file {path} is empty; pass a file with text in it")
    return text


def text_perplexity(
    model, tokenizer, path: str | Path, seq_len: int = 2048, windows: int | None = None
) -> dict[str, Any]:
    """Perplexity of ``model`` on the text of ``path``, WikiText-2 style.

    The file is read with the GPTQ/QuaRot convention (lines joined by blank lines,
    ``asaf_fx.data.read_joined``), tokenized once and cut from its start into ``windows``
    non-overlapping windows of ``seq_len`` tokens (``None``: every whole window). The result is
    exp(mean next-token NLL) over all windows (``asaf_fx.data.perplexity``).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}: a window needs at least 2 tokens to predict one")
    if windows is not None and windows < 1:
        raise ValueError(f"windows={windows}: ask for at least one window, or None for all of them")
    path = Path(path)
    text = read_text(path)
    try:
        ids = token_windows(tokenizer, text, seq_len, windows)
    except ValueError as exc:  # too few tokens for windows × seq_len
        raise ValueError(f"{path}: {exc}; ask for fewer windows or a shorter seq_len, or use a longer file") from exc
    if ids.shape[0] == 0:
        raise ValueError(f"{path} is shorter than one window of {seq_len} tokens; use a shorter seq_len or a longer "
                         f"file")
    ppl = perplexity(lambda batch: model(batch).logits, ids)
    return {"file": str(path), "seq_len": seq_len, "windows": int(ids.shape[0]), "perplexity": ppl}


class LMEvalAdapter(torch.nn.Module):
    """The parts of a transformers model that lm-eval's ``HFLM`` uses, around any causal LM module.

    ``HFLM(pretrained=<instance>)`` (lm-eval 0.4.13) reads ``.config`` (model type, context length)
    and ``.device``, calls ``.eval()`` and ``.tie_weights()``, and for causal models calls
    ``model(input_ids).logits`` without an attention mask (it right-pads a batch and drops the
    padded positions). ``generate_until`` tasks call transformers' ``generate`` with ``max_length``,
    a left-padding ``attention_mask``, ``stopping_criteria`` for the task's stop strings and
    ``pad_token_id``; here they become ``CompiledModel.generate``'s arguments (at most its
    ``max_batch`` rows at once).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @property
    def device(self) -> torch.device:
        tensor = next(iter(self.model.parameters()), None)
        if tensor is None:
            tensor = next(iter(self.model.buffers()), None)
        return torch.device("cpu") if tensor is None else tensor.device

    def train(self, mode: bool = True) -> LMEvalAdapter:
        # Exported graphs raise on train()/eval(); they are inference-only already.
        return self

    def tie_weights(self) -> None:
        # Nothing to tie: the compiled graphs already read one matrix where the model tied them.
        pass

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return self.model(input_ids, attention_mask=attention_mask)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, max_length: int,
                 stopping_criteria=None, pad_token_id: int | None = None, use_cache: bool = True,
                 **sampling) -> torch.Tensor:
        if input_ids.shape[0] > getattr(self.model, "max_batch", input_ids.shape[0]):
            raise ValueError(f"lm-eval asks to generate {input_ids.shape[0]} rows at once; the model takes at most "
                             f"{self.model.max_batch}: compile (or load) it with max_batch={input_ids.shape[0]}, or "
                             "pass a smaller batch_size")
        return self.model.generate(input_ids, attention_mask, max_new_tokens=max_length - input_ids.shape[1],
                                   pad_token_id=pad_token_id, stopping_criteria=stopping_criteria, **sampling)


def _task_manager(tasks: Sequence[str], include_path: str | Path | None):
    """A TaskManager that knows ``tasks``; lm-eval's built-in tasks are indexed only if needed.

    Indexing the ~15 000 built-in task files takes ~13 s on a 2-core CPU, so a run whose tasks all
    live under ``include_path`` skips it.
    """
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise FileNotFoundError(f"include path {include_path} is not a directory of lm-eval task YAML files")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        where = "lm-eval's built-in tasks" + (
            "" if include_path is None else f" or the YAML files under {include_path}"
        )
        raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)}: not among {where}; "
                         "check the name, or write a task YAML and pass its folder as include_path")
    return manager


def _jsonable(value: Any) -> Any:
    """lm-eval results as plain JSON values (tuples → lists, NumPy scalars → numbers, the rest as str)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _task_metrics(entry: dict[str, Any]) -> dict[str, Any]:
    """{"acc,none": 0.5, "alias": ...} → {"acc": 0.5}: drop lm-eval's bookkeeping and the "none" filter name."""
    skip = {"name", "alias", "sample_len"}
    return {key.removesuffix(",none"): _jsonable(v) for key, v in entry.items() if key not in skip}


def run_lm_eval(model, tokenizer, tasks: Sequence[str], *, include_path: str | Path | None = None,
                limit: int | None = None, batch_size: int = 1, seed: int = 0,
                log_samples: bool = False) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on ``model`` (a transformers model or a ``CompiledModel``).

    Tasks are lm-eval task names, built in or defined by YAML files under ``include_path``; a task
    reads local files with ``dataset_path: json`` and ``dataset_kwargs: {data_files: {test: /abs/path}}``
    (see docs/cli.md). ``limit`` caps the documents per task; every random seed lm-eval takes is
    ``seed``. Returns {"tasks": {task: {metric: value, "n": docs}}, "versions", "lm_eval_version",
    "limit", "seed"} and, with ``log_samples``, per-document "samples" (lm-eval's filtered
    responses: for log-likelihood tasks one (loglikelihood, is_greedy) pair per choice).
    """
    import lm_eval
    import transformers
    from lm_eval.models.huggingface import HFLM

    tasks = list(tasks)
    if not tasks:
        raise ValueError("no lm-eval tasks given")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit}: must be a positive number of documents per task")
    manager = _task_manager(tasks, include_path)
    wrapped = model if isinstance(model, transformers.PreTrainedModel) else LMEvalAdapter(model)
    lm = HFLM(pretrained=wrapped, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=log_samples,
                                  random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed)
    result: dict[str, Any] = {
        "tasks": {name: {**_task_metrics(entry), **({"n": entry["sample_len"]} if "sample_len" in entry else {})}
                  for name, entry in out["results"].items()},
        "versions": _jsonable(out.get("versions", {})),
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
        "limit": limit,
        "seed": seed,
    }
    if log_samples:
        result["samples"] = {
            name: [{"doc_id": s["doc_id"], "target": _jsonable(s["target"]), "resps": _jsonable(s["filtered_resps"]),
                    "metrics": {m: _jsonable(s[m]) for m in s.get("metrics", []) if m in s}} for s in samples]
            for name, samples in out["samples"].items()}
    return result


def evaluate(model, tokenizer, *, text: str | Path | None = None, seq_len: int = 2048, windows: int | None = 8,
             tasks: Sequence[str] | None = None, include_path: str | Path | None = None, limit: int | None = None,
             seed: int = 0) -> dict[str, Any]:
    """Perplexity on ``text`` (windows of ``seq_len`` tokens from its start, ``None`` = all) and the
    lm-eval ``tasks``; ``{"perplexity": ..., "lm_eval": ..., "seconds": ...}`` for what was asked."""
    if text is None and not tasks:
        raise ValueError("nothing to evaluate: give a text file, lm-eval tasks, or both")
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"include_path {include_path} is not a directory of lm-eval task YAML files")
    seed_everything(seed)
    report: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    if text is not None:
        start = time.perf_counter()
        report["perplexity"] = text_perplexity(model, tokenizer, text, seq_len, windows)
        seconds["perplexity"] = time.perf_counter() - start
    if tasks:
        start = time.perf_counter()
        report["lm_eval"] = run_lm_eval(model, tokenizer, tasks, include_path=include_path, limit=limit, seed=seed)
        seconds["lm_eval"] = time.perf_counter() - start
    report["seconds"] = seconds
    return report
