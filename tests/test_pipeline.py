"""asaf_fx.run and python -m asaf_fx run on a tiny saved model: the files it writes, the re-solve loop, bad input."""

import importlib.util
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

import asaf_fx
from asaf_fx import __main__ as entry
from asaf_fx import pipeline
from asaf_fx.cli import run as run_cli


@pytest.fixture(scope="module")
def inputs(h, tmp_path_factory) -> dict[str, Path]:
    return h.pipeline_inputs(tmp_path_factory.mktemp("tiny4"), 4)


@pytest.fixture(scope="module")
def argv(h):
    return h.pipeline_argv


def run(args: list[str]) -> tuple[pipeline.RunResult, str]:
    """The CLI's arguments, run through the Python API with the printout captured."""
    out, parsed = io.StringIO(), run_cli.parse_args(args)
    result = asaf_fx.run(parsed.model, parsed.out, parsed.config, Console(file=out, width=200))
    return result, out.getvalue()


@pytest.fixture(scope="module")
def generous(inputs, tmp_path_factory, argv):
    """A budget far above what pruning every layer at the top level costs: one round, a non-empty plan."""
    out = tmp_path_factory.mktemp("run") / "out"
    result, printed = run(argv(inputs, out, "--max-degradation", "10", "--fit-windows", "3"))
    return out, result, printed


def test_summary_is_complete_and_consistent(generous):
    out, result, printed = generous
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(result.summary))
    assert summary["budget"] == 10 and summary["budget_met"]
    # round 1 prunes every layer at the top level, far within the budget; a larger δ cannot do more
    assert [r.get("same_plan_as_round") for r in summary["rounds"]] == [None, 1]
    assert summary["eval_windows"] == 2 and summary["seq_len"] == 64
    assert "evaluating on 2 windows × 64 tokens" in printed and "ASAF plan" in printed
    assert summary["measured_degradation"] == summary["ppl_asaf"] / summary["ppl_base"] - 1
    assert summary["check_windows"] == 2 and "the rounds measure on 2 windows × 64 tokens" in printed
    assert summary["calibration_fit_windows"] == 3 and summary["calibration_windows"] == 4
    assert result.table.meta["fit_windows"] == 3 and "on 3 × 32 tokens" in printed
    assert summary["check_degradation"] == summary["rounds"][0]["measured_degradation"]  # chosen on check text
    assert summary["budget_met_on_check"] and summary["ppl_check_base"] > 1
    assert summary["predicted_degradation"] == result.plan.predicted_degradation
    assert 0 < summary["flops_ratio"] < 1
    assert summary["flops_ratio"] == pytest.approx(summary["plan_flops_ratio"], abs=1e-9)
    # the uniform baseline removes the same FLOPs, to one 32-channel block per layer
    block = 32 * 6 * 96 / result.table.layer_flops[0]  # one 32-channel block of a layer's FLOPs
    assert abs(summary["uniform_flops_ratio"] - summary["flops_ratio"]) <= block / 2 + 1e-9
    assert summary["table_health"] == result.table.meta["health"]
    errors = result.table.stderr[result.table.measured]
    assert summary["z"] == 1.0 and summary["table_stderr"] == {"median": float(np.median(errors)),
                                                                "max": float(errors.max())} and errors.min() > 0
    assert summary["fp16_bytes"] > summary["base_bytes"] > summary["asaf_bytes"] > 0
    assert all(np.isfinite(summary[k]) and summary[k] > 1 for k in ("ppl_fp", "ppl_base", "ppl_asaf", "ppl_uniform"))


def test_files_load_back(generous, inputs):
    out, result, _ = generous
    plan = asaf_fx.Plan.from_json((out / "plan.json").read_text(), num_layers=4)
    assert plan.groups == result.plan.groups and plan.groups
    table = asaf_fx.SensitivityTable.load(out / "table.safetensors")
    assert table.num_layers == 4 and table.meta["fingerprint"]["quant"]["w_method"] == "rtn"
    loaded = asaf_fx.load(out / "model")
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, result.model(ids).logits)
    assert (out / "model" / "tokenizer_config.json").is_file()


