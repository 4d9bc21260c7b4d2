"""Exact allocation: a DP over (first unassigned layer, remaining budget units).

``F[i, b]`` is the fewest FLOPs with which layers ``i .. p-1`` can be covered by groups whose
rounded costs sum to at most ``b`` units:

    F[p, b] = 0
    F[i, b] = min over length n, level k with units(i, n, k) <= b of  H(i, n, k) + F[i + n, b - units(i, n, k)]

The group count is not fixed: it falls out of the recursion. The answer is F[0, B] and it is
optimal for the rounded problem. Among optimal plans the one using the least budget is returned.

Cost: O(p² · S · B) time (each layer i looks at p − i lengths × S levels × B + 1 budgets, vectorised
per i), O(p · B) memory.
"""

from __future__ import annotations

import time

import numpy as np

from asaf_fx.solvers.problem import Problem, build_plan, raise_infeasible
from asaf_fx.sparsity_plan import Plan


def solve_exact(problem: Problem) -> Plan:
    started = time.perf_counter()
    p, levels, budget = problem.num_layers, problem.num_levels, problem.budget_units
    # Column budget + 1 is an infinite sentinel: an index b - cost < 0 is redirected there.
    best = np.full((p + 1, budget + 2), np.inf)
    best[p, : budget + 1] = 0.0
    choice = np.zeros((p, budget + 1), dtype=np.int64)
    b = np.arange(budget + 1)
    states = 0
    for i in range(p - 1, -1, -1):
        lengths = p - i
        cost = problem.units[i, :lengths, :]  # (n, K)
        remaining = b[None, None, :] - cost[:, :, None]  # (n, K, B+1)
        remaining = np.where(remaining < 0, budget + 1, remaining)
        rows = (i + 1 + np.arange(lengths))[:, None, None]
        candidates = problem.flops[i, :lengths, :, None] + best[rows, remaining]
        candidates = candidates.reshape(lengths * levels, budget + 1)
        pick = np.argmin(candidates, axis=0)
        best[i, : budget + 1] = candidates[pick, b]
        choice[i] = pick
        states += candidates.size
    if not np.isfinite(best[0, budget]):
        raise_infeasible(problem, "exact")
    # F[0, ·] is non-increasing in b; take the smallest budget that already reaches the optimum.
    spend = int(np.flatnonzero(best[0, : budget + 1] == best[0, budget])[0])
    choices, i = [], 0
    while i < p:
        length, level = divmod(int(choice[i, spend]), levels)
        length += 1
        choices.append((i, length, level))
        spend -= int(problem.units[i, length - 1, level])
        i += length
    stats = {"time_s": time.perf_counter() - started, "states": states}
    return build_plan(problem, choices, "exact", stats)
