"""asaf_fx.budget_search: the δ each round solves at, when the search stops, which round is kept."""

import numpy as np
import pytest

from asaf_fx.budget_search import GROW, TIGHTEN, next_delta, search
from asaf_fx.table import SensitivityTable


def linear_table(layers: int = 8, per_layer: float = 0.001) -> SensitivityTable:
    """Every group costs ``per_layer`` × its layers × (level / 0.05), with no noise: plans grow with δ."""
    sparsities = np.array([0.05, 0.1])
    n = np.arange(1, layers + 1)[None, :, None]
    degradation = np.broadcast_to(per_layer * n * sparsities[None, None, :] / 0.05, (layers, layers, 2)).copy()
    for start in range(layers):
        degradation[start, layers - start:] = np.nan
    return SensitivityTable(np.ones(layers), sparsities, degradation, stderr=np.zeros_like(degradation))


def run(table, budget, rounds, measured_of):
    """The search with ``measured_of(plan)`` as the measurement; returns log, kept, δ solved, messages."""
    solved, said = [], []

    def measure(plan):
        solved.append(plan.max_degradation)
        return measured_of(plan), ("model of", plan.max_degradation)

    log, kept = search(table, budget, 0.0, rounds, measure, said.append)
    return log, kept, solved, said


def test_next_delta_is_the_secant_towards_the_target():
    budget = 0.01
    target = TIGHTEN * budget
    # after one overshoot the dense plan (0, 0) is the lower end: δ · target / measured
    assert next_delta(budget, (0.0, 0.0), (0.01, 0.03)) == pytest.approx(0.01 * target / 0.03)
    low, high = (0.004, 0.005), (0.01, 0.02)
    step = next_delta(budget, low, high)
    assert low[0] < step < high[0]
    assert low[1] + (step - low[0]) * (high[1] - low[1]) / (high[0] - low[0]) == pytest.approx(target)
    # nothing overshot yet: grow by target / measured, at most GROW, ×2 where the round measured ≤ 0
    assert next_delta(budget, (0.01, 0.006), None) == pytest.approx(0.01 * target / 0.006)
    assert next_delta(budget, (0.01, 0.0001), None) == pytest.approx(0.01 * GROW)
    assert next_delta(budget, (0.01, -0.002), None) == pytest.approx(0.02)


def test_an_overshoot_is_bracketed_and_the_largest_plan_within_budget_is_kept():
    table = linear_table()
    log, kept, solved, said = run(table, 0.01, 5, lambda plan: 2.5 * plan.predicted_degradation)
    rounds = [r for r in log if "measured_degradation" in r]
    assert solved[0] == 0.01 and rounds[0]["measured_degradation"] > 0.01
    assert solved[1] == pytest.approx(0.01 * TIGHTEN * 0.01 / rounds[0]["measured_degradation"])
    within = [r for r in rounds if r["measured_degradation"] <= 0.01]
    assert within and kept is not None
    assert kept.plan.flops_ratio == min(r["flops_ratio"] for r in within)  # the most FLOPs removed
    assert kept.result == ("model of", kept.plan.max_degradation)  # the caller's object for that round
    # every later δ lies strictly between the largest within-budget δ and the smallest overshooting δ
    for number in range(2, len(solved)):
        earlier = rounds[:number]
        low = max([r["max_degradation"] for r in earlier if r["measured_degradation"] <= 0.01], default=0.0)
        high = min(r["max_degradation"] for r in earlier if r["measured_degradation"] > 0.01)
        assert low < solved[number] < high
    # the largest plan this table's grid offers within 1 % at 2.5× its prediction: 4 layer-units,
    # measured 1 % ≥ TIGHTEN · budget, which ends the search with rounds to spare
    assert kept.plan.predicted_degradation == pytest.approx(0.004) and len(solved) == 3


def test_a_round_close_enough_below_the_budget_ends_the_search():
    table = linear_table()
    # measured = predicted: round 1 at δ = 1 % uses it fully, which is within [TIGHTEN · budget, budget]
    log, kept, solved, _ = run(table, 0.01, 5, lambda plan: plan.predicted_degradation)
    assert len(solved) == 1 and len(log) == 1 and kept.plan.predicted_degradation >= TIGHTEN * 0.01


def test_with_room_left_the_budget_grows_until_an_overshoot():
    table = linear_table()
    log, kept, solved, _ = run(table, 0.01, 3, lambda plan: 0.25 * plan.predicted_degradation)
    assert solved[1] > solved[0] and solved[1] <= GROW * solved[0]
    assert kept.plan.flops_ratio < log[0]["flops_ratio"]  # a later, larger plan is kept


def test_when_nothing_fits_the_dense_plan_is_kept_and_dense_is_never_measured():
    table = linear_table()
    log, kept, solved, said = run(table, 0.01, 4, lambda plan: 1.0)  # every pruning costs 100 %
    assert kept is None
    cheapest = 0.001
    assert solved[-1] == pytest.approx(cheapest)  # a tightened δ that would be dense measures the cheapest choice
    assert all(r.get("flops_ratio", 0.0) < 1.0 for r in log)  # no round measured the dense plan
    assert "again; stopping" in said[-1] and len(solved) < 4  # the cheapest choice twice: nothing left to learn