def test_the_python_api_example_rebuilds_the_pipelines_model(generous, inputs, tmp_path):
    """examples/end_to_end.py, given the pipeline's table and budget, builds the same model."""
    out, result, _ = generous
    path = Path(__file__).resolve().parents[1] / "examples" / "end_to_end.py"
    spec = importlib.util.spec_from_file_location("end_to_end_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    got = example.main(["--model", str(inputs["model"]), "--table", str(out / "table.safetensors"),
                        "--max-degradation", "10", "--eval-text", str(inputs["eval"]), "--eval-windows", "2",
                        "--seq-len", "64", "--out", str(tmp_path / "model")])
    assert got["identical"] == 1.0
    assert got["flops_ratio"] == result.plan.flops_ratio
    assert got["perplexity"] == result.summary["ppl_asaf"]
    assert asaf_fx.load(tmp_path / "model").plan.groups == result.plan.groups


def test_the_python_api_runs_without_the_cli(inputs, tmp_path):
    config = asaf_fx.RunConfig(
        max_degradation=10, rounds=1, text=inputs["text"], eval_text=inputs["eval"], eval_windows=2, seq_len=64,
        quant=asaf_fx.QuantConfig(w_bits=4, a_bits=4, kv_bits=4, w_method="rtn", a_clip=0.9),
        calibration=asaf_fx.CalibrationConfig(windows=4, seq_len=32, sparsities=(0.1, 0.2)))
    result = asaf_fx.run(inputs["model"], tmp_path / "out", config, Console(file=io.StringIO()))
    assert result.summary["quant"] == config.quant.to_dict() and result.summary["calibration_windows"] == 4
    assert result.table.meta["quant"] == config.quant.to_dict()  # the table is measured on the compiled model
    assert asaf_fx.load(tmp_path / "out" / "model").plan.groups == result.plan.groups


@pytest.mark.parametrize("flag,value,expect", [
    ("--overrides", json.dumps({"*.down_proj.weight": {"a_bits": 8}}), {"*.down_proj.weight": {"a_bits": 8}}),
    ("--a-clip", "mse", "mse"),
    ("--a-clip", "0.8", 0.8),
])
def test_quantization_options_reach_the_run_config(inputs, tmp_path, flag, value, expect, argv):
    config = run_cli.parse_args(argv(inputs, tmp_path / "out", flag, value)).config
    assert (config.quant.overrides if flag == "--overrides" else config.quant.a_clip) == expect


@pytest.mark.parametrize("kwargs,message", [
    ({"max_degradation": 0.0}, "positive"),
    ({"calibration": asaf_fx.CalibrationConfig(metric="kl")}, "metric 'ppl'"),
    ({"quant": asaf_fx.QuantConfig(seed=1)}, "one seed"),
])
def test_run_config_refuses_what_the_run_cannot_do(kwargs, message):
    with pytest.raises(ValueError, match=message):
        asaf_fx.RunConfig(**kwargs)


def rerun_with(first: Path, tmp_path: Path, monkeypatch, factor: float):
    """OUT with the first run's table, and ``_ppl`` that makes every pruned ASAF model ``factor``×
    worse; returns OUT and the (plan, windows) of each perplexity measured, and the δ solved at."""
    from asaf_fx import budget_search

    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(first / "table.safetensors", out / "table.safetensors")  # settings match: reused
    real_solve, real_ppl, calls, asked = budget_search.solve, pipeline._ppl, [], []

    def solve(table, delta, **kwargs):
        asked.append(delta)
        return real_solve(table, delta, **kwargs)

    def ppl(model, windows):
        plan = getattr(model, "plan", None)
        calls.append((plan, windows))
        pruned = plan is not None and plan.method != "uniform" and plan.flops_ratio < 1
        return real_ppl(model, windows) * (factor if pruned else 1.0)

    monkeypatch.setattr(budget_search, "solve", solve)
    monkeypatch.setattr(pipeline, "_ppl", ppl)
    return out, calls, asked


def test_rounds_choose_on_check_windows_and_only_the_kept_plan_meets_the_evaluation_text(generous, tmp_path,
                                                                                         monkeypatch, inputs, argv):
    out, calls, _ = rerun_with(generous[0], tmp_path, monkeypatch, 1.0)
    real_prepare, prepared = pipeline.prepare, []
    monkeypatch.setattr(pipeline, "prepare", lambda *a, **k: prepared.append(real_prepare(*a, **k)) or prepared[-1])
    result, _ = run(argv(inputs, out, "--max-degradation", "10", "--fit-windows", "3"))
    eval_ids, check_ids = prepared[0].eval_ids, prepared[0].check_ids
    assert not {tuple(w) for w in check_ids.tolist()} & {tuple(w) for w in eval_ids.tolist()}
    measured_on = {"eval": [], "check": []}
    for plan, windows in calls:
        if plan is not None and plan.method == "exact":
            assert torch.equal(windows, eval_ids) or torch.equal(windows, check_ids)
            measured_on["eval" if torch.equal(windows, eval_ids) else "check"].append(plan.groups)
    assert measured_on == {"check": [result.plan.groups], "eval": [result.plan.groups]}


