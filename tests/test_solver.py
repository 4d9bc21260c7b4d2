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
    for method in METHODS:
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


# --- two-phase (the paper's Algorithms 1 and 2), charge modes, infeasible messages ---------------


def random_flops_table(rng: np.random.Generator) -> SensitivityTable:
    """random_table with random explicit FLOPs, so that no two plans tie by accident."""
    table = random_table(rng)
    flops = rng.uniform(0.1, 2.0, size=table.degradation.shape)
    return SensitivityTable(table.layer_flops, table.sparsities, table.degradation, flops=flops)


def restricted_brute_force(problem: Problem, runs: list[list[int]], relaxed: bool) -> dict[int, float]:
    """Fewest FLOPs per group count g over plans whose group j takes a level of runs[j].

    relaxed=False: the plans have exactly len(runs) groups, group j at one level of runs[j] (Phase 2).
    relaxed=True: any g, each group given any run, charged the run's fewest FLOPs and fewest units
    over its levels that fit the budget alone, possibly from different levels (Phase 1's relaxation).
    """
    budget, best = problem.budget_units, {}
    for lengths in compositions(problem.num_layers):
        if not relaxed and len(lengths) != len(runs):
            continue
        starts = np.cumsum([0, *lengths[:-1]])
        per_group = []
        for g, (start, length) in enumerate(zip(starts, lengths, strict=True)):
            options = []
            for run in runs if relaxed else [runs[g]]:
                fits = [k for k in run if problem.available[start, length - 1, k]
                        and problem.units[start, length - 1, k] <= budget]
                if relaxed and fits:
                    options.append((min(problem.flops[start, length - 1, k] for k in fits),
                                    min(problem.units[start, length - 1, k] for k in fits)))
                elif not relaxed:
                    options += [(problem.flops[start, length - 1, k], problem.units[start, length - 1, k])
                                for k in fits]
            per_group.append(options)
        for combo in itertools.product(*per_group):
            if sum(units for _, units in combo) <= budget:
                total = math.fsum(flops for flops, _ in combo)
                best[len(lengths)] = min(best.get(len(lengths), math.inf), total)
    return best


def test_two_phase_phases_equal_their_brute_force_definitions():
    from asaf_fx.solvers.two_phase import partition, solve_two_phase

    rng = np.random.default_rng(22)
    feasible = 0
    for _ in range(60):
        table = random_flops_table(rng)
        if table.num_layers > 5:
            continue
        budget = float(rng.uniform(0.002, 0.03))
        problem = make_problem(table, budget, 0.0, 0.99, budget / int(rng.integers(3, 40)))
        count = int(rng.integers(1, problem.num_levels + 1))
        runs = [run.tolist() for run in partition(problem.num_levels, count)]
        coarse = restricted_brute_force(problem, runs, relaxed=True)
        if not coarse:
            with pytest.raises(InfeasibleError):
                solve_two_phase(problem, count)
            continue
        plan = solve_two_phase(problem, count)
        # Phase 1: keyed on the layer position, any group boundaries; G* = the cheapest relaxed
        # count (random FLOPs: no ties), its value the relaxed optimum, a lower bound on the plan.
        groups = min(coarse, key=lambda g: (coarse[g], g))
        assert plan.stats["groups_phase1"] == groups == len(plan.groups)
        assert plan.stats["phase1_flops"] == pytest.approx(coarse[groups], rel=1e-12)
        assert plan.stats["groups_tried"] == 1 and plan.stats["phase1_flops"] <= plan.flops * (1 + 1e-12)
        # Phase 2: the best plan of exactly G* groups, each at a level of its Phase 1 interval.
        chosen = [[k for k in range(problem.num_levels) if lo <= problem.sparsities[k] <= hi]
                  for lo, hi in plan.stats["intervals"]]
        fine = restricted_brute_force(problem, chosen, relaxed=False)
        assert plan.flops == pytest.approx(fine[groups], rel=1e-12)
        feasible += 1
    assert feasible > 25


