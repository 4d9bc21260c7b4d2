"""Exact allocation: a DP over (first unassigned layer, remaining budget units).

``F[i, b]`` is the fewest FLOPs with which layers ``i .. p-1`` can be covered by groups whose
rounded costs sum to at most ``b`` units:

    F[p, b] = 0
    F[i, b] = min over length n, level k with units(i, n, k) <= b of  H(i, n, k) + F[i + n, b - units(i, n, k)]

The group count is not fixed: it falls out of the recursion. The answer is F[0, B] and it is
optimal for the rounded problem. Among optimal plans the one using the least budget is returned.

Cost: O(p² · S · B) time in the worst case (each layer i looks at p − i lengths × S levels × B + 1
budgets, vectorised per i); options whose cost alone exceeds the budget are skipped, so on real
tables, where long groups at high sparsity are over budget, the work is far less. O(p · B) memory.
"""

from __future__ import annotations

import time

import numpy as np

from asaf_fx.plan import Plan
from asaf_fx.solvers.problem import Problem, build_plan, raise_infeasible


def solve_exact(problem: Problem) -> Plan:
    started = time.perf_counter()
    p, levels, budget = problem.num_layers, problem.num_levels, problem.budget_units
    # Row r of `best` holds B + 1 infinities and then F[r, 0..B], so reading F[r, b - cost] at
    # column B + 1 + b - cost never needs a bounds check (cost <= B + 1 by construction).
    width = 2 * budget + 2
    best = np.full((p + 1, width), np.inf)
    best[p, budget + 1 :] = 0.0
    flat = best.ravel()
    choice = np.zeros((p, budget + 1), dtype=np.int64)
    b = np.arange(budget + 1)
    states = 0
    for i in range(p - 1, -1, -1):
        lengths = p - i
        cost = problem.units[i, :lengths, :].ravel()  # (n·K,), option o = (n - 1)·K + k
        # Options over budget (or unmeasured) can never be chosen: skip them. Long groups at high
        # sparsity usually are, which makes real tables much cheaper than the worst case.
        options = np.flatnonzero(cost <= budget)
        if options.size == 0:
            continue
        rows = i + 1 + options // levels
        offset = rows * width + (budget + 1) - cost[options]
        candidates = flat.take(b[:, None] + offset[None, :])  # (B+1, options)
        candidates += problem.flops[i, :lengths, :].ravel()[options][None, :]
        pick = np.argmin(candidates, axis=1)
        best[i, budget + 1 :] = candidates[b, pick]
        choice[i] = options[pick]
        states += candidates.size
    best = best[:, budget + 1 :]
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
