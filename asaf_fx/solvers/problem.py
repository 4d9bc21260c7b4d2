"""The allocation problem every solver works on, with the budget discretised once.

Each group choice (start i, length n, level k) costs ``units[i, n-1, k] = ceil(charged Ξ / r)``
budget units of resolution ``r``, and the budget is ``floor(δ / r)`` units. Rounding every cost
*up* means any plan whose units fit the budget also fits it in true (unrounded) degradation:
Σ Ξ ≤ Σ units·r ≤ δ.

By default (``charge="noise-aware"``) Ξ is not charged as measured but as an upper bound
(``charged_degradation``): pruning more of a group cannot help, so a group's value is the running
maximum over the levels up to s of max(ξ, 0), and to it is added z times the entry's standard
error: the one calibration measured with it (paired per-token differences, see
``calibration.measure``), or, for tables without them, the table-wide noise floor σ for a measured
entry and σ·√n for a group of n layers estimated from n single-layer measurements. A solver that
picks the cheapest of many noisy entries otherwise picks their noise: on SmolLM2 tables (σ ≈ 0.3 %
on 2048 held-out tokens, while most layers' ξ at 5 % lies below that) plans pruned exactly the
layers whose ξ measured below zero, and the real model missed the 1 % budget by 10×.

``charge="raw"`` charges Ξ as the paper does, as measured: per entry exactly the table's ξ, with no
envelope over levels and no error term, except that a negative ξ is charged 0. The DP runs over
remaining budget units ``0 .. floor(δ / r)`` (the paper's arrays), so a choice cannot refund budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from asaf_fx.plan import Group, Plan
from asaf_fx.table import SensitivityTable

#: Default budget levels: r = δ / DEFAULT_BUDGET_LEVELS. A plan of G groups loses at most G·r of
#: budget to rounding, so with 1000 levels and 30 groups the solver is exact for any plan that
#: spends ≤ 97% of δ — and typically far less is lost because few groups sit at a rounding edge.
DEFAULT_BUDGET_LEVELS = 1000

#: How ξ is charged: "noise-aware" (running max over levels of max(ξ, 0), plus z standard errors)
#: or "raw" (max(ξ, 0) as measured, the paper's Ξ).
CHARGES = ("noise-aware", "raw")


class InfeasibleError(ValueError):
    """No plan satisfies the constraints; the message names the smallest achievable degradation."""


@dataclass(frozen=True)
class Problem:
    table: SensitivityTable
    level_index: np.ndarray  # (K,) indices into table.sparsities kept by [min, max] sparsity; -1: dense
    sparsities: np.ndarray  # (K,)
    degradation: np.ndarray  # (p, p, K) Ξ, NaN = unavailable
    flops: np.ndarray  # (p, p, K) H, 0 where unavailable (never chosen: its cost is over budget)
    units: np.ndarray  # (p, p, K) int64 cost; budget_units + 1 where unavailable
    available: np.ndarray  # (p, p, K) bool
    budget_units: int
    resolution: float
    max_degradation: float
    min_sparsity: float
    max_sparsity: float
    allow_dense: bool = False
    z: float = 1.0  # standard errors charged per entry; 0 under charge="raw"
    charge: str = "noise-aware"

    @property
    def num_layers(self) -> int:
        return int(self.degradation.shape[0])

    @property
    def num_levels(self) -> int:
        return int(self.sparsities.shape[0])


def noise_floor(table: SensitivityTable) -> float:
    """σ, the RMS of the negative single-layer ξ: how far one measurement lands from the truth.

    The true ξ of a pruned layer is ≥ 0, so a negative value is error, and under symmetric noise
    its RMS estimates the error of any measurement. 0 when no entry measured below zero.
    """
    singles = table.degradation[:, 0, :]
    negative = singles[np.isfinite(singles) & (singles < 0)]
    return float(np.sqrt(np.mean(negative**2))) if negative.size else 0.0


def charged_degradation(table: SensitivityTable, z: float = 1.0, *, charge: str = "noise-aware") -> np.ndarray:
    """(p, p, S) cost the solver charges: running max over levels of max(ξ, 0), plus z × the entry's error.

    The error is the entry's standard error where the table has one, else σ (``noise_floor``) for a
    measured entry and σ·√n for an estimated group of n layers. Unavailable (NaN) entries stay NaN;
    a sparsity-0 level costs nothing.

    ``charge="raw"``: max(ξ, 0) per entry, every level as measured (a sparsity-0 level included),
    no envelope and no error term; ``z`` is not used.
    """
    xi = table.degradation
    if charge == "raw":
        return np.where(np.isnan(xi), np.nan, np.maximum(xi, 0.0))
    if charge != "noise-aware":
        raise ValueError(f"solve: unknown charge {charge!r}; choose one of {', '.join(CHARGES)}")
    monotone = np.fmax.accumulate(np.maximum(xi, 0.0), axis=2)  # fmax: a NaN level does not reset it
    lengths = np.arange(1, table.num_layers + 1, dtype=np.float64)[None, :, None]
    floor = noise_floor(table) * np.where(table.measured, 1.0, np.sqrt(lengths))
    noise = z * np.where(np.isnan(table.stderr), floor, table.stderr)
    charged = np.where(table.sparsities > 0, monotone + noise, 0.0)
    return np.where(np.isnan(xi), np.nan, charged)


def make_problem(
    table: SensitivityTable,
    max_degradation: float,
    min_sparsity: float,
    max_sparsity: float,
    resolution: float | None,
    allow_dense: bool = False,
    z: float | None = None,
    charge: str = "noise-aware",
) -> Problem:
    if not isinstance(table, SensitivityTable):
        raise TypeError(f"solve: table must be a SensitivityTable, got {type(table).__name__}")
    if not math.isfinite(max_degradation) or max_degradation < 0:
        raise ValueError(f"solve: max_degradation must be a finite number >= 0, got {max_degradation!r}")
    for name, value in (("min_sparsity", min_sparsity), ("max_sparsity", max_sparsity)):
        if not math.isfinite(value) or not 0.0 <= value < 1.0:
            raise ValueError(f"solve: {name} must lie in [0, 1), got {value!r}")
    if charge not in CHARGES:
        raise ValueError(f"solve: unknown charge {charge!r}; choose one of {', '.join(CHARGES)}")
    if charge == "raw":
        if z is not None and z != 0:
            raise ValueError(
                f"solve: z={z!r} charges standard errors, which charge='raw' never does; "
                "leave z out or use charge='noise-aware' (--charge noise-aware)"
            )
        z = 0.0
    elif z is None:
        z = 1.0
    if not math.isfinite(z) or z < 0:
        raise ValueError(f"solve: z (standard errors charged per entry) must be a finite number >= 0, got {z!r}")
    if min_sparsity > max_sparsity:
        raise ValueError(f"solve: min_sparsity {min_sparsity} is above max_sparsity {max_sparsity}")
    if resolution is None:
        resolution = max_degradation / DEFAULT_BUDGET_LEVELS if max_degradation > 0 else 1.0
    elif not math.isfinite(resolution) or resolution <= 0:
        raise ValueError(f"solve: resolution must be a finite number > 0, got {resolution!r}")

    grid = table.sparsities
    # A tolerance so that a grid value written as 0.15 is not lost to 0.15000000000000002.
    tol = 1e-9
    level_index = np.flatnonzero((grid >= min_sparsity - tol) & (grid <= max_sparsity + tol))
    if level_index.size == 0 and not allow_dense:
        raise InfeasibleError(
            f"solve: no sparsity level of the table {grid.tolist()} lies in "
            f"[min_sparsity, max_sparsity] = [{min_sparsity}, {max_sparsity}]"
        )
    degradation = charged_degradation(table, z, charge=charge)[:, :, level_index]
    flops = table.flops[:, :, level_index]
    sparsities = grid[level_index]
    if allow_dense:  # level "-1": the group stays dense, costs nothing and keeps all of its FLOPs
        p = table.num_layers
        start, length = np.meshgrid(np.arange(p), np.arange(1, p + 1), indexing="ij")
        fits = start + length <= p
        prefix = np.concatenate([[0.0], np.cumsum(table.layer_flops)])
        dense = np.where(fits, prefix[np.minimum(start + length, p)] - prefix[start], np.nan)
        degradation = np.concatenate([np.where(fits, 0.0, np.nan)[..., None], degradation], axis=2)
        flops = np.concatenate([dense[..., None], flops], axis=2)
        sparsities = np.concatenate([[0.0], sparsities])
        level_index = np.concatenate([[-1], level_index])
    available = ~np.isnan(degradation)
    # δ / r is often an integer spoilt by rounding (0.005 / 5e-06 = 999.9999999999999): snap it.
    ratio = max_degradation / resolution
    budget_units = int(round(ratio)) if abs(ratio - round(ratio)) < 1e-9 * max(1.0, ratio) else int(ratio)
    cost = np.where(available, degradation, 0.0)
    units = np.ceil(cost / resolution)
    units = np.where(units * resolution < cost, units + 1, units)  # guard the other way round
    units = np.where(available, np.minimum(units, budget_units + 1), budget_units + 1).astype(np.int64)
    flops = np.where(available, flops, 0.0)
    return Problem(
        table=table,
        level_index=level_index,
        sparsities=sparsities,
        degradation=degradation,
        flops=flops,
        units=units,
        available=available,
        budget_units=budget_units,
        resolution=float(resolution),
        max_degradation=float(max_degradation),
        min_sparsity=float(min_sparsity),
        max_sparsity=float(max_sparsity),
        allow_dense=bool(allow_dense),
        z=float(z),
        charge=charge,
    )


def _min_cover(cost: np.ndarray) -> float:
    """Smallest Σ cost over all covers of layers 0..p-1 by consecutive groups; cost (p, p, K), inf = unusable."""
    p = cost.shape[0]
    best = np.full(p + 1, np.inf)
    best[p] = 0.0
    for i in range(p - 1, -1, -1):
        n = p - i
        best[i] = np.min(cost[i, :n, :] + best[i + 1 : i + 1 + n, None])
    return float(best[0])


def min_degradation(problem: Problem) -> float:
    """Smallest true Σ Ξ over all covers by available groups (inf if none exists)."""
    return _min_cover(np.where(problem.available, problem.degradation, np.inf))


def min_units(problem: Problem) -> float:
    """Smallest Σ rounded cost, in units of the resolution, over all covers (inf if none exists).

    A plan exists at this resolution exactly when this is at most ``problem.budget_units``.
    """
    return _min_cover(np.where(problem.available, problem.units, np.inf))


def raise_infeasible(problem: Problem, method: str) -> None:
    """Raise the InfeasibleError that says why ``method`` found no plan, and what to change."""
    lowest = min_degradation(problem)
    window = f"sparsity in [{problem.min_sparsity}, {problem.max_sparsity}]"
    if not math.isfinite(lowest):
        raise InfeasibleError(
            f"solve({method}): no plan exists: the table has no measured groups covering every layer with "
            f"{window}; calibrate the missing entries or widen the sparsity range"
        )
    units = min_units(problem)
    if units <= problem.budget_units:  # only a heuristic method can get here: exact finds this plan
        raise InfeasibleError(
            f"solve({method}): no plan found for max_degradation={problem.max_degradation:g}, but one exists at "
            f"resolution {problem.resolution:g} (smallest rounded degradation {units * problem.resolution:.6g}; "
            f"smallest achievable degradation {lowest:.6g}) that the {method} method does not find; "
            "use method='exact' (--method exact)"
        )
    if lowest <= problem.max_degradation:
        raise InfeasibleError(
            f"solve({method}): no plan fits max_degradation={problem.max_degradation:g} at resolution "
            f"{problem.resolution:g}; the smallest achievable degradation is {lowest:.6g}, which fits only "
            "at a finer resolution (pass a smaller resolution=)"
        )
    raise InfeasibleError(
        f"solve({method}): no plan fits max_degradation={problem.max_degradation:g}; the smallest achievable "
        f"degradation with {window} is {lowest:.6g}. Raise the budget or lower min_sparsity"
        + ("" if problem.allow_dense else ", or let groups stay unpruned (allow_dense=True; --allow-dense)")
    )


def build_plan(
    problem: Problem, choices: list[tuple[int, int, int]], method: str, stats: dict
) -> Plan:
    """Turn (start, length, level) choices into a Plan, re-checking the budget in true units."""
    groups, flops, degradation, measured, units = [], [], [], [], 0
    for start, length, level in choices:
        if not problem.available[start, length - 1, level]:
            raise AssertionError(f"solver {method} chose an unavailable group {start, length, level}")
        groups.append(Group(start, start + length, float(problem.sparsities[level])))
        flops.append(float(problem.flops[start, length - 1, level]))
        degradation.append(float(problem.degradation[start, length - 1, level]))
        column = int(problem.level_index[level])
        measured.append(0.0 if column < 0 else float(problem.table.degradation[start, length - 1, column]))
        units += int(problem.units[start, length - 1, level])
    if units > problem.budget_units:
        raise AssertionError(f"solver {method} returned a plan over budget ({units} > {problem.budget_units} units)")
    return Plan(
        groups=tuple(groups),
        flops=math.fsum(flops),
        dense_flops=problem.table.dense_flops,
        predicted_degradation=math.fsum(degradation),
        max_degradation=problem.max_degradation,
        method=method,
        stats={
            **stats,
            "resolution": problem.resolution,
            "budget_units": problem.budget_units,
            "used_units": units,
            "min_sparsity": problem.min_sparsity,
            "max_sparsity": problem.max_sparsity,
            "allow_dense": problem.allow_dense,
            "noise_floor": noise_floor(problem.table),
            "z": problem.z,
            "charge": problem.charge,
            "entry_errors": bool(np.isfinite(problem.table.stderr).any()),
            "table_sum": math.fsum(measured),  # Σ ξ as in the table, before charged_degradation
        },
    )