def test_two_phase_never_beats_exact_and_with_one_interval_per_level_equals_it():
    from asaf_fx.solvers.exact import solve_exact
    from asaf_fx.solvers.two_phase import solve_two_phase

    rng = np.random.default_rng(4)
    for _ in range(80):
        table = random_table(rng)
        budget = float(rng.uniform(0.0, 0.03))
        charge = str(rng.choice(["noise-aware", "raw"]))
        problem = make_problem(table, budget, 0.0, 0.99, None, bool(rng.random() < 0.3), None, charge)
        try:
            exact = solve_exact(problem)
        except InfeasibleError:  # Phase 1 is finite for some G exactly when a plan exists
            with pytest.raises(InfeasibleError):
                solve_two_phase(problem)
            continue
        assert solve_two_phase(problem).flops >= exact.flops * (1 - 1e-12)
        # One interval per level: Phase 1 is exact for every G, so G* is an optimal group count
        # (an equal-block Phase 1 would miss it) and Phase 2 finds exact's optimum.
        assert solve_two_phase(problem, problem.num_levels).flops == pytest.approx(exact.flops, rel=1e-12)
    table = synthetic_table(12, seed=5)
    exact = asaf_fx.solve(table, 0.01)
    problem = make_problem(table, 0.01, 0.01, 0.15, None)
    assert solve_two_phase(problem, problem.num_levels).flops == pytest.approx(exact.flops, rel=1e-12)


def test_two_phase_phase1_chooses_unequal_groups_by_layer_position():
    # Layer 0 is sensitive, layers 1-3 are cheap to prune together: the optimum is [0] at 25 % and
    # [1, 4) at 50 %. Phase 1 on equal blocks cannot express that split (this earlier reading found
    # no plan); keyed on the first layer it picks G* = 2 and Phase 2 finds exact's plan.
    single = np.array([[0.001, 0.03], [0.002, 0.003], [0.002, 0.003], [0.002, 0.003]])
    degradation = np.full((4, 4, 2), np.nan)
    for i in range(4):
        for n in range(1, 5 - i):
            total = single[i : i + n].sum(axis=0)
            degradation[i, n - 1] = total if i == 0 or n == 1 else 0.6 * total
    table = SensitivityTable(np.ones(4), np.array([0.25, 0.5]), degradation)
    exact = asaf_fx.solve(table, 0.0075, min_sparsity=0.25, max_sparsity=0.5)
    plan = asaf_fx.solve(table, 0.0075, min_sparsity=0.25, max_sparsity=0.5, method="two-phase")
    assert plan.groups == exact.groups == (asaf_fx.Group(0, 1, 0.25), asaf_fx.Group(1, 4, 0.5))
    assert plan.stats["groups_phase1"] == 2 and plan.stats["phase1_flops"] == plan.flops == 2.25
    assert plan.stats["partition"] == [[0.25, 0.5]] and plan.stats["intervals"] == [[0.25, 0.5]] * 2


def test_every_method_may_spend_the_whole_budget():
    # ξ on a binary grid: the plan costs exactly the 8 units of the budget. Two-phase follows eq. 13
    # (b' = b - ceil(Ξ/Δ) >= 0), not Algorithm 2's strict b - Ξ/Δ > 0, which would refuse it.
    step = 1.0 / 1024
    table = SensitivityTable(np.ones(2), np.array([0.1]), np.array([[[4 * step], [np.nan]], [[4 * step], [np.nan]]]))
    for method in METHODS:
        plan = asaf_fx.solve(table, 8 * step, resolution=step, method=method, z=0)
        assert plan.layer_sparsity == (0.1, 0.1) and plan.stats["used_units"] == plan.stats["budget_units"] == 8


def raw_table() -> SensitivityTable:
    degradation = np.full((2, 2, 3), np.nan)
    degradation[:, 0] = [[0.004, 0.002, 0.006], [-0.001, 0.003, 0.005]]  # non-monotone; negative
    degradation[0, 1] = [0.009, 0.008, 0.02]
    return SensitivityTable(np.ones(2), np.array([0.05, 0.1, 0.15]), degradation)


