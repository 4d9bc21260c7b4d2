"""Evaluation text: WikiText-2 windows (GPTQ/QuaRot joining convention) and perplexity."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

DATA_ENV = "ASAF_FX_DATA"


def data_dir(repo_root: Path | None = None) -> Path:
    """The shared data folder: ``$ASAF_FX_DATA``, else ``../shared/data`` next to the repository."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    root = repo_root if repo_root is not None else Path(__file__).resolve().parent.parent
    return root.parent / "shared" / "data"


def wikitext2_test_path(root: Path | None = None) -> Path:
    return (root if root is not None else data_dir()) / "wikitext-2-raw" / "wiki.test.raw"


def read_joined(path: Path) -> str:
    """Lines without their line ends, joined with "\\n\\n" (the convention in shared/data/README.md)."""
    with open(path, encoding="utf-8", newline="") as f:
        lines = [line.rstrip("\r\n") for line in f]
    return "\n\n".join(lines)


def token_windows(tokenizer, text: str, seq_len: int = 2048, n_windows: int | None = None) -> torch.Tensor:
    """Tokenize ``text`` once and cut non-overlapping windows: LongTensor (n_windows, seq_len)."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    available = ids.numel() // seq_len
    n = available if n_windows is None else n_windows
    if n > available:
        raise ValueError(f"text has {ids.numel()} tokens: only {available} windows of {seq_len}, asked for {n}")
    return ids[: n * seq_len].view(n, seq_len)


def perplexity(logits_fn: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor, batch_size: int = 1) -> float:
    """exp(mean next-token NLL) over all windows; ``logits_fn(ids)`` returns (batch, seq, vocab) logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start:start + batch_size]
            logits = logits_fn(batch).float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            total += float(nll)
            count += batch[:, 1:].numel()
    return math.exp(total / count)


def wikitext2_valid_path(root: Path | None = None) -> Path:
    """The validation split: calibration data (never calibrate on the test split)."""
    return (root if root is not None else data_dir()) / "wikitext-2" / "wiki.valid.tokens"


def calibration_windows(tokenizer, path: str | os.PathLike, n_windows: int = 32, seq_len: int = 512,
                        seed: int = 0) -> torch.Tensor:
    """``n_windows`` windows of ``seq_len`` tokens drawn (seeded, without repeats) from a text file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration text {path} does not exist; pass a text file (e.g. WikiText-2 validation)")
    pool = token_windows(tokenizer, read_joined(path), seq_len)
    if pool.shape[0] < n_windows:
        raise ValueError(f"{path} has only {pool.shape[0]} windows of {seq_len} tokens, {n_windows} were asked for; "
                         "use fewer or shorter windows, or a longer text")
    order = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(seed))
    return pool[order[:n_windows]]
