"""Estimate the degradation of groups that were not measured from the ones that were.

Every estimate starts from the sum of the group's single-layer degradations at the same level,
``Σ = Σ_{l∈L} ξ(l, s)``, because single layers are always measured. Three models of how a group
relates to that sum are fitted to the measured multi-layer groups:

* ``sum``: ξ̂ = Σ (damage is additive);
* ``interaction``: ξ̂ = Σ · (1 + κ (n − 1)) (each extra layer adds a fixed share);
* ``affine``: ξ̂ = a Σ + b Σ (n − 1).

The model with the lowest 5-fold cross-validated RMSE on the measured groups wins; plain sums are
used only if they fit best, or when nothing but single layers was measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from asaf_fx.calibration.entries import Entry


@dataclass(frozen=True)
class GroupModel:
    name: str
    coefficients: tuple[float, ...]

    def predict(self, total: np.ndarray, length: np.ndarray) -> np.ndarray:
        extra = total * (length - 1)
        if self.name == "sum":
            return total
        if self.name == "interaction":
            return total + self.coefficients[0] * extra
        return self.coefficients[0] * total + self.coefficients[1] * extra


def _fit(name: str, total: np.ndarray, length: np.ndarray, target: np.ndarray) -> GroupModel:
    extra = total * (length - 1)
    if name == "sum":
        return GroupModel("sum", ())
    if name == "interaction":
        denominator = float(extra @ extra)
        kappa = float((target - total) @ extra / denominator) if denominator > 0 else 0.0
        return GroupModel("interaction", (kappa,))
    features = np.stack([total, extra], axis=1)
    solution, *_ = np.linalg.lstsq(features, target, rcond=None)
    return GroupModel("affine", (float(solution[0]), float(solution[1])))


MODELS = ("sum", "interaction", "affine")


def select_group_model(
    total: np.ndarray, length: np.ndarray, target: np.ndarray, *, folds: int = 5, seed: int = 0
) -> tuple[GroupModel, dict[str, float]]:
    """Fit every model on all points; pick the one with the lowest cross-validated RMSE."""
    if target.size < folds:
        return GroupModel("sum", ()), {}
    order = np.random.default_rng(seed).permutation(target.size)
    split = np.array_split(order, folds)
    errors = {}
    for name in MODELS:
        squared = 0.0
        for held in split:
            train = np.setdiff1d(order, held)
            model = _fit(name, total[train], length[train], target[train])
            squared += float(((model.predict(total[held], length[held]) - target[held]) ** 2).sum())
        errors[name] = (squared / target.size) ** 0.5
    # Ties go to the simpler model (MODELS is ordered by complexity).
    best = min(MODELS, key=lambda name: (round(errors[name], 15), MODELS.index(name)))
    return _fit(best, total, length, target), errors


def singles_sum(singles: np.ndarray) -> np.ndarray:
    """(p, p, S) array: Σ of single-layer values over layers i..i+n-1 (NaN if any is missing)."""
    p, levels = singles.shape
    missing = np.isnan(singles)
    # Prefix sums over zero-filled values, and a prefix count of the missing ones: a NaN in a
    # plain cumsum would spoil every later group, not only the groups that contain it.
    prefix = np.concatenate([np.zeros((1, levels)), np.cumsum(np.where(missing, 0.0, singles), axis=0)])
    holes = np.concatenate([np.zeros((1, levels), dtype=np.int64), np.cumsum(missing, axis=0)])
    start = np.arange(p)[:, None]
    stop = start + np.arange(1, p + 1)[None, :]
    valid = stop <= p
    stop = np.minimum(stop, p)
    total = prefix[stop] - prefix[start]
    complete = (holes[stop] - holes[start]) == 0
    return np.where(valid[:, :, None] & complete, total, np.nan)


def complete_table(
    num_layers: int, num_levels: int, values: dict[Entry, float], *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Degradation (p, p, S) with measured values kept and the rest estimated; plus the mask and
    a summary of the chosen model for the table's metadata."""
    p = num_layers
    degradation = np.full((p, p, num_levels), np.nan)
    measured = np.zeros((p, p, num_levels), dtype=bool)
    for (start, length, level), value in values.items():
        degradation[start, length - 1, level] = value
        measured[start, length - 1, level] = True
    total = singles_sum(degradation[:, 0, :])
    lengths = np.broadcast_to(np.arange(1, p + 1)[None, :, None], total.shape).astype(np.float64)
    points = measured & (lengths > 1) & ~np.isnan(total)
    model, errors = select_group_model(total[points], lengths[points], degradation[points], seed=seed)
    fill = ~measured & ~np.isnan(total)
    degradation[fill] = model.predict(total[fill], lengths[fill])
    info = {
        "model": model.name,
        "coefficients": list(model.coefficients),
        "cv_rmse": errors,
        "fitted_on": int(points.sum()),
        "measured_entries": int(measured.sum()),
        "estimated_entries": int(fill.sum()),
    }
    return degradation, measured, info


def complete_stderr(num_layers: int, num_levels: int, stderrs: dict[Entry, float]) -> np.ndarray:
    """(p, p, S) standard errors: measured entries keep theirs; an estimated group of layers L gets
    ``√(Σ_{l∈L} σ(l, s)²)``, the error of the singles' sum it is estimated from (NaN if one is unknown)."""
    p = num_layers
    stderr = np.full((p, p, num_levels), np.nan)
    for (start, length, level), value in stderrs.items():
        stderr[start, length - 1, level] = value
    estimated = np.sqrt(singles_sum(stderr[:, 0, :] ** 2))
    return np.where(np.isnan(stderr), estimated, stderr)
