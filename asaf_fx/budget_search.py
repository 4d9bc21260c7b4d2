"""How ``asaf_fx.run`` spends its rounds: solve at a budget δ, measure the compiled plan, choose the next δ.

The table predicts a plan's degradation; what counts is the compiled plan measured on held-out text.
Round 1 solves at the budget. After each measurement the next δ is the secant step towards
``TIGHTEN · budget`` between the largest δ whose plan measured within the budget and the smallest
whose plan measured above it. The dense plan (δ = 0, measured 0) is within any budget, so after a
first overshoot the step is ``δ · budget / measured · TIGHTEN``; with no overshoot yet, δ grows by
the same ratio (at most ×4; ×2 when the round measured ≤ 0). A δ whose plan is dense is replaced by
the cheapest single choice, which is worth measuring; dense itself is never compiled to learn that
it measures 0.

Every new δ lies strictly inside that bracket, so the bracket only narrows. The search stops when
rounds run out, the solver finds no plan, a δ gives a plan already measured or the dense plan, or a
round within the budget measured at least ``TIGHTEN · budget``. The plan kept is the round
within the budget that removes the most FLOPs, else the dense plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from asaf_fx.plan import Group, Plan
from asaf_fx.solvers import InfeasibleError, solve
from asaf_fx.solvers.problem import charged_degradation
from asaf_fx.table import SensitivityTable

TIGHTEN = 0.9  # aim this far below the budget: a round measured within it by less is close enough
GROW = 4.0  # the most δ grows in one round before any round has overshot


def solve_plan(table: SensitivityTable, delta: float, z: float) -> Plan:
    """The run's plan within ``delta``: each layer pruned at one of ``table``'s levels or left dense."""
    return solve(table, delta, min_sparsity=float(table.sparsities[0]), max_sparsity=float(table.sparsities[-1]),
                 allow_dense=True, z=z)


def dense_plan(table: SensitivityTable, budget: float) -> Plan:
    """Every layer unpruned: within any budget, measured 0 by construction."""
    dense = float(table.dense_flops)
    return Plan((Group(0, table.num_layers, 0.0),), flops=dense, dense_flops=dense, predicted_degradation=0.0,
                max_degradation=budget, method="dense")


def groups_of(plan: Plan) -> list[list]:
    return [[g.start, g.stop, g.sparsity] for g in plan.groups]


@dataclass
class MeasuredRound:
    """A round's plan and what ``measure`` returned for it: the degradation and anything to keep."""

    plan: Plan
    degradation: float
    result: Any


def next_delta(budget: float, below: tuple[float, float], above: tuple[float, float] | None) -> float:
    """The δ to solve at next, from ``below`` (δ, measured) of the largest-δ round within the budget
    and ``above`` (δ, measured) of the smallest-δ round over it (None: none yet)."""
    target = TIGHTEN * budget
    (d_lo, m_lo) = below
    if above is None:
        return d_lo * (min(target / m_lo, GROW) if m_lo > 0 else 2.0)
    (d_hi, m_hi) = above
    return d_lo + (target - m_lo) * (d_hi - d_lo) / (m_hi - m_lo)


def search(table: SensitivityTable, budget: float, z: float, rounds: int, measure: Callable[[Plan], tuple[float, Any]],
           report: Callable[[str], None]) -> tuple[list[dict[str, Any]], MeasuredRound | None]:
    """Run at most ``rounds`` solve-measure rounds; return their log and the kept round (None: dense).

    ``measure(plan)`` returns the plan's measured degradation and whatever the caller keeps of the
    best round (the compiled model)."""
    cheapest = float(np.nanmin(charged_degradation(table, z)[:, :, table.sparsities > 0]))
    below: tuple[float, float] = (0.0, 0.0)
    above: tuple[float, float] | None = None
    log: list[dict[str, Any]] = []
    best: MeasuredRound | None = None  # only the kept round's compiled model stays alive
    delta = budget
    for number in range(1, rounds + 1):
        entry: dict[str, Any] = {"round": number, "max_degradation": delta}
        try:
            plan = solve_plan(table, delta, z)
            if plan.flops_ratio >= 1.0 and cheapest > delta:
                entry["max_degradation"] = delta = cheapest * (1 + 1e-9)  # dense would teach nothing
                plan = solve_plan(table, delta, z)
        except InfeasibleError as exc:
            log.append({**entry, "infeasible": str(exc)})
            report(f"round {number}: δ={delta:.4g}: {exc}")
            break
        seen = [r["round"] for r in log if r.get("groups") == groups_of(plan)]
        if seen:  # its measurement would not change either
            log.append({**entry, "same_plan_as_round": seen[0]})
            report(f"round {number}: δ={delta:.4g} gives round {seen[0]}'s plan again; stopping")
            break
        if plan.flops_ratio >= 1.0:
            log.append({**entry, "dense": True})
            report(f"round {number}: δ={delta:.4g} gives the dense plan; stopping")
            break
        measured, kept = measure(plan)
        log.append({**entry, "predicted_degradation": plan.predicted_degradation, "measured_degradation": measured,
                    "flops_ratio": plan.flops_ratio, "groups": groups_of(plan)})
        report(f"round {number}: δ={delta:.4g}, {len(plan.groups)} groups, FLOPs ×{plan.flops_ratio:.4f}, "
               f"predicted {plan.predicted_degradation:.4g}, measured {measured:.4g} (budget {budget:g})")
        if measured <= budget:
            if best is None or (plan.flops_ratio, measured) < (best.plan.flops_ratio, best.degradation):
                best = MeasuredRound(plan, measured, kept)
            below = max(below, (delta, measured))
            if measured >= TIGHTEN * budget:
                break
        elif above is None or delta < above[0]:
            above = (delta, measured)
        del kept
        delta = next_delta(budget, below, above)
    return log, best
