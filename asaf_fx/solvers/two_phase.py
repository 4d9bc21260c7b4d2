"""The ASAF paper's two-phase DP (Section 3.3, eqs. 8–13, Algorithms 1 and 2), kept as a baseline.

The paper's text is contradictory in places; this is the reading taken at each ambiguous step.

Intervals. The rate grid (the problem's K levels, the dense level first when ``allow_dense``) is cut
once into J = round(√K) consecutive intervals (``np.array_split``; ``solve_two_phase(problem, J)``
takes another count). Algorithm 1 line 2 ranges over every sub-interval of [α, β]; with the
relaxation below the whole range then always wins (it holds both minima) and the phase narrows
nothing, so a fixed partition is the reading under which Phase 1 chooses anything.

Phase 1 (Algorithm 1, eqs. 8–10). As printed, DP_coarse[g][b] has no layer position, so it cannot
know which layers a group covers. Here it is keyed on the first layer:
``C[i, g, b]`` = fewest FLOPs covering layers i..p-1 with exactly g consecutive groups within b
budget units, C[p, 0, b] = 0, and

    C[i, g, b] = min over length n, interval I with u(i, n, I) <= b of
                 OptimalCost(i, n, I) + C[i + n, g - 1, b - u(i, n, I)]

where OptimalCost(i, n, I) is the fewest FLOPs of group (i, n) at a level of I and u(i, n, I) =
⌈Ξ_min(I) / r⌉ the fewest units (the smallest charged Ξ in I, rounded up), both over the levels of
I that are measured and fit the budget on their own (a level over budget is not "achievable").
The two minima may come from different levels, so Phase 1 is an optimistic relaxation: C[0, g, B]
is a lower bound on the FLOPs of any plan of g groups. G* = argmin over g of C[0, g, B] for g in
1..p (the paper's min over b of "exactly b spent" equals "at most B"; g stops early where g groups
of the cheapest option already exceed B); ties go to fewer groups. Backtracking from the smallest
budget that reaches C[0, G*, B] gives one interval per group.

Phase 2 (Algorithm 2, eqs. 11–13). Exactly G* groups, in order, group g at a level of its interval
I_g; a DP over (group, first layer, remaining budget) chooses the boundaries and exact levels. The
budget step is eq. 13's b' = b − ⌈Ξ / r⌉ ≥ 0, not Algorithm 2's ``b − Ξ/Δ > 0``: an array index
must be an integer, rounding up keeps the plan's true Σ Ξ within δ, and the strict test would
forbid spending the last unit (with the paper's Δ = δ/2, half the budget), which Algorithm 1 line 9
(``≥ 0``) does not. With the same rule in both phases Phase 2 always finds a plan for G*: Phase 1's
groups, each at the level attaining its Ξ_min, are one. (So two-phase finds a plan exactly when
``exact`` does.) Were it to find none, the next G in Phase 1's ranking would be tried, as a strict
Phase 2 would need; ``plan.stats`` records ``groups_phase1`` (G*), ``groups_tried`` (1 unless
that happened), ``phase1_flops`` (the relaxed bound for the G used), ``partition`` and
``intervals`` (the chosen interval of each group), both as [lowest, highest] sparsity.

Phase 2 searches a subset of the plans ``method="exact"`` searches, at the same rounded costs, so it
never beats it; with one interval per level Phase 1 is exact and so is the whole method.

Cost, for p layers, K levels in J intervals and B budget units: Phase 1 O(p³/6 · J · B) time (the g
dimension is one vectorised slice per option), O(p² · B / 2) memory; Phase 2 O(G* · (p − G*)² / 2 ·
K/J · B) time, O(G* · p · B) memory. With K = 29, B = 1000 on a 2-core CPU: 0.2 s at p = 32,
2 s at p = 80 (G* = 55), 8 s at p = 126 (``benchmarks/solver.py``); ``exact`` takes 0.3–1.6 s.
"""

from __future__ import annotations

import math
import time

import numpy as np

from asaf_fx.plan import Plan
from asaf_fx.solvers.problem import Problem, build_plan, raise_infeasible


def partition(levels: int, count: int | None = None) -> list[np.ndarray]:
    """The fixed partition of level indices 0..levels-1 into ``count`` (default round(√levels)) runs."""
    count = max(1, round(math.sqrt(levels))) if count is None else count
    if not 1 <= count <= levels:
        raise ValueError(f"two-phase: the {levels} levels cannot be cut into {count} intervals")
    return list(np.array_split(np.arange(levels), count))


