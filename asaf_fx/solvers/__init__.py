"""Sparsity-allocation solvers; :func:`solve` is the one entry point."""

from __future__ import annotations

from asaf_fx.plan import Plan
from asaf_fx.solvers.exact import solve_exact
from asaf_fx.solvers.greedy import solve_greedy
from asaf_fx.solvers.problem import CHARGES, InfeasibleError, make_problem
from asaf_fx.solvers.two_phase import solve_two_phase
from asaf_fx.table import SensitivityTable

_SOLVERS = {"exact": solve_exact, "two-phase": solve_two_phase, "greedy": solve_greedy}
METHODS = tuple(_SOLVERS)


def solve(
    table: SensitivityTable,
    max_degradation: float = 0.01,
    *,
    min_sparsity: float = 0.01,
    max_sparsity: float = 0.15,
    resolution: float | None = None,
    method: str = "exact",
    allow_dense: bool = False,
    z: float | None = None,
    charge: str = "noise-aware",
) -> Plan:
    """Choose consecutive layer groups and one sparsity each, removing the most FLOPs within budget.

    Minimises Σ_groups H(group, s) subject to Σ_groups Ξ(group, s) ≤ ``max_degradation``, every
    group's sparsity taken from ``table.sparsities`` within [``min_sparsity``, ``max_sparsity``].

    Args:
        table: measured degradation Ξ and FLOPs H per (group, level).
        max_degradation: budget δ in the table's metric (e.g. 0.01 = 1% relative perplexity rise).
        min_sparsity, max_sparsity: every group's rate lies in this range (the paper's α, β).
        resolution: budget quantum r; each Ξ is rounded *up* to a multiple of r, so the returned
            plan's true degradation never exceeds δ. Default δ / 1000.
        allow_dense: a group may also stay unpruned (sparsity 0: no degradation, all its FLOPs),
            so budgets below "every layer at ``min_sparsity``" still have plans.
        z: under ``charge="noise-aware"``, each choice is charged its envelope plus z × its
            standard error (the table's per-entry errors; for a table without them, its noise
            floor), so a choice is taken only where it fits the budget with that margin. Default 1;
            0 keeps the envelope without the margin. ``charge="raw"`` charges no error: leave z out
            (z=0 is accepted, any other value is refused).
        charge: "noise-aware" (default): a group at level s is charged the running maximum over
            levels up to s of max(ξ, 0), plus z standard errors. "raw": the paper's Ξ as measured,
            exactly the table's ξ per entry, no envelope and no error term; a negative ξ is
            charged 0, since the DP over remaining budget units cannot refund budget.
        method: "exact" (globally optimal at the resolution, group count free), "two-phase" (the
            ASAF paper's coarse-then-fine DP, kept as a baseline) or "greedy" (naive baseline).

    Raises:
        InfeasibleError: no plan fits; the message names the smallest achievable degradation and
            says whether a finer resolution, or method="exact" at this one, would find a plan.
    """
    if method not in _SOLVERS:
        raise ValueError(f"solve: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    problem = make_problem(table, max_degradation, min_sparsity, max_sparsity, resolution, allow_dense, z, charge)
    return _SOLVERS[method](problem)


__all__ = ["CHARGES", "METHODS", "InfeasibleError", "solve"]
