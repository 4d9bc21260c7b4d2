"""The exact solver against brute-force enumeration, and the baselines against the exact solver."""

from __future__ import annotations

import io
import itertools
import math

import numpy as np
import pytest
from rich.console import Console

import asaf_fx
from asaf_fx import InfeasibleError, SensitivityTable
from asaf_fx.plan import render_plan
from asaf_fx.solvers import METHODS
from asaf_fx.solvers.problem import Problem, make_problem
from asaf_fx.synthetic import synthetic_table


def compositions(p: int):
    """Every way to cut layers 0..p-1 into consecutive non-empty groups, as group lengths."""
    for cuts in itertools.product((False, True), repeat=p - 1):
        lengths, run = [], 1
        for cut in cuts:
            if cut:
                lengths.append(run)
                run = 1
            else:
                run += 1
        yield [*lengths, run]


def brute_force(problem: Problem, cost: np.ndarray, budget: float) -> float:
    """Fewest FLOPs over all compositions × all levels with Σ cost ≤ budget (inf if none)."""
    p, levels = problem.num_layers, problem.num_levels
    best = math.inf
    for lengths in compositions(p):
        starts = np.cumsum([0, *lengths[:-1]])
        picks = np.array(list(itertools.product(range(levels), repeat=len(lengths))))  # (combos, G)
        total_cost = np.zeros(len(picks))
        total_flops = np.zeros(len(picks))
        usable = np.ones(len(picks), dtype=bool)
        for g, (start, length) in enumerate(zip(starts, lengths, strict=True)):
            k = picks[:, g]
            usable &= problem.available[start, length - 1, k]
            total_cost += np.where(usable, cost[start, length - 1, k], 0.0)
            total_flops += problem.flops[start, length - 1, k]
        fits = usable & (total_cost <= budget)
        if fits.any():
            best = min(best, float(total_flops[fits].min()))
    return best


def random_table(rng: np.random.Generator, *, on_grid: float | None = None) -> SensitivityTable:
    """Small noisy table: p ≤ 7, ≤ 4 levels, NaN holes, non-monotone, sometimes explicit FLOPs."""
    p = int(rng.integers(1, 8))
    levels = int(rng.integers(1, 5))
    sparsities = np.sort(rng.choice(np.arange(0, 50) / 100.0, size=levels, replace=False))
    layer_flops = rng.uniform(0.5, 2.0, size=p)
    degradation = np.full((p, p, levels), np.nan)
    for i in range(p):
        for n in range(1, p - i + 1):
            degradation[i, n - 1] = n * sparsities * rng.uniform(0.0, 0.02) + rng.normal(0.0, 0.002, levels)
    degradation[rng.random(degradation.shape) < 0.15] = np.nan
    if on_grid is not None:
        degradation = np.round(degradation / on_grid) * on_grid
    flops = None
    if rng.random() < 0.4:  # explicit H, not linear in s
        flops = SensitivityTable.default_flops(layer_flops, sparsities) * rng.uniform(0.9, 1.1, degradation.shape)
    return SensitivityTable(layer_flops, sparsities, degradation, flops=flops)


def test_exact_equals_brute_force_on_random_instances():
    rng = np.random.default_rng(1234)
    feasible = infeasible = 0
    for _ in range(320):
        table = random_table(rng)
        budget = float(rng.uniform(0.0, 0.03))
        resolution = None if rng.random() < 0.3 else budget / rng.integers(2, 60) if budget > 0 else 0.001
        problem = make_problem(table, budget, 0.0, 0.99, resolution)
        expected = brute_force(problem, problem.units.astype(float), problem.budget_units)
        if math.isinf(expected):
            with pytest.raises(InfeasibleError):
                asaf_fx.solve(table, budget, min_sparsity=0.0, max_sparsity=0.99, resolution=resolution)
            infeasible += 1
            continue
        plan = asaf_fx.solve(table, budget, min_sparsity=0.0, max_sparsity=0.99, resolution=resolution)
        assert plan.flops == pytest.approx(expected, rel=1e-12)
        assert plan.predicted_degradation <= budget
        assert plan.num_layers == table.num_layers
        feasible += 1
    # The generator must exercise both outcomes, or the comparison above proves little.
    assert feasible > 150 and infeasible > 20


