"""Measure table entries resumably, optionally split across torch.distributed processes.

Each process measures every ``world``-th entry not measured before and records each value
atomically in its own progress file (``<out>.progress-<rank>.json``) as soon as it has it, so an
interrupt or crash loses at most the measurement in flight. On start, values are read back from
every progress file of the same output — whatever the earlier world size was — after checking the
fingerprint. With ``world > 1`` the processes exchange their values with ``all_gather_object`` at
the end; all of them return the same complete dictionary.

``measure`` returns a value or ``(value, standard error)``; the result maps each entry to the pair
(standard error NaN where the measurement gave none).

A measurement must depend only on its entry (seeded, no hidden state), which is what makes a
resumed or distributed run produce the same table as a single uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from asaf_fx.calibration.entries import Entry
from asaf_fx.calibration.progress import Progress, ValueAndError


def progress_files(out: str | os.PathLike) -> list[Path]:
    out = Path(out)
    return sorted(out.parent.glob(f"{out.name}.progress-*.json"))


def measure_entries(
    entries: list[Entry],
    measure: Callable[[Entry], float | ValueAndError],
    out: str | os.PathLike,
    fingerprint: dict[str, Any],
    *,
    rank: int = 0,
    world: int = 1,
    on_measured: Callable[[Entry, ValueAndError], None] | None = None,
    on_todo: Callable[[int], None] | None = None,
) -> dict[Entry, ValueAndError]:
    known: dict[Entry, ValueAndError] = {}
    for path in progress_files(out):
        known.update(Progress(path, fingerprint).values)
    wanted = set(entries)
    mine = Progress(f"{out}.progress-{rank}.json", fingerprint)
    mine.values.update({e: v for e, v in known.items() if e in wanted})
    todo = [e for index, e in enumerate(entries) if index % world == rank and e not in known]
    if on_todo is not None:
        on_todo(len(todo))
    for entry in todo:
        result = measure(entry)
        value, stderr = result if isinstance(result, tuple) else (result, math.nan)
        mine.record(entry, value, stderr)
        if on_measured is not None:
            on_measured(entry, mine.values[entry])
    values = dict(mine.values)
    if world > 1:
        import torch.distributed as dist

        gathered: list[dict[Entry, ValueAndError] | None] = [None] * world
        dist.all_gather_object(gathered, values)
        for part in gathered:
            values.update(part or {})
    return {e: v for e, v in sorted(values.items()) if e in wanted}


def remove_progress(out: str | os.PathLike) -> None:
    """Delete the progress files once the finished table has been written."""
    for path in progress_files(out):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
