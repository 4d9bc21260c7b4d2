"""asaf_fx.tradeoff_curve and python -m asaf_fx curve on a tiny saved model: the points it writes,
their agreement with a direct compile, measuring each distinct model once, resuming, bad input."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

import asaf_fx
from asaf_fx import __main__ as entry
from asaf_fx import budget_search, pipeline, tradeoff
from asaf_fx.cli import curve as curve_cli
from asaf_fx.inspection import model_totals
from asaf_fx.solvers.problem import charged_degradation

LAYERS = 2
REAL_COMPILE = pipeline.compile_model
TOP = 10.0  # far above what pruning every layer at the top level costs: the densest plan the table allows


@pytest.fixture(scope="module")
def inputs(h, tmp_path_factory) -> dict[str, Path]:
    return h.pipeline_inputs(tmp_path_factory.mktemp("tiny2"), LAYERS)


@pytest.fixture(scope="module")
def argv(h):
    # Without the down_proj refit the tiny table has an uneven plan whose uniform twin prunes too:
    # which models get compiled, and when, is what these tests are about.
    return lambda inputs, out, *extra: h.pipeline_argv(inputs, out, *extra, "--no-refit")


class Compiles:
    """Counts pipeline.compile_model calls (the curve's only way to compile), recording the plans;
    with ``fail_at`` k, the k-th call raises KeyboardInterrupt (Ctrl-C during that compile)."""

    def __init__(self, monkeypatch, fail_at: int | None = None) -> None:
        self.plans, real = [], REAL_COMPILE

        def compile_model(model, plan, **kwargs):
            if fail_at is not None and len(self.plans) + 1 == fail_at:
                raise KeyboardInterrupt
            self.plans.append(plan)
            return real(model, plan, **kwargs)

        monkeypatch.setattr(pipeline, "compile_model", compile_model)


def curve(argv, inputs, out, budgets: str, monkeypatch, fail_at: int | None = None):
    """The CLI's arguments through the Python API: (result, printout, compiled plans)."""
    parsed, printed = curve_cli.parse_args(argv(inputs, out, "--budgets", budgets)), io.StringIO()
    compiles = Compiles(monkeypatch, fail_at)
    try:
        result = asaf_fx.tradeoff_curve(parsed.model, parsed.out, parsed.budgets, parsed.config,
                                        Console(file=printed, width=220))
    except KeyboardInterrupt:
        return None, printed.getvalue(), compiles.plans
    return result, printed.getvalue(), compiles.plans


def layer_sparsity(point) -> list[float]:
    return [s for start, stop, s in point["groups"] for _ in range(start, stop)]


@pytest.fixture(scope="module")
def top(inputs, tmp_path_factory, argv):
    """Two budgets far above the top level's cost: every layer at the top level, twice."""
    out = tmp_path_factory.mktemp("curve") / "out"
    with pytest.MonkeyPatch.context() as monkeypatch:
        result, printed, plans = curve(argv, inputs, out, f"{2 * TOP},{TOP}", monkeypatch)
    return out, result, printed, plans


def uneven_budget(table) -> float:
    """A budget between the cheapest single choice and the densest plan whose plan prunes the
    layers unevenly and removes enough that its uniform twin prunes too (at least one 32-channel
    block, 0.1 of a layer, per layer): two more models to compile."""
    cheapest = float(np.nanmin(charged_degradation(table, 1.0)[:, :, table.sparsities > 0]))
    densest = budget_search.solve_plan(table, TOP, 1.0).predicted_degradation
    for delta in np.linspace(cheapest, densest, 32) * (1 + 1e-9):
        plan = budget_search.solve_plan(table, float(delta), 1.0)
        if len({g.sparsity for g in plan.groups}) > 1 and plan.flops_ratio < 0.93:
            return float(delta)
    pytest.fail("no budget of the tiny table gives an uneven plan")


@pytest.fixture(scope="module")
def more(top, inputs, argv):
    """The same OUT with a dense budget and one in the middle added, interrupted by Ctrl-C in its
    second compile and run again: (out, result, printout, plans compiled after the interruption,
    plans compiled before it, the middle budget)."""
    out, first, _, _ = top
    mid = uneven_budget(first.table)
    budgets = f"1e-9,{mid},{TOP},{2 * TOP}"
    with pytest.MonkeyPatch.context() as monkeypatch:
        cut, _, before = curve(argv, inputs, out, budgets, monkeypatch, fail_at=2)
        assert cut is None
        result, printed, plans = curve(argv, inputs, out, budgets, monkeypatch)
    return out, result, printed, plans, before, mid


def test_one_model_is_compiled_once_however_many_plans_reach_it(top):
    out, result, printed, plans = top
    assert [p["budget"] for p in result.points] == [TOP, 2 * TOP]  # sorted
    assert len(plans) == 2 and plans[0] is None  # the base, then the one plan
    first, second = result.points
    assert layer_sparsity(first) == layer_sparsity(second) == [0.2] * LAYERS  # groups may differ; the model not
    assert first["asaf"] == second["asaf"] and not first["dense"]
    # every layer at the top level is uniform sparsity: the same channels, the same model
    assert first["uniform"]["channels_removed"] == first["asaf"]["channels_removed"] > 0
    assert first["uniform"]["flops_removed"] == first["asaf"]["flops_removed"] > 0
    assert first["ratio"] == (1.0 if first["uniform"]["measured_degradation"] > 0 else None)
    assert f"δ={2 * TOP:g}: " in printed and "(measured before)" in printed


def test_an_interrupted_curve_resumes_without_compiling_again(more):
    out, result, printed, plans, before, _ = more
    assert len(before) == 1 and before[0].method != "uniform"  # the middle plan; Ctrl-C in its uniform twin
    assert len(plans) == 1 and plans[0].method == "uniform"  # only what the interruption left
    assert "reusing 2 measured model(s) and the base's perplexity" in printed  # top's and the middle plan's


def test_the_json_has_every_point_and_the_settings(more):
    out, result, printed, _, _, mid = more
    saved = json.loads((out / "curve.json").read_text())
    assert saved == json.loads(json.dumps(result.curve))
    assert saved["schema"] == "asaf_fx.curve/1" and saved["budgets"] == [1e-9, mid, TOP, 2 * TOP]
    assert [p["budget"] for p in saved["points"]] == saved["budgets"]
    assert saved["settings"]["eval_windows"] == 2 and saved["settings"]["eval_seq_len"] == 64
    assert saved["settings"]["quant"]["w_method"] == "rtn" and saved["settings"]["granularity"] == 32
    assert saved["files"] == {"curve": "curve.json", "png": "curve.png", "table": "table.safetensors"}
    assert saved["fp16_bytes"] > saved["base_bytes"] > 0 and saved["ppl_fp"] > 1 and saved["ppl_base"] > 1
    for point in saved["points"]:
        assert set(point) == {"budget", "groups", "dense", "plan_flops_ratio", "predicted_degradation", "asaf",
                              "uniform", "ratio"}
        assert point["predicted_degradation"] <= point["budget"]
        for side in ("asaf", "uniform"):
            assert point[side]["measured_degradation"] == point[side]["ppl"] / saved["ppl_base"] - 1
        theirs = point["uniform"]["measured_degradation"]
        assert point["ratio"] == (point["asaf"]["measured_degradation"] / theirs if theirs > 0 else None)
    # each distinct compiled model once, keyed by its channels; the base is not among them
    keys = [tuple(m["channels"]) for m in saved["measurements"]]
    assert len(keys) == len(set(keys)) == 3 and (0,) * LAYERS not in keys
    assert "ASAF / uniform" in printed and "dense" in printed


def test_a_dense_plan_is_the_base_and_is_not_compiled(more):
    _, result, _, _, _, _ = more
    dense = result.points[0]
    assert dense["dense"] and layer_sparsity(dense) == [0.0] * LAYERS and dense["predicted_degradation"] == 0
    assert dense["asaf"]["measured_degradation"] == 0 == dense["uniform"]["measured_degradation"]
    assert dense["asaf"]["flops_removed"] == 0 and dense["ratio"] is None
    assert dense["asaf"]["weight_bytes"] == result.curve["base_bytes"]


def test_a_point_agrees_with_a_direct_compile_of_its_plan(more, inputs):
    """The same plan and settings compiled by hand: the same FLOPs, bytes and perplexity."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asaf_fx.data import calibration_windows, token_windows
    from asaf_fx.evaluate import read_text

    _, result, _, _, before, mid = more
    point = result.points[1]
    plan = budget_search.solve_plan(result.table, mid, 1.0)
    assert 0 < point["asaf"]["flops_removed"] < result.points[2]["asaf"]["flops_removed"]  # a middle plan
    assert point["groups"] == [[g.start, g.stop, g.sparsity] for g in plan.groups] == [
        [g.start, g.stop, g.sparsity] for g in before[0].groups]
    assert point["predicted_degradation"] == plan.predicted_degradation
    assert point["plan_flops_ratio"] == plan.flops_ratio

    model = AutoModelForCausalLM.from_pretrained(inputs["model"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(inputs["model"])
    quant = asaf_fx.QuantConfig.from_dict(result.curve["quant"])  # the CLI's defaults, with --w-method rtn
    compiled = asaf_fx.compile(model, plan, quant=quant, prune=asaf_fx.PruneConfig(granularity=32, refit=False),
                               calibration=calibration_windows(tokenizer, inputs["text"],
                                                               result.table.meta["fit_windows"], 32, seed=0))
    totals = model_totals(compiled)
    eval_ids = token_windows(tokenizer, read_text(inputs["eval"]), 64, 2)
    assert point["asaf"]["ppl"] == pipeline._ppl(compiled, eval_ids)
    assert point["asaf"]["flops_removed"] == 1 - totals["flops"] / totals["dense_flops"]
    assert point["asaf"]["weight_bytes"] == totals["weight_bytes"]
    # uniform sparsity at the same FLOPs: to half a 32-channel block per layer, and another model
    block = 32 * 6 * 96 / result.table.layer_flops[0]
    assert abs(point["uniform"]["flops_removed"] - point["asaf"]["flops_removed"]) <= block / 2 + 1e-9
    assert point["uniform"]["sparsity"] == pytest.approx(point["asaf"]["flops_removed"])
    assert point["uniform"]["ppl"] != point["asaf"]["ppl"]


def test_the_plot_is_drawn(more):
    out, result, _, _, _, _ = more
    pytest.importorskip("matplotlib")
    assert result.png == out / "curve.png"
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_cli_reruns_a_finished_curve_without_compiling_and_notes_a_missing_matplotlib(more, inputs, monkeypatch,
                                                                                          capsys, argv):
    out, done, _, _, _, mid = more
    real = tradeoff.importlib.util.find_spec
    monkeypatch.setattr(tradeoff.importlib.util, "find_spec", lambda name: None if name == "matplotlib" else real(name))
    compiles = Compiles(monkeypatch)
    try:
        assert entry.main(["curve", *argv(inputs, out, "--budgets", f"{2 * TOP},{mid},{TOP},1e-9")]) == 0
        assert compiles.plans == []
        err = capsys.readouterr().err
        assert "curve.png not drawn: matplotlib is missing (pip install 'asaf-fx[plot]')" in err
        saved = json.loads((out / "curve.json").read_text())
        assert saved["points"] == done.points and saved["files"]["png"] is None
    finally:  # leave curve.json as the other tests expect it
        (out / "curve.json").write_text(json.dumps(done.curve, indent=2) + "\n", encoding="utf-8")


def test_other_settings_are_refused(more, inputs, capsys, argv):
    out = more[0]
    before = (out / "curve.json").read_text()
    assert entry.main(["curve", *argv(inputs, out, "--budgets", "1", "--eval-windows", "1")]) == 2
    assert "curve.json was measured with other settings (differs in: eval_windows)" in capsys.readouterr().err
    assert (out / "curve.json").read_text() == before


@pytest.mark.parametrize("budgets,message", [
    ("0,0.01", "positive, finite"),
    ("0.01,nan", "positive, finite"),
    ("-1", "positive, finite"),
    ("x", "must be numbers"),
    (",", "at least one budget"),
])
def test_bad_budgets_are_refused_by_the_parser(inputs, tmp_path, capsys, budgets, message, argv):
    with pytest.raises(SystemExit) as exc:
        entry.main(["curve", *argv(inputs, tmp_path / "o", "--budgets", budgets)])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_budgets_are_sorted_and_deduplicated():
    assert tradeoff.budget_list([0.02, 0.01, 0.02]) == (0.01, 0.02)
    assert curve_cli.parse_args(["--model", "m", "--out", "o"]).budgets == tradeoff.DEFAULT_BUDGETS
    with pytest.raises(ValueError, match="inf"):
        asaf_fx.tradeoff_curve("m", "o", budgets=(0.01, float("inf")))


def test_entry_point_lists_curve(capsys):
    assert entry.main([]) == 2 and "curve" in capsys.readouterr().err