def test_overshooting_plans_are_tightened_and_when_none_fits_the_model_stays_dense(generous, inputs, tmp_path,
                                                                                    monkeypatch, argv):
    """Every pruned model measures 1.5× its perplexity: each round overshoots; δ shrinks as documented."""
    out, calls, asked = rerun_with(generous[0], tmp_path, monkeypatch, 1.5)
    result, printed = run(argv(inputs, out, "--max-degradation", "0.01", "--rounds", "2", "--fit-windows", "3"))
    summary, rounds = result.summary, result.summary["rounds"]
    assert "reusing the finished table" in printed
    assert len(rounds) == 2 and asked[0] == 0.01  # bounded by --rounds
    assert rounds[0]["measured_degradation"] > 0.01
    assert asked[1] == pytest.approx(0.01 * 0.01 / rounds[0]["measured_degradation"] * 0.9)
    # solved at the tightened δ or, where that prunes nothing, at the cheapest choice's cost
    assert rounds[1]["max_degradation"] == asked[-1] and rounds[1]["flops_ratio"] < 1
    assert "the model stays dense" in printed and result.plan.layer_sparsity == (0.0,) * 4
    assert summary["flops_ratio"] == 1.0 and summary["check_degradation"] == 0.0
    assert summary["ppl_asaf"] == summary["ppl_base"] and summary["budget_met"]
    assert json.loads((out / "plan.json").read_text())["method"] == "dense"


def test_the_summary_says_when_uniform_sparsity_rounds_to_no_channels(generous):
    _, result, _ = generous
    printed = []
    for uniform_ratio in (result.summary["flops_ratio"], 1.0):
        out = io.StringIO()
        pipeline.render({**result.summary, "uniform_flops_ratio": uniform_ratio}, Console(file=out, width=200))
        printed.append(out.getvalue())
    assert "removes no channel" not in printed[0]
    assert f"rounds to zero blocks of {result.summary['granularity']}" in printed[1]