def test_exact_is_exact_when_degradations_sit_on_the_resolution_grid():
    # ξ multiples of 1/1024 are exact in binary, so rounding up changes nothing and the optimum of
    # the discretised problem must equal the optimum over true degradations.
    rng = np.random.default_rng(7)
    step = 1.0 / 1024
    for _ in range(60):
        table = random_table(rng, on_grid=step)
        budget = step * int(rng.integers(0, 30))
        problem = make_problem(table, budget, 0.0, 0.99, step)
        true_cost = np.where(problem.available, np.maximum(problem.degradation, 0.0), np.inf)
        expected = brute_force(problem, true_cost, budget)
        if math.isinf(expected):
            continue
        plan = asaf_fx.solve(table, budget, min_sparsity=0.0, max_sparsity=0.99, resolution=step)
        assert plan.flops == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_baselines_never_beat_exact_and_all_stay_within_budget(seed):
    table = synthetic_table(12 + seed, seed=seed)
    exact = asaf_fx.solve(table, 0.01)
    assert exact.predicted_degradation <= 0.01
    for method in ("two-phase", "greedy"):
        plan = asaf_fx.solve(table, 0.01, method=method)
        assert plan.method == method
        assert plan.flops >= exact.flops * (1 - 1e-12)
        assert plan.predicted_degradation <= 0.01
        assert all(0.01 <= s <= 0.15 for s in plan.layer_sparsity)


def test_plan_respects_sparsity_window_and_covers_layers():
    table = synthetic_table(20, seed=3)
    plan = asaf_fx.solve(table, 0.02, min_sparsity=0.05, max_sparsity=0.1)
    assert len(plan.layer_sparsity) == 20
    assert all(0.05 - 1e-12 <= s <= 0.1 + 1e-12 for s in plan.layer_sparsity)
    assert plan.groups[0].start == 0 and plan.groups[-1].stop == 20
    assert plan.flops < plan.dense_flops


def test_exact_removes_more_than_greedy_where_groups_are_cheaper_than_their_layers():
    # Pruning layers 0-1 together is cheaper than the sum of pruning each: only a solver that
    # considers groups can use that.
    sparsities = np.array([0.0, 0.1])
    degradation = np.full((2, 2, 2), np.nan)
    degradation[0, 0] = degradation[1, 0] = [0.0, 0.006]
    degradation[0, 1] = [0.0, 0.008]
    table = SensitivityTable(np.ones(2), sparsities, degradation)
    exact = asaf_fx.solve(table, 0.01, min_sparsity=0.0)
    greedy = asaf_fx.solve(table, 0.01, min_sparsity=0.0, method="greedy")
    assert exact.layer_sparsity == (0.1, 0.1)
    assert greedy.flops > exact.flops


def test_infeasible_names_the_smallest_achievable_degradation():
    sparsities = np.array([0.05, 0.1])
    degradation = np.full((2, 2, 2), np.nan)
    degradation[0, 0] = [0.004, 0.01]
    degradation[1, 0] = [0.003, 0.01]
    degradation[0, 1] = [0.009, 0.02]
    table = SensitivityTable(np.ones(2), sparsities, degradation)
    for method in METHODS:
        with pytest.raises(InfeasibleError, match=r"smallest achievable degradation .*0\.007"):
            asaf_fx.solve(table, 0.005, min_sparsity=0.05, method=method)