def _relaxed(problem: Problem, intervals: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(p, p, J) OptimalCost (FLOPs) and ⌈Ξ_min / r⌉ (units) of each group and interval.

    Both are minima over the interval's levels that are measured and fit the budget alone; an
    interval without such a level costs B + 1 units (never chosen).
    """
    budget = problem.budget_units
    usable = problem.available & (problem.units <= budget)
    shape = (*problem.units.shape[:2], len(intervals))
    flops, units = np.empty(shape), np.empty(shape, dtype=np.int64)
    for j, interval in enumerate(intervals):
        fits = usable[:, :, interval]
        flops[:, :, j] = np.where(fits, problem.flops[:, :, interval], np.inf).min(axis=2)
        units[:, :, j] = np.where(fits, problem.units[:, :, interval], budget + 1).min(axis=2)
    return flops, units


def _coarse(problem: Problem, flops: np.ndarray, units: np.ndarray) -> list[np.ndarray]:
    """Phase 1: ``best[i][g, b]`` = C[i, g, b] for g = 0 .. min(G_max, p - i)."""
    p, budget = problem.num_layers, problem.budget_units
    fits = units <= budget
    cheapest = int(units[fits].min()) if fits.any() else budget + 1
    # g groups cost at least g · cheapest units, so more than B // cheapest of them never fit.
    g_max = p if cheapest == 0 else min(p, budget // cheapest)
    best: list[np.ndarray] = [np.empty((0, budget + 1))] * (p + 1)
    best[p] = np.zeros((1, budget + 1))
    for i in range(p - 1, -1, -1):
        rows = min(g_max, p - i) + 1
        acc = np.full((rows, budget + 1), np.inf)  # row g: exactly g groups; row 0 stays inf
        for n in range(1, p - i + 1):
            after = best[i + n][: rows - 1, :]  # row g - 1 of the layers after this group
            finite = np.flatnonzero(np.isfinite(after[:, budget]))  # C is non-increasing in b
            if finite.size == 0:
                continue
            low, high = int(finite[0]), int(finite[-1]) + 1
            for j in np.flatnonzero(fits[i, n - 1]):
                u = int(units[i, n - 1, j])
                target = acc[low + 1 : high + 1, u:]
                np.minimum(target, after[low:high, : budget + 1 - u] + flops[i, n - 1, j], out=target)
        best[i] = acc
    return best


def _backtrack(
    problem: Problem, best: list[np.ndarray], flops: np.ndarray, units: np.ndarray, groups: int
) -> list[int]:
    """Phase 1's interval for each of ``groups`` groups, from the smallest budget reaching C[0, groups, B]."""
    p, budget = problem.num_layers, problem.budget_units
    row = best[0][groups]
    spend = int(np.flatnonzero(row == row[budget])[0])
    sequence, i, g = [], 0, groups
    while g > 0:
        target = best[i][g, spend]
        found = None
        for n in range(1, p - i + 1):
            after = best[i + n]
            if g - 1 >= after.shape[0]:
                continue
            for j in range(units.shape[2]):
                u = int(units[i, n - 1, j])
                if u <= spend and flops[i, n - 1, j] + after[g - 1, spend - u] == target:
                    found = n, j, u
                    break
            if found:
                break
        if found is None:
            raise AssertionError("two-phase: Phase 1 backtracking lost its path")
        n, j, u = found
        sequence.append(j)
        i, g, spend = i + n, g - 1, spend - u
    return sequence


def _fine(problem: Problem, intervals: list[np.ndarray]) -> list[tuple[int, int, int]] | None:
    """Phase 2: boundaries and exact levels for len(intervals) groups, group g within intervals[g]."""
    p, budget, groups = problem.num_layers, problem.budget_units, len(intervals)
    if groups > p:
        return None
    # after[i, B + 1 + b]: fewest FLOPs covering layers i..p-1 with groups g+1..G-1 within b units;
    # the first B + 1 columns are +inf, so reading b - cost < 0 needs no bounds check (as in exact).
    width = 2 * budget + 2
    b = np.arange(budget + 1)
    after = np.full((p + 1, width), np.inf)
    after[p, budget + 1 :] = 0.0
    picks: list[dict[int, np.ndarray]] = [{} for _ in range(groups)]
    for g in range(groups - 1, -1, -1):
        levels = intervals[g]
        left = groups - g - 1  # groups still to place after this one, one layer each at least
        current = np.full((p + 1, width), np.inf)
        flat = after.ravel()
        for i in range(g, p - left):
            lengths = p - left - i
            cost = problem.units[i, :lengths][:, levels].ravel()  # option o = (n - 1)·|I_g| + position
            options = np.flatnonzero(cost <= budget)  # eq. 13: b' = b - ceil(Ξ / r) >= 0
            if options.size == 0:
                continue
            rows = i + 1 + options // levels.size
            offset = rows * width + (budget + 1) - cost[options]
            candidates = flat.take(b[:, None] + offset[None, :])  # (B + 1, options)
            candidates += problem.flops[i, :lengths][:, levels].ravel()[options][None, :]
            pick = np.argmin(candidates, axis=1)
            current[i, budget + 1 :] = candidates[b, pick]
            picks[g][i] = options[pick]
        after = current
    total = after[0, budget + 1 :]
    if not np.isfinite(total[budget]):
        return None
    spend = int(np.flatnonzero(total == total[budget])[0])
    choices, i = [], 0
    for g in range(groups):
        length, position = divmod(int(picks[g][i][spend]), intervals[g].size)
        length += 1
        level = int(intervals[g][position])
        choices.append((i, length, level))
        spend -= int(problem.units[i, length - 1, level])
        i += length
    return choices


def solve_two_phase(problem: Problem, intervals: int | None = None) -> Plan:
    """The two-phase plan; ``intervals`` is J, the number of runs the levels are cut into (default √K)."""
    started = time.perf_counter()
    grid = partition(problem.num_levels, intervals)
    flops, units = _relaxed(problem, grid)
    best = _coarse(problem, flops, units)
    bound = best[0][:, problem.budget_units]
    ranked = sorted((float(bound[g]), g) for g in range(1, bound.size) if math.isfinite(bound[g]))
    for tried, (relaxed, groups) in enumerate(ranked, start=1):
        sequence = _backtrack(problem, best, flops, units, groups)
        choices = _fine(problem, [grid[j] for j in sequence])
        if choices is None:  # cannot happen with eq. 13's rounding (see above): the fallback is a guard
            continue
        span = [[float(problem.sparsities[run[0]]), float(problem.sparsities[run[-1]])] for run in grid]
        stats = {
            "time_s": time.perf_counter() - started,
            "groups_phase1": ranked[0][1],
            "groups_tried": tried,
            "phase1_flops": relaxed,
            "partition": span,
            "intervals": [span[j] for j in sequence],
        }
        return build_plan(problem, choices, "two-phase", stats)
    raise_infeasible(problem, "two-phase")
    raise AssertionError("unreachable")
