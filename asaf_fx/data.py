"""Text: WikiText-2 (embedded by default), windows in the GPTQ/QuaRot joining convention, perplexity.

The package ships gzip copies of WikiText-2's validation split (for calibration) and test split (for
evaluation) in ``asaf_fx/text/``, laid out like a data folder: ``wikitext-2/wiki.valid.tokens`` and
``wikitext-2-raw/wiki.test.raw`` (source and licence in that folder's README). ``$ASAF_FX_DATA``
names another folder with the same layout; a file there may be plain or gzip (``.gz``).
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

DATA_ENV = "ASAF_FX_DATA"
EMBEDDED = Path(__file__).resolve().parent / "text"


def data_dir() -> Path:
    """The data folder: ``$ASAF_FX_DATA``, else the WikiText-2 copies embedded in the package."""
    return Path(os.environ[DATA_ENV]) if os.environ.get(DATA_ENV) else EMBEDDED


def _in_data(root: Path | None, relative: str) -> Path:
    """``root/relative``, or its ``.gz`` copy where only that exists."""
    path = (root if root is not None else data_dir()) / relative
    packed = path.with_name(path.name + ".gz")
    return packed if not path.is_file() and packed.is_file() else path


def wikitext2_test_path(root: Path | None = None) -> Path:
    """The test split: evaluation only."""
    return _in_data(root, "wikitext-2-raw/wiki.test.raw")


def wikitext2_valid_path(root: Path | None = None) -> Path:
    """The validation split: calibration data (never calibrate on the test split)."""
    return _in_data(root, "wikitext-2/wiki.valid.tokens")


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def read_joined(path: str | os.PathLike) -> str:
    """Lines without their line ends, joined with "\\n\\n" (the WikiText-2 convention of GPTQ and QuaRot).

    A ``.gz`` file is read decompressed."""
    with _open_text(Path(path)) as f:
        lines = [line.rstrip("\r\n") for line in f]
    return "\n\n".join(lines)


def text_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a text file's content (of the decompressed bytes for ``.gz``), so that a gzip copy
    and the plain file it was made from are the same text."""
    path = Path(path)
    digest = hashlib.sha256()
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def calibration_windows(tokenizer, path: str | os.PathLike, n_windows: int = 32, seq_len: int = 512,
                        seed: int = 0) -> torch.Tensor:
    """``n_windows`` windows of ``seq_len`` tokens drawn (seeded, without repeats) from a text file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"calibration text {path} does not exist; pass a text file (e.g. WikiText-2 validation)"
        )
    pool = token_windows(tokenizer, read_joined(path), seq_len)
    if pool.shape[0] < n_windows:
        raise ValueError(f"{path} has only {pool.shape[0]} windows of {seq_len} tokens, {n_windows} were asked for; "
                         "use fewer or shorter windows, or a longer text")
    return pool[_drawn(pool.shape[0], n_windows, seed)]


def _drawn(pool: int, n_windows: int, seed: int) -> torch.Tensor:
    """Indices of the windows :func:`calibration_windows` draws from a pool of ``pool`` windows."""
    return torch.randperm(pool, generator=torch.Generator().manual_seed(seed))[:n_windows]


def check_windows(tokenizer, path: str | os.PathLike, n_windows: int | None, seq_len: int, *,
                  avoid: tuple[int, int, int]) -> torch.Tensor:
    """``n_windows`` windows of ``seq_len`` tokens of a text file (None: all), the last ones in text
    order that share no token with the draw ``avoid = (n_windows, seq_len, seed)`` of
    :func:`calibration_windows` from the same file: text held out from calibration that a run may
    still make choices on."""
    ids = tokenizer(read_joined(path), return_tensors="pt").input_ids[0]
    drawn_n, drawn_len, seed = avoid
    used = torch.zeros(ids.numel(), dtype=torch.bool)
    for index in _drawn(ids.numel() // drawn_len, drawn_n, seed).tolist():
        used[index * drawn_len:(index + 1) * drawn_len] = True
    free = [start for start in range(0, ids.numel() - seq_len + 1, seq_len) if not used[start:start + seq_len].any()]
    n = len(free) if n_windows is None else n_windows
    if not 0 < n <= len(free):
        raise ValueError(f"{path} has {len(free)} windows of {seq_len} tokens outside the calibration windows, "
                         f"{n} were asked for; use fewer or shorter windows, or a longer text")
    return torch.stack([ids[start:start + seq_len] for start in free[len(free) - n:]])