def test_allow_dense_leaves_layers_unpruned_where_the_budget_cannot_pay_for_them(capsys):
    sparsities = np.array([0.05, 0.1])
    degradation = np.full((2, 2, 2), np.nan)
    degradation[0, 0] = [0.004, 0.01]
    degradation[1, 0] = [0.002, 0.01]
    degradation[0, 1] = [0.009, 0.02]
    table = SensitivityTable(np.ones(2), sparsities, degradation)  # pruning both costs ≥ 0.006
    for method in ("exact", "greedy"):  # two-phase's coarse phase sees one level per interval only
        plan = asaf_fx.solve(table, 0.005, min_sparsity=0.05, method=method, allow_dense=True)
        assert plan.layer_sparsity == (0.0, 0.05)  # the cheaper layer is pruned, the other stays dense
        assert plan.predicted_degradation == 0.002 and plan.flops == pytest.approx(2 - 0.05)
        assert plan.stats["allow_dense"] is True
    nothing = asaf_fx.solve(table, 0.001, min_sparsity=0.05, allow_dense=True)
    assert nothing.layer_sparsity == (0.0, 0.0) and nothing.flops == nothing.dense_flops
    render_plan(plan, table, Console(file=io.StringIO()))  # an unpruned group has no table level: still renders


def test_infeasible_when_nothing_is_measured():
    table = SensitivityTable(np.ones(3), np.array([0.1]), np.full((3, 3, 1), np.nan))
    with pytest.raises(InfeasibleError, match="no measured groups"):
        asaf_fx.solve(table, 0.01)


def test_infeasible_only_at_coarse_resolution_says_so():
    table = SensitivityTable(np.ones(2), np.array([0.1]), np.array([[[0.004], [np.nan]], [[0.004], [np.nan]]]))
    with pytest.raises(InfeasibleError, match="finer resolution"):
        asaf_fx.solve(table, 0.01, resolution=0.006)
    assert asaf_fx.solve(table, 0.01, resolution=0.001).predicted_degradation == pytest.approx(0.008)


def test_no_sparsity_level_in_window():
    table = synthetic_table(4)
    with pytest.raises(InfeasibleError, match="no sparsity level"):
        asaf_fx.solve(table, 0.01, min_sparsity=0.5, max_sparsity=0.6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_degradation": -0.1}, "max_degradation must be a finite number >= 0"),
        ({"max_degradation": float("nan")}, "max_degradation must be a finite number"),
        ({"min_sparsity": 0.2, "max_sparsity": 0.1}, "min_sparsity 0.2 is above max_sparsity 0.1"),
        ({"max_sparsity": 1.0}, r"max_sparsity must lie in \[0, 1\)"),
        ({"min_sparsity": -0.01}, r"min_sparsity must lie in \[0, 1\)"),
        ({"resolution": 0.0}, "resolution must be a finite number > 0"),
        ({"resolution": -1e-3}, "resolution must be a finite number > 0"),
        ({"method": "annealing"}, "unknown method 'annealing'"),
    ],
)
def test_bad_solver_arguments(kwargs, message):
    table = synthetic_table(4)
    arguments = {"max_degradation": 0.01, **kwargs}
    with pytest.raises(ValueError, match=message):
        asaf_fx.solve(table, **arguments)


def test_zero_budget_leaves_every_layer_dense_even_where_pruning_measured_helpful():
    # A negative ξ is measurement error, not a free pruning: at zero budget nothing is pruned.
    sparsities = np.array([0.05, 0.1])
    degradation = np.full((2, 2, 2), np.nan)
    degradation[:, 0] = [[-0.001, 0.002], [0.0, 0.001]]
    table = SensitivityTable(np.ones(2), sparsities, degradation)
    with pytest.raises(InfeasibleError, match="smallest achievable degradation"):
        asaf_fx.solve(table, 0.0, min_sparsity=0.05)
    plan = asaf_fx.solve(table, 0.0, allow_dense=True)
    assert plan.layer_sparsity == (0.0, 0.0)


