"""The ASAF paper's two-phase DP, kept as a baseline for the exact solver.

Only the paper's abstract was available when this was written; it describes the algorithm as
"Phase 1: coarse-grained optimization that determines the optimal number of layer groups and narrows
sparsity rate search intervals. Phase 2: fine-grained optimization that determines precise
consecutive layer allocation and exact sparsity rates within each group", both by DP over the
budget. Our reading:

Phase 1 (Algorithm 1, coarse). The level grid is cut into ``round(sqrt(K))`` consecutive intervals,
each represented by its middle level. For every group count G up to ``max_groups`` the layers are
split into G near-equal consecutive blocks, and a multiple-choice knapsack DP over (block, budget)
gives each block one interval. G* is the count whose coarse plan removes the most FLOPs.

Phase 2 (Algorithm 2, fine). With exactly G* groups, in order, group g restricted to phase 1's
interval g, a DP over (group, first layer, budget) chooses the group boundaries and exact levels.
If phase 2 finds nothing for G*, the next best G from phase 1 is tried.

Phase 2 is the exact DP restricted to G* groups and fixed intervals, so it never beats
``method="exact"`` on the same table and resolution.

Cost: phase 1 O(G_max² · √S · B); phase 2 O(G* · p² · √S · B).
"""

from __future__ import annotations

import math
import time

import numpy as np

from asaf_fx.plan import Plan
from asaf_fx.solvers.problem import Problem, build_plan, raise_infeasible

#: The coarse phase considers at most this many groups (the paper searches small group counts;
#: phase 2's cost grows linearly with G*).
MAX_GROUPS = 16


def _intervals(levels: int) -> list[np.ndarray]:
    count = max(1, round(math.sqrt(levels)))
    return [chunk for chunk in np.array_split(np.arange(levels), count) if chunk.size]


def _coarse(problem: Problem, intervals: list[np.ndarray], groups: int) -> tuple[float, list[int]]:
    """Phase 1 for one group count: equal blocks, one interval each; (FLOPs, interval per block)."""
    p, budget = problem.num_layers, problem.budget_units
    bounds = np.linspace(0, p, groups + 1).round().astype(int)
    b = np.arange(budget + 1)
    after = np.append(np.zeros(budget + 1), np.inf)  # column B+1 is the +inf sentinel
    picks, costs = [], []
    for start, stop in zip(bounds[-2::-1], bounds[:0:-1], strict=True):
        length = stop - start
        options = np.full((len(intervals), budget + 1), np.inf)
        cost = np.zeros(len(intervals), dtype=np.int64)
        for j, interval in enumerate(intervals):
            usable = interval[problem.available[start, length - 1, interval]]
            if usable.size == 0:
                continue
            middle = usable[np.argmin(np.abs(usable - interval[interval.size // 2]))]
            cost[j] = problem.units[start, length - 1, middle]
            remaining = np.where(b - cost[j] < 0, budget + 1, b - cost[j])
            options[j] = problem.flops[start, length - 1, middle] + after[remaining]
        pick = np.argmin(options, axis=0)
        picks.append(pick)
        costs.append(cost)
        after = np.append(options[pick, b], np.inf)
    if not np.isfinite(after[budget]):
        return math.inf, []
    sequence, spend = [], budget
    for pick, cost in zip(reversed(picks), reversed(costs), strict=True):
        j = int(pick[spend])
        sequence.append(j)
        spend -= int(cost[j])
    return float(after[budget]), sequence


def _fine(problem: Problem, intervals: list[np.ndarray]) -> list[tuple[int, int, int]] | None:
    """Phase 2: boundaries and exact levels for len(intervals) groups, group g within intervals[g]."""
    p, budget, groups = problem.num_layers, problem.budget_units, len(intervals)
    if groups > p:
        return None
    b = np.arange(budget + 1)
    # best[g][i, b]: fewest FLOPs covering layers i..p-1 with groups g..G-1; column B+1 is +inf.
    best = [np.full((p + 1, budget + 2), np.inf) for _ in range(groups + 1)]
    best[groups][p, : budget + 1] = 0.0
    choice = [np.zeros((p, budget + 1), dtype=np.int64) for _ in range(groups)]
    for g in range(groups - 1, -1, -1):
        levels = intervals[g]
        left = groups - g - 1  # groups still to place after this one, one layer each at least
        for i in range(g, p - left):
            lengths = p - left - i
            cost = np.where(
                problem.available[i, :lengths][:, levels], problem.units[i, :lengths][:, levels], budget + 1
            )
            remaining = b[None, None, :] - cost[:, :, None]
            remaining = np.where(remaining < 0, budget + 1, remaining)
            rows = (i + 1 + np.arange(lengths))[:, None, None]
            candidates = problem.flops[i, :lengths][:, levels][:, :, None] + best[g + 1][rows, remaining]
            candidates = candidates.reshape(lengths * levels.size, budget + 1)
            pick = np.argmin(candidates, axis=0)
            best[g][i, : budget + 1] = candidates[pick, b]
            choice[g][i] = pick
    if not np.isfinite(best[0][0, budget]):
        return None
    spend = int(np.flatnonzero(best[0][0, : budget + 1] == best[0][0, budget])[0])
    choices, i = [], 0
    for g in range(groups):
        length, position = divmod(int(choice[g][i, spend]), intervals[g].size)
        length += 1
        level = int(intervals[g][position])
        choices.append((i, length, level))
        spend -= int(problem.units[i, length - 1, level])
        i += length
    return choices


def solve_two_phase(problem: Problem, max_groups: int = MAX_GROUPS) -> Plan:
    started = time.perf_counter()
    intervals = _intervals(problem.num_levels)
    ranked = []
    for groups in range(1, min(problem.num_layers, max_groups) + 1):
        flops, sequence = _coarse(problem, intervals, groups)
        if math.isfinite(flops):
            ranked.append((flops, groups, sequence))
    ranked.sort(key=lambda entry: entry[:2])
    for _, groups, sequence in ranked:
        choices = _fine(problem, [intervals[j] for j in sequence])
        if choices is not None:
            stats = {"time_s": time.perf_counter() - started, "groups_phase1": groups}
            return build_plan(problem, choices, "two-phase", stats)
    raise_infeasible(problem, "two-phase")
    raise AssertionError("unreachable")
