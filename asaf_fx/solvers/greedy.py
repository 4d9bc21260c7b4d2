"""Greedy baseline: every layer its own group, raise rates by best FLOPs-per-degradation ratio.

Start each layer at its cheapest available level (in budget units). Then, while some move fits the
remaining budget, move one layer to a higher level, choosing the move that saves the most FLOPs per
unit of added cost (a move that costs nothing is taken first). Merged groups are never considered,
which is what makes it naive: it answers "how much does the DP buy over the obvious heuristic".

Cost: O(p · S) per move and at most p · S moves, so O(p² · S²) time, O(p · S) memory.
"""

from __future__ import annotations

import time

import numpy as np

from asaf_fx.plan import Plan
from asaf_fx.solvers.problem import Problem, build_plan, raise_infeasible


def solve_greedy(problem: Problem) -> Plan:
    started = time.perf_counter()
    p, budget = problem.num_layers, problem.budget_units
    cost = problem.units[:, 0, :].astype(np.float64)  # (p, K) singles only
    flops = problem.flops[:, 0, :]
    usable = problem.available[:, 0, :] & (problem.units[:, 0, :] <= budget)
    if not np.all(usable.any(axis=1)):
        raise_infeasible(problem, "greedy")
    masked_cost = np.where(usable, cost, np.inf)
    # Start: cheapest level, and among equally cheap ones the fewest FLOPs.
    level = np.lexsort((np.where(usable, flops, np.inf), masked_cost), axis=1)[:, 0]
    rows = np.arange(p)
    spent = cost[rows, level].sum()
    if spent > budget:
        raise_infeasible(problem, "greedy")
    moves = 0
    while True:
        extra = masked_cost - cost[rows, level][:, None]
        saving = flops[rows, level][:, None] - flops
        allowed = usable & (saving > 0) & (extra <= budget - spent)
        if not allowed.any():
            break
        # Free moves first (ratio +inf), then the best saving per unit of cost.
        ratio = np.full(extra.shape, -np.inf)
        np.divide(saving, extra, out=ratio, where=allowed & (extra > 0))
        ratio[allowed & (extra <= 0)] = np.inf
        top = np.flatnonzero(ratio == ratio.max())
        # Ties: the largest saving, then the lowest index (deterministic).
        pick = top[np.argmax(saving.ravel()[top])]
        layer, new_level = divmod(int(pick), problem.num_levels)
        spent += extra[layer, new_level]
        level[layer] = new_level
        moves += 1
    choices = [(i, 1, int(level[i])) for i in range(p)]
    stats = {"time_s": time.perf_counter() - started, "states": moves}
    return build_plan(problem, choices, "greedy", stats)
