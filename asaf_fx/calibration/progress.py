"""Resumable calibration progress: every measured value, saved atomically after each one.

The file is JSON: ``{"schema", "fingerprint", "values": [[start, length, level, value, stderr], ...]}``
(``stderr`` is the value's standard error, null where unknown; files of schema 1, without it, are
still read).
Python's JSON writes floats in their shortest exact form, so a resumed run reads back exactly the
values an uninterrupted one would hold. The fingerprint describes the model and every setting
that changes a value; a file made under another fingerprint is refused rather than mixed in.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from asaf_fx._atomic import write_text_atomic
from asaf_fx.calibration.entries import Entry

PROGRESS_SCHEMA = "asaf_fx.calibration_progress/2"
_SCHEMAS = (PROGRESS_SCHEMA, "asaf_fx.calibration_progress/1")

ValueAndError = tuple[float, float]  # (value, its standard error; NaN = unknown)


class Progress:
    def __init__(self, path: str | os.PathLike, fingerprint: dict[str, Any]) -> None:
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))  # normalise types
        self.values: dict[Entry, ValueAndError] = {}
        if self.path.exists():
            self._resume()

    def _resume(self) -> None:
        try:
            body = json.loads(self.path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{self.path} is not a calibration progress file ({exc}); move it away") from exc
        if not isinstance(body, dict) or body.get("schema") not in _SCHEMAS:
            raise ValueError(f"{self.path} is not a calibration progress file of schema {PROGRESS_SCHEMA}")
        theirs = body.get("fingerprint", {})
        if theirs != self.fingerprint:
            differing = sorted(
                k for k in set(theirs) | set(self.fingerprint) if theirs.get(k) != self.fingerprint.get(k)
            )
            raise ValueError(
                f"{self.path} holds progress for another model or configuration (differs in: "
                f"{', '.join(differing)}); use another --out, or delete it to start over"
            )
        self.values = {(int(i), int(n), int(k)): (float(v), math.nan if not rest or rest[0] is None else float(rest[0]))
                       for i, n, k, v, *rest in body["values"]}

    def record(self, entry: Entry, value: float, stderr: float = math.nan) -> None:
        self.values[entry] = (float(value), float(stderr))
        self.save()

    def merge(self, values: dict[Entry, ValueAndError]) -> None:
        self.values.update(values)
        self.save()

    def save(self) -> None:
        body = {
            "schema": PROGRESS_SCHEMA,
            "fingerprint": self.fingerprint,
            "values": [[*entry, value, None if math.isnan(stderr) else stderr]
                       for entry, (value, stderr) in sorted(self.values.items())],
        }
        write_text_atomic(self.path, json.dumps(body))

    def missing(self, entries: list[Entry]) -> list[Entry]:
        return [entry for entry in entries if entry not in self.values]