def test_raw_charge_is_the_table_xi_with_negatives_at_zero():
    from asaf_fx.solvers.problem import charged_degradation

    table = raw_table()
    expected = np.full((2, 2, 3), np.nan)
    expected[:, 0] = [[0.004, 0.002, 0.006], [0.0, 0.003, 0.005]]
    expected[0, 1] = [0.009, 0.008, 0.02]
    np.testing.assert_array_equal(charged_degradation(table, charge="raw"), expected)
    for method in METHODS:
        # Raw: layer 0 at 10 % costs its measured 0.002, less than at 5 %: (10 %, 10 %) = 0.005 fits.
        plan = asaf_fx.solve(table, 0.0055, min_sparsity=0.05, method=method, charge="raw")
        assert plan.layer_sparsity == (0.1, 0.1), method
        assert plan.predicted_degradation == pytest.approx(0.005) and plan.stats["table_sum"] == pytest.approx(0.005)
        assert plan.stats["charge"] == "raw" and plan.stats["z"] == 0.0
        # Noise-aware charges layer 0 at 10 % its 5 % value plus σ = 0.001: 0.005 alone.
        with pytest.raises(InfeasibleError):
            asaf_fx.solve(table, 0.0055, min_sparsity=0.05, method=method)
    # A negative ξ is charged 0, not refunded: at zero budget only layer 1 at 5 % is free.
    plan = asaf_fx.solve(table, 0.0, min_sparsity=0.05, allow_dense=True, charge="raw")
    assert plan.layer_sparsity == (0.0, 0.05)
    assert plan.predicted_degradation == 0.0 and plan.stats["table_sum"] == pytest.approx(-0.001)
    assert asaf_fx.solve(table, 0.0055, min_sparsity=0.05, charge="raw", z=0).layer_sparsity == (0.1, 0.1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"charge": "paper"}, "unknown charge 'paper'"),
        ({"charge": "raw", "z": 1.0}, r"z=1.0 charges standard errors, which charge='raw' never does"),
    ],
)
def test_bad_charge_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        asaf_fx.solve(raw_table(), 0.01, **kwargs)


def test_infeasible_message_says_to_raise_the_budget_when_no_resolution_helps():
    table = SensitivityTable(np.ones(2), np.array([0.1]), np.array([[[0.006], [0.011]], [[0.006], [np.nan]]]))
    for method in METHODS:
        with pytest.raises(InfeasibleError, match=r"smallest achievable degradation .* is 0\.011\. Raise the budget"):
            asaf_fx.solve(table, 0.01, method=method, z=0)


def test_infeasible_message_says_finer_resolution_only_when_rounded_costs_do_not_fit():
    table = SensitivityTable(np.ones(2), np.array([0.1]), np.array([[[0.004], [np.nan]], [[0.004], [np.nan]]]))
    for method in METHODS:
        with pytest.raises(InfeasibleError, match="fits only at a finer resolution"):
            asaf_fx.solve(table, 0.01, resolution=0.006, method=method)
        plan = asaf_fx.solve(table, 0.01, resolution=0.001, method=method)
        assert plan.flops == pytest.approx(1.8) and plan.predicted_degradation == pytest.approx(0.008)


def test_infeasible_message_says_when_exact_finds_a_plan_at_this_resolution():
    # Pruned apart the two layers cost 0.012, together 0.008: greedy, which never merges layers,
    # finds nothing, though a plan fits at this very resolution. The message must not send the
    # user to a finer resolution.
    table = SensitivityTable(np.ones(2), np.array([0.1]), np.array([[[0.006], [0.008]], [[0.006], [np.nan]]]))
    with pytest.raises(InfeasibleError, match=r"one exists at resolution 1e-05 .* use method='exact'") as info:
        asaf_fx.solve(table, 0.01, method="greedy", z=0)
    assert "finer resolution" not in str(info.value)
    assert asaf_fx.solve(table, 0.01, z=0).groups == (asaf_fx.Group(0, 2, 0.1),)


def test_infeasible_messages_are_true_on_random_tables():
    rng = np.random.default_rng(99)
    said = set()
    for _ in range(150):
        table = random_table(rng)
        budget = float(rng.uniform(0.0, 0.02))
        resolution = budget / int(rng.integers(2, 30)) if budget > 0 else None
        for method in ("two-phase", "greedy"):
            try:
                asaf_fx.solve(table, budget, min_sparsity=0.0, max_sparsity=0.99, resolution=resolution, method=method)
            except InfeasibleError as error:
                exact_fits = True
                try:
                    asaf_fx.solve(table, budget, min_sparsity=0.0, max_sparsity=0.99, resolution=resolution)
                except InfeasibleError:
                    exact_fits = False
                claims = "method='exact'" in str(error)
                assert claims == exact_fits, str(error)
                said.add((method, claims))
    assert ("greedy", True) in said and ("greedy", False) in said