def test_charged_degradation_is_a_monotone_upper_bound():
    from asaf_fx.solvers.problem import charged_degradation, noise_floor

    degradation = np.full((2, 2, 3), np.nan)
    degradation[:, 0] = [[0.002, 0.004, -0.003], [0.001, np.nan, 0.0005]]
    degradation[0, 1] = [0.003, 0.004, 0.002]  # the two-layer group, estimated
    measured = ~np.isnan(degradation)
    measured[0, 1] = False
    table = SensitivityTable(np.ones(2), np.array([0.05, 0.1, 0.15]), degradation, measured=measured)
    sigma = 0.003
    assert noise_floor(table) == pytest.approx(sigma)
    charged = charged_degradation(table)
    # 15 % costs at least what 10 % did; a measured entry carries one σ
    np.testing.assert_allclose(charged[0, 0], np.array([0.002, 0.004, 0.004]) + sigma)
    assert charged[1, 0, 0] == pytest.approx(0.001 + sigma) and np.isnan(charged[1, 0, 1])  # unmeasured stays out
    assert charged[1, 0, 2] == pytest.approx(0.001 + sigma)
    # an estimate from two single-layer measurements carries their summed noise, σ·√2
    np.testing.assert_allclose(charged[0, 1], np.array([0.003, 0.004, 0.004]) + sigma * np.sqrt(2))


def test_noisy_top_level_is_not_taken_for_free():
    # Layer 0 measured below zero at 15 % (noise); the old cost max(ξ, 0) made that choice free.
    degradation = np.full((2, 2, 3), np.nan)
    degradation[:, 0] = [[0.005, 0.006, -0.001], [0.001, 0.002, 0.003]]
    table = SensitivityTable(np.ones(2), np.array([0.05, 0.1, 0.15]), degradation)
    plan = asaf_fx.solve(table, 0.006, method="exact", allow_dense=True)
    assert plan.layer_sparsity == (0.0, 0.15)
    assert plan.predicted_degradation == pytest.approx(0.003 + 0.001)  # ξ plus one σ of noise
    assert plan.stats["table_sum"] == pytest.approx(0.003)
    assert plan.stats["noise_floor"] == pytest.approx(0.001)


def test_table_must_be_a_table():
    with pytest.raises(TypeError, match="SensitivityTable"):
        asaf_fx.solve({"degradation": []}, 0.01)


def test_each_entry_is_charged_its_own_standard_error():
    from asaf_fx.solvers.problem import charged_degradation

    degradation = np.full((2, 2, 2), np.nan)
    degradation[:, 0] = [[0.002, 0.004], [0.001, -0.001]]
    degradation[0, 1] = [0.003, 0.005]
    stderr = np.where(np.isnan(degradation), np.nan, 0.0)
    stderr[:, 0] = [[0.001, 0.002], [0.0005, 0.003]]
    stderr[0, 1] = [np.nan, 0.001]  # unknown: the table's noise floor (RMS of negative ξ) stands in
    table = SensitivityTable(np.ones(2), np.array([0.05, 0.1]), degradation, stderr=stderr)
    np.testing.assert_allclose(charged_degradation(table, z=2.0)[:, 0],
                               [[0.002 + 0.002, 0.004 + 0.004], [0.001 + 0.001, 0.001 + 0.006]])
    np.testing.assert_allclose(charged_degradation(table, z=2.0)[0, 1], [0.003 + 2 * 0.001, 0.005 + 0.002])
    np.testing.assert_allclose(charged_degradation(table, z=0.0)[:, 0], [[0.002, 0.004], [0.001, 0.001]])
    # a larger z makes the same budget buy less: both layers at 10 % fit only when errors are free
    assert asaf_fx.solve(table, 0.0051, z=0.0, allow_dense=True, min_sparsity=0.05).layer_sparsity == (0.1, 0.1)
    plan = asaf_fx.solve(table, 0.0051, z=1.0, allow_dense=True, min_sparsity=0.05)
    assert plan.layer_sparsity != (0.1, 0.1) and plan.stats["z"] == 1.0 and plan.stats["entry_errors"]
    with pytest.raises(ValueError, match="z .* must be a finite number >= 0"):
        asaf_fx.solve(table, 0.004, z=-1.0)
