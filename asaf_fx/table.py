"""The sensitivity table the solver reads: measured degradation Ξ and FLOPs H per (group, level).

A *group* is a run of consecutive decoder layers ``start .. start + length - 1``. For every group
and every sparsity level ``k`` the table holds

* ``degradation[start, length - 1, k]`` — Ξ, the measured degradation of pruning exactly that group
  at ``sparsities[k]`` (NaN where it was not measured: the solver treats the choice as unavailable);
* ``flops[start, length - 1, k]`` — H, the group's FLOPs per token after pruning. By default
  ``sum(layer_flops[start:start+length]) * (1 - sparsities[k])``; calibration passes the real
  numbers, since pruning whole channels at a fixed granularity is not exactly linear in s.

Entries with ``start + length > p`` describe no group and must be NaN in ``degradation``.
``measured`` marks which finite entries were measured; the others were estimated by calibration
from the measured ones (by default every finite entry counts as measured). ``stderr`` is each
entry's standard error (NaN where unknown: tables of schema 2 and older, hand-made tables); the
solver charges ξ + z·stderr where it is known.
Files are safetensors (arrays) with the metadata as JSON in the safetensors header; nothing is
ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from asaf_fx._atomic import atomic_path

TABLE_SCHEMA = "asaf_fx.sensitivity_table/3"
# Version 2 had no standard errors (read as unknown); version 1 had no content hash either (read,
# with a warning).
_READABLE_SCHEMAS = (TABLE_SCHEMA, "asaf_fx.sensitivity_table/2")
_UNHASHED_SCHEMA = "asaf_fx.sensitivity_table/1"
log = logging.getLogger(__name__)


def _as_float_array(name: str, value: Any, ndim: int) -> np.ndarray:
    try:
        array = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"SensitivityTable: {name} must be numeric, got {type(value).__name__}") from exc
    if array.ndim != ndim:
        raise ValueError(f"SensitivityTable: {name} must have {ndim} dimension(s), got shape {array.shape}")
    return array


def _group_exists_mask(p: int) -> np.ndarray:
    """(p, p) mask: True where ``start + length <= p``, i.e. the index names a real group."""
    start = np.arange(p)[:, None]
    length = np.arange(1, p + 1)[None, :]
    return start + length <= p


@dataclass(frozen=True, eq=False)
class SensitivityTable:
    """Measured degradation (Ξ) and FLOPs (H) of pruning each group of consecutive layers.

    Args:
        layer_flops: shape (p,), dense linear FLOPs per token of each decoder layer (φ).
        sparsities: shape (S,), the sparsity grid, strictly increasing, each in [0, 1).
        degradation: shape (p, p, S); ``degradation[i, n-1, k]`` is the degradation of pruning
            layers ``i .. i+n-1`` at ``sparsities[k]``; NaN = not measured (choice unavailable).
        flops: optional shape (p, p, S) table H of the pruned group's FLOPs per token. Defaults to
            ``sum(layer_flops[i:i+n]) * (1 - sparsities[k])``.
        meta: JSON-serialisable dict (model, metric, calibration settings, ...).
        measured: optional (p, p, S) bool mask of the entries that were measured rather than
            estimated; default: every non-NaN entry.
        stderr: optional (p, p, S) standard error of each entry, ≥ 0; NaN = unknown (the default).
    """

    layer_flops: np.ndarray
    sparsities: np.ndarray
    degradation: np.ndarray
    flops: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    measured: np.ndarray | None = None
    stderr: np.ndarray | None = None

    def __post_init__(self) -> None:
        layer_flops = _as_float_array("layer_flops", self.layer_flops, 1)
        sparsities = _as_float_array("sparsities", self.sparsities, 1)
        degradation = _as_float_array("degradation", self.degradation, 3)
        p, n_levels = layer_flops.shape[0], sparsities.shape[0]
        if p == 0:
            raise ValueError("SensitivityTable: layer_flops is empty; a model has at least one layer")
        if n_levels == 0:
            raise ValueError("SensitivityTable: sparsities is empty; give at least one sparsity level")
        if not np.all(np.isfinite(layer_flops)) or np.any(layer_flops <= 0):
            bad = int(np.flatnonzero(~np.isfinite(layer_flops) | (layer_flops <= 0))[0])
            raise ValueError(
                f"SensitivityTable: layer_flops must be finite and positive; layer {bad} has "
                f"{float(layer_flops[bad])!r}"
            )
        if not np.all(np.isfinite(sparsities)) or np.any(sparsities < 0) or np.any(sparsities >= 1):
            raise ValueError(f"SensitivityTable: every sparsity must lie in [0, 1); got {sparsities.tolist()}")
        if np.any(np.diff(sparsities) <= 0):
            raise ValueError(
                f"SensitivityTable: sparsities must be strictly increasing; got {sparsities.tolist()}"
            )
        expected = (p, p, n_levels)
        if degradation.shape != expected:
            raise ValueError(
                f"SensitivityTable: degradation must have shape (p, p, S) = {expected} for "
                f"{p} layers and {n_levels} sparsities; got {degradation.shape}"
            )
        if np.any(np.isinf(degradation)):
            raise ValueError("SensitivityTable: degradation holds ±inf; use NaN for choices that were not measured")
        exists = _group_exists_mask(p)
        outside = ~np.isnan(degradation) & ~exists[:, :, None]
        if np.any(outside):
            i, n1, k = (int(v) for v in np.argwhere(outside)[0])
            raise ValueError(
                f"SensitivityTable: degradation[{i}, {n1}, {k}] is set but layers {i}..{i + n1} run past the "
                f"last layer {p - 1}; entries with start + length > p must be NaN "
                "(check the index order: [start, length - 1, level])"
            )
        if self.flops is None:
            flops = self.default_flops(layer_flops, sparsities)
        else:
            flops = _as_float_array("flops", self.flops, 3)
            if flops.shape != expected:
                raise ValueError(f"SensitivityTable: flops must have shape {expected}; got {flops.shape}")
            usable = ~np.isnan(degradation)
            bad = usable & ~(np.isfinite(flops) & (flops >= 0))
            if np.any(bad):
                i, n1, k = (int(v) for v in np.argwhere(bad)[0])
                raise ValueError(
                    f"SensitivityTable: flops[{i}, {n1}, {k}] = {float(flops[i, n1, k])!r}; FLOPs must be finite and "
                    "non-negative wherever degradation is measured"
                )
        if self.measured is None:
            measured = ~np.isnan(degradation)
        else:
            measured = np.array(self.measured, dtype=bool)
            if measured.shape != expected:
                raise ValueError(f"SensitivityTable: measured must have shape {expected}; got {measured.shape}")
            if np.any(measured & np.isnan(degradation)):
                raise ValueError("SensitivityTable: an entry is marked measured but its degradation is NaN")
        if self.stderr is None:
            stderr = np.full(expected, np.nan)
        else:
            stderr = _as_float_array("stderr", self.stderr, 3)
            if stderr.shape != expected:
                raise ValueError(f"SensitivityTable: stderr must have shape {expected}; got {stderr.shape}")
            if np.any(stderr < 0) or np.any(np.isinf(stderr)):
                raise ValueError("SensitivityTable: a standard error is negative or infinite; use NaN for unknown")
            stderr = np.where(np.isnan(degradation), np.nan, stderr)
        meta = dict(self.meta or {})
        try:
            json.dumps(meta)
        except TypeError as exc:
            raise ValueError(f"SensitivityTable: meta must be JSON-serialisable: {exc}") from exc
        for name, value in (
            ("layer_flops", layer_flops),
            ("sparsities", sparsities),
            ("degradation", degradation),
            ("flops", flops),
            ("measured", measured),
            ("stderr", stderr),
        ):
            value.setflags(write=False)
            object.__setattr__(self, name, value)
        object.__setattr__(self, "meta", meta)

    @staticmethod
    def default_flops(layer_flops: np.ndarray, sparsities: np.ndarray) -> np.ndarray:
        """H[i, n-1, k] = sum(φ[i:i+n]) · (1 − s_k); NaN where the group does not exist."""
        p = layer_flops.shape[0]
        prefix = np.concatenate([[0.0], np.cumsum(layer_flops)])
        start = np.arange(p)[:, None]
        stop = np.minimum(start + np.arange(1, p + 1)[None, :], p)
        group = prefix[stop] - prefix[start]
        group = np.where(_group_exists_mask(p), group, np.nan)
        return group[:, :, None] * (1.0 - sparsities[None, None, :])

    @property
    def num_layers(self) -> int:
        return int(self.layer_flops.shape[0])

    @property
    def dense_flops(self) -> float:
        return math.fsum(self.layer_flops.tolist())

    def save(self, path: str | os.PathLike) -> None:
        """Write arrays as safetensors and ``meta`` as JSON in its header, atomically."""
        from safetensors.numpy import save_file

        arrays = {
            "layer_flops": np.ascontiguousarray(self.layer_flops),
            "sparsities": np.ascontiguousarray(self.sparsities),
            "degradation": np.ascontiguousarray(self.degradation),
            "flops": np.ascontiguousarray(self.flops),
            "measured": self.measured.astype(np.uint8),
            "stderr": np.ascontiguousarray(self.stderr),
        }
        meta = json.dumps(self.meta, sort_keys=True)
        header = {"schema": TABLE_SCHEMA, "meta": meta, "content_sha256": _content_sha256(arrays, meta)}
        with atomic_path(path) as tmp:
            save_file(arrays, str(tmp), metadata=header)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SensitivityTable:
        """Read a table written by :meth:`save` (safetensors only; never unpickles)."""
        from safetensors import SafetensorError, safe_open

        if not os.path.isfile(path):
            raise FileNotFoundError(f"SensitivityTable.load: no such file: {path}")
        try:
            with safe_open(str(path), framework="numpy") as f:
                header = f.metadata() or {}
                arrays = {key: f.get_tensor(key) for key in f.keys()}
        except SafetensorError as exc:
            raise ValueError(f"SensitivityTable.load: {path} is not a safetensors file ({exc})") from exc
        schema = header.get("schema")
        if schema is None:
            raise ValueError(f"SensitivityTable.load: the header of {path} has no schema field {sorted(header)}: "
                             f"the file "
                             "is corrupt or was not written by SensitivityTable.save; measure the table again")
        if schema not in (*_READABLE_SCHEMAS, _UNHASHED_SCHEMA):
            raise ValueError(
                f"SensitivityTable.load: {path} has schema {schema!r}; this asaf_fx reads {TABLE_SCHEMA!r}"
            )
        missing = {"layer_flops", "sparsities", "degradation", "flops"} - arrays.keys()
        if missing:
            raise ValueError(f"SensitivityTable.load: {path} lacks arrays {sorted(missing)}")
        if schema == _UNHASHED_SCHEMA:
            log.warning("%s has no content hash (schema %s): it cannot be checked for edits", path, schema)
        elif header.get("content_sha256") != _content_sha256(arrays, header.get("meta", "")):
            raise ValueError(f"SensitivityTable.load: the content of {path} does not match the sha256 recorded in its "
                             "header: a value or the metadata was edited or corrupted after it was saved; measure the "
                             "table again (python -m asaf_fx calibrate) or restore the file")
        try:
            meta = json.loads(header.get("meta", "{}"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"SensitivityTable.load: {path} has a corrupt meta header ({exc})") from exc
        return cls(
            layer_flops=arrays["layer_flops"],
            sparsities=arrays["sparsities"],
            degradation=arrays["degradation"],
            flops=arrays["flops"],
            meta=meta,
            measured=arrays["measured"].astype(bool) if "measured" in arrays else None,
            stderr=arrays.get("stderr"),
        )


def _content_sha256(arrays: dict[str, np.ndarray], meta: str) -> str:
    """sha256 over every array (name, dtype, shape, bytes, in name order) and the meta JSON text."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(json.dumps([name, array.dtype.str, list(array.shape)]).encode())
        digest.update(array.tobytes())
    digest.update(meta.encode("utf-8"))
    return digest.hexdigest()