def test_bad_inputs_name_the_problem(generous, inputs, tmp_path, capsys, argv):
    first, _, _ = generous
    clash = tmp_path / "clash"
    clash.mkdir()
    shutil.copy(first / "table.safetensors", clash / "table.safetensors")
    cases = [
        (argv({**inputs, "model": "no-such-model"}, tmp_path / "a"), "neither a known model"),
        (argv({**inputs, "text": tmp_path / "missing.txt"}, tmp_path / "b"), "does not exist"),
        (argv({**inputs, "eval": tmp_path / "missing.txt"}, tmp_path / "c"), "does not exist"),
        (argv(inputs, tmp_path / "d", "--eval-windows", "400"), "fewer evaluation windows"),
        (argv(inputs, tmp_path / "d2", "--eval-windows", "0", "--seq-len", "100000"), "shorter than one window"),
        (argv({**inputs, "eval": inputs["text"]}, tmp_path / "e"), "both the calibration and the evaluation"),
        (argv(inputs, clash, "--seed", "1"), "other settings"),
        (argv(inputs, tmp_path / "f", "--a-bits", "4", "--a8-layers", "5"), "only 4 decoder layers"),
        (argv(inputs, tmp_path / "g", "--a8-layers", "2", "--a-bits", "8"), "nothing to raise to 8 bits"),
    ]
    for args, message in cases:
        assert entry.main(["run", *args]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--max-degradation", "0"], "positive"),
    (["--mode", "groups"], "--max-length"),
    (["--w-bits", "3"], "bits"),
])
def test_bad_arguments_are_refused_by_the_parser(inputs, tmp_path, capsys, args, message, argv):
    with pytest.raises(SystemExit) as exc:
        entry.main(["run", *argv(inputs, tmp_path / "o", *args)])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_entry_point_lists_commands(capsys):
    assert entry.main(["nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err
    assert entry.main([]) == 2 and "run" in capsys.readouterr().err


def test_without_text_arguments_it_measures_the_embedded_wikitext2(inputs, tmp_path, monkeypatch, argv):
    monkeypatch.delenv("ASAF_FX_DATA", raising=False)
    out = tmp_path / "out"
    args = argv(inputs, out, "--max-degradation", "10", "--rounds", "1")
    for flag in ("--text", "--eval-text"):  # drop the flag and its value: the defaults are what is tested
        at = args.index(flag)
        del args[at:at + 2]
    result, printed = run(args)
    package = Path(asaf_fx.__file__).parent / "text"
    assert result.summary["calibration_text"] == str(package / "wikitext-2" / "wiki.valid.tokens.gz")
    assert result.summary["eval_text"] == str(package / "wikitext-2-raw" / "wiki.test.raw.gz")
    assert np.isfinite(result.summary["ppl_asaf"])


def test_a_data_folder_without_the_default_text_is_named(inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("ASAF_FX_DATA", str(tmp_path / "no-data"))
    with pytest.raises(FileNotFoundError, match="no-data.*ASAF_FX_DATA"):
        pipeline.texts(asaf_fx.RunConfig(text=inputs["text"]))


def test_eval_windows_zero_evaluates_every_whole_window(inputs, tmp_path, argv):
    from transformers import AutoTokenizer

    from asaf_fx.evaluate import read_text

    tokens = len(AutoTokenizer.from_pretrained(inputs["model"])(read_text(inputs["eval"]))["input_ids"])
    result, printed = run(
        argv(inputs, tmp_path / "out", "--eval-windows", "0", "--max-degradation", "10", "--rounds", "1")
    )
    assert result.summary["eval_windows"] == tokens // 64 > 2
    assert f"evaluating on {tokens // 64} windows" in printed and "every whole window" in printed


def test_a8_layers_raise_the_most_helped_layers_everywhere_and_gains_are_reused(inputs, tmp_path, argv):
    out = tmp_path / "out"
    flags = ("--max-degradation", "10", "--a-bits", "4", "--a-clip", "0.9", "--a8-layers", "2")
    result, printed = run(argv(inputs, out, *flags))
    summary = result.summary
    saved = json.loads((out / "activation_gains.json").read_text())
    assert summary["activation_bits"]["gains"] == saved["gains"] and len(saved["gains"]) == 4
    helping = sorted(range(4), key=lambda i: saved["gains"][i])[:2]
    chosen = summary["activation_bits"]["layers"]
    assert chosen == sorted(i for i in helping if saved["gains"][i] < 0)
    assert chosen  # this seed's model has layers that gain from 8 bits (and layers that lose)
    raised = {name for i in chosen for name in saved["linears"][i]}
    loaded = asaf_fx.load(out / "model")
    for names in saved["linears"]:
        for name in names:
            assert loaded.quant.for_linear(name).a_bits == (8 if name in raised else 4)
    assert asaf_fx.SensitivityTable.load(out / "table.safetensors").meta["quant"] == summary["quant"]
    assert f"8-bit inputs in {len(chosen)} of 4 layers" in printed
    again, printed = run(argv(inputs, out, *flags))
    assert "reusing the measured activation gains" in printed and "reusing the finished table" in printed
    assert again.summary["activation_bits"] == summary["activation_bits"]
    assert again.summary["ppl_base"] == summary["ppl_base"]


def test_an_interrupted_gain_measurement_resumes_to_the_same_gains(inputs, tmp_path, monkeypatch, argv):
    real, measured = pipeline.measure_activation_gains, []

    def interrupted_after(count):
        def measure(*args, on_layer, **kwargs):
            def on(layer, value):
                on_layer(layer, value)
                measured.append(layer)
                if len(measured) == count:
                    raise KeyboardInterrupt
            return real(*args, on_layer=on, **kwargs)
        return measure

    flags = ("--max-degradation", "10", "--a-bits", "4", "--a-clip", "0.9", "--a8-layers", "2")
    reference, _ = run(argv(inputs, tmp_path / "whole", *flags))
    measured.clear()
    monkeypatch.setattr(pipeline, "measure_activation_gains", interrupted_after(3))
    with pytest.raises(KeyboardInterrupt):
        run(argv(inputs, tmp_path / "cut", *flags))
    assert not (tmp_path / "cut" / "activation_gains.json").exists()
    measured.clear()
    monkeypatch.setattr(pipeline, "measure_activation_gains", interrupted_after(99))
    resumed, _ = run(argv(inputs, tmp_path / "cut", *flags))
    assert measured == [3]  # layers 0-2 came from the progress file
    assert resumed.summary["activation_bits"] == reference.summary["activation_bits"]
    assert not list((tmp_path / "cut").glob("*.progress.json"))
