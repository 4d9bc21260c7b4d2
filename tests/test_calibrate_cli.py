"""asaf_fx.calibrate and python -m asaf_fx calibrate on a tiny saved model: the table, resume, bad input."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import asaf_fx
from asaf_fx.calibration import calibrate as engine
from asaf_fx.calibration.measure import DegradationMeter
from asaf_fx.calibration.runner import progress_files
from asaf_fx.cli import calibrate
from asaf_fx.data import calibration_windows
from asaf_fx.passes.prune.channel_selection import RIDGE
from asaf_fx.pipeline import default_quant
from asaf_fx.solvers.problem import charged_degradation

WORDS = ("the model reads a long text about rivers , hills and old towns ; each line adds a few more "
         "words so that the byte level windows have something to predict .").split()


@pytest.fixture(scope="module")
def model_dir(h, tmp_path_factory) -> Path:
    """A 4-layer tiny Llama with a byte tokenizer, saved as a transformers directory."""
    folder = tmp_path_factory.mktemp("tiny4")
    h.make_tiny("llama", seed=5, num_hidden_layers=4).save_pretrained(folder)
    h.byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    rng = np.random.default_rng(0)
    path.write_text("\n".join(" ".join(rng.choice(WORDS, 12)) for _ in range(60)) + "\n", encoding="utf-8")
    return path


def argv(model_dir, text_file, out, *extra):
    return ["--model", str(model_dir), "--text", str(text_file), "--windows", "4", "--seq-len", "32",
            "--sparsities", "0.1,0.2", "--w-method", "rtn", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def groups_table(model_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "table.safetensors"
    assert (
        calibrate.main(argv(model_dir, text_file, out, "--mode", "groups", "--max-length", "2", "--a-clip", "mse")) == 0
    )
    return out


def test_the_table_loads_solves_and_records_what_was_measured(groups_table):
    table = asaf_fx.SensitivityTable.load(groups_table)
    assert table.num_layers == 4 and list(table.sparsities) == [0.1, 0.2]
    assert table.meta["metric"] == "ppl" and table.meta["mode"] == "groups"
    assert table.meta["quant"]["a_clip"] == "mse"  # the setting asked for: a rerun searches the same way
    assert table.meta["refit_ridge"] == RIDGE  # pruned layers were measured with compile's default refit
    # groups of length 1 and 2 measured (4 + 3 starts × 2 levels), longer ones estimated
    assert table.measured[:, :2].sum() == 14 and not table.measured[:, 2:].any()
    assert np.isfinite(table.degradation[0, 3]).all()  # the whole-model group got an estimate
    assert not progress_files(groups_table)  # finished: progress files are gone
    # H from the real channel counts: 32 and 64 of 160 channels, 6·96 FLOPs each
    assert table.flops[1, 0].tolist() == [table.layer_flops[1] - 32 * 576, table.layer_flops[1] - 64 * 576]
    assert table.meta["layer_forwards"] > 0
    errors = table.stderr[table.measured]
    assert np.isfinite(errors).all() and (errors > 0).all()  # every measured ξ has its paired error
    assert np.isfinite(table.stderr[0, 3]).all()  # and an estimate gets the error of the singles it sums
    charged = charged_degradation(table)  # ξ's running maximum plus one standard error: what solve spends
    plan = asaf_fx.solve(table, max_degradation=float(np.nanmax(charged)) * 4, min_sparsity=0.1, max_sparsity=0.2)
    assert plan.num_layers == 4 and plan.flops < plan.dense_flops


def test_interrupt_and_resume_give_the_identical_table(groups_table, model_dir, text_file, tmp_path, monkeypatch,
                                                      capsys):
    out = tmp_path / "table.safetensors"
    real = DegradationMeter.measure
    calls = {"n": 0}

    def interrupting(self, assignment):
        calls["n"] += 1
        if calls["n"] == 5:  # the 5th measurement of the table
            raise KeyboardInterrupt
        return real(self, assignment)

    monkeypatch.setattr(DegradationMeter, "measure", interrupting)
    assert (
        calibrate.main(argv(model_dir, text_file, out, "--mode", "groups", "--max-length", "2", "--a-clip", "mse"))
        == 130
    )
    assert not out.exists() and progress_files(out)
    monkeypatch.setattr(DegradationMeter, "measure", real)
    # progress made with other settings is refused, not mixed in, and before the base model is built
    monkeypatch.setattr(engine, "build_calibration_model", lambda *a, **k: pytest.fail("built before the check"))
    assert calibrate.main(argv(model_dir, text_file, out, "--mode", "groups", "--max-length", "2", "--a-clip", "mse",
                          "--seed", "1")) == 2
    assert "holds progress for another model or configuration" in capsys.readouterr().err
    # and so is progress made with a fixed clip ratio instead of the search
    assert (
        calibrate.main(argv(model_dir, text_file, out, "--mode", "groups", "--max-length", "2", "--a-clip", "0.9")) == 2
    )
    # and so is progress measured without the down_proj refit
    assert calibrate.main(argv(model_dir, text_file, out, "--mode", "groups", "--max-length", "2", "--a-clip", "mse",
                               "--no-refit")) == 2
    monkeypatch.undo()
    assert (
        calibrate.main(argv(model_dir, text_file, out, "--mode", "groups", "--max-length", "2", "--a-clip", "mse")) == 0
    )
    err = " ".join(capsys.readouterr().err.split())  # rich wraps lines at the terminal width
    assert "resuming: 4 values measured earlier" in err
    assert "standard errors of the 14 measured entries" in err and "exceed δ/4 = 0.0025 (δ = 0.01)" in err
    resumed, whole = asaf_fx.SensitivityTable.load(out), asaf_fx.SensitivityTable.load(groups_table)
    for name in ("degradation", "stderr", "flops", "measured", "layer_flops"):
        assert np.array_equal(getattr(resumed, name), getattr(whole, name), equal_nan=True), name


def test_validation_and_plot(model_dir, text_file, tmp_path):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "t.safetensors", tmp_path / "heat.png"
    assert calibrate.main(argv(model_dir, text_file, out, "--metric", "kl", "--validate", "3", "--plot", str(png))) == 0
    validation = asaf_fx.SensitivityTable.load(out).meta["validation"]
    assert validation["plans"] == 3 and len(validation["measured"]) == 3
    assert all(m > 0 for m in validation["measured"])  # KL of a pruned model is positive
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("extra,message", [
    (["--sparsities", "0.1,1.5"], "must lie in (0, 1)"),
    (["--sparsities", "0.2,0.1"], "strictly increasing"),
    (["--mode", "groups"], "--max-length"),
    (["--w-bits", "3"], "bits"),
    (["--a-clip", "auto"], "--a-clip must be a number in (0, 1] or 'mse'"),
    (["--overrides", "{down: 8}"], "not valid JSON"),
    (["--overrides", "[1]"], "JSON object"),
    (["--overrides", '{"*.down_proj.weight": {"a_bits": 5}}'], "bits"),
])
def test_bad_arguments_are_refused_by_the_parser(model_dir, text_file, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        calibrate.main(argv(model_dir, text_file, tmp_path / "t.safetensors", *extra))
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_bad_inputs_name_the_problem(model_dir, text_file, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        (argv(model_dir, tmp_path / "missing.txt", tmp_path / "a"), "does not exist"),
        (argv(model_dir, empty, tmp_path / "b"), "is empty"),
        (argv(model_dir, text_file, tmp_path / "c", "--windows", "400"), "only"),
        (argv("no-such-model", text_file, tmp_path / "d"), "neither a known model"),
    ]
    for args, message in cases:
        assert calibrate.main(args) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("fit_windows", [4, 7])
def test_xi_is_measured_on_windows_the_model_was_not_fitted_on(model_dir, text_file, tmp_path, monkeypatch, capsys,
                                                              fit_windows):
    seen = {}
    real_build, real_meter = engine.build_calibration_model, engine.DegradationMeter

    def build(model, quant, calibration, *args, **kwargs):
        seen["fit"] = calibration
        return real_build(model, quant, calibration, *args, **kwargs)

    def meter(cal, batches, metric):
        seen["measured"] = torch.cat(batches)
        return real_meter(cal, batches, metric)

    monkeypatch.setattr(engine, "build_calibration_model", build)
    monkeypatch.setattr(engine, "DegradationMeter", meter)
    out = tmp_path / "t.safetensors"
    args = argv(model_dir, text_file, out, "--sparsities", "0.1", "--fit-windows", str(fit_windows))
    assert calibrate.main(args) == 0
    fit = {tuple(row.tolist()) for row in seen["fit"]}
    measured = {tuple(row.tolist()) for row in seen["measured"]}
    assert len(fit) == fit_windows and len(measured) == 4 and not fit & measured
    # the windows a plan is compiled with (the pipeline's) are the ones the table's variants were fitted on
    compiled = calibration_windows(asaf_fx.load_model(str(model_dir))[1], text_file, fit_windows, 32, seed=0)
    assert torch.equal(seen["fit"], compiled)
    meta = asaf_fx.SensitivityTable.load(out).meta
    assert meta["fit_windows"] == fit_windows and meta["windows"] == 4
    # equal counts leave the fingerprint as it was before they were separate, so that progress is read
    assert ("fit_windows" in meta["fingerprint"]) == (fit_windows != 4)
    err = " ".join(capsys.readouterr().err.split())
    assert "of single-layer ξ are negative" in err and "nan" not in err  # one level: no steps to judge


def test_health_flags_a_noise_dominated_grid(groups_table):
    clean = np.array([[0.001, 0.004, 0.01], [-0.001, 0.002, 0.003]])  # one small negative value: noise
    report = engine.health(clean)
    assert report["negative_fraction"] == pytest.approx(1 / 6) and report["falling_step_fraction"] == 0.0
    assert report["negative_mass"] == pytest.approx(0.001 / 0.02) and not report["noisy"]
    noisy = np.array([[-0.02, 0.03, -0.01], [0.01, -0.04, 0.02]])  # what SmolLM2 W4A4KV4 looked like
    report = engine.health(noisy)
    assert report["negative_fraction"] == 0.5 and report["falling_step_fraction"] == 0.5
    assert report["negative_mass"] == pytest.approx(0.07 / 0.06) and report["noisy"]
    offset = np.array([[0.04, 0.02, 0.05], [0.03, 0.05, 0.02]])  # all positive, but no trend: noise
    assert engine.health(offset)["negative_mass"] == 0.0 and engine.health(offset)["noisy"]
    table = asaf_fx.SensitivityTable.load(groups_table)
    assert table.meta["health"] == engine.health(table.degradation[:, 0, :])


def test_the_python_api_measures_what_the_cli_measures(model_dir, text_file, groups_table):
    model, tokenizer = asaf_fx.load_model(str(model_dir))
    config = asaf_fx.CalibrationConfig(mode="groups", max_length=2, sparsities=(0.1, 0.2), windows=4, seq_len=32)
    # the CLI's default quantization with the fixture's --w-method rtn --a-clip mse
    quant = dataclasses.replace(default_quant(), w_method="rtn", a_clip="mse")
    table = asaf_fx.calibrate(model, quant, text_file, tokenizer=tokenizer, config=config, model_name=str(model_dir))
    cli = asaf_fx.SensitivityTable.load(groups_table)
    assert np.array_equal(table.degradation, cli.degradation, equal_nan=True)
    assert np.array_equal(table.stderr, cli.stderr, equal_nan=True)
    assert table.meta["fingerprint"] == cli.meta["fingerprint"]


@pytest.mark.parametrize("kwargs,message", [
    ({"mode": "groups"}, "max_length"),
    ({"max_length": 2}, "applies to mode 'groups' only"),
    ({"sparsities": (0.2, 0.1)}, "strictly increasing"),
    ({"metric": "mse"}, "metric"),
    ({"windows": 0}, "windows must be at least 1"),
    ({"fit_windows": 0}, "fit_windows must be at least 1"),
    ({"refit": 1}, "refit must be True or False"),
])
def test_calibration_config_names_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        asaf_fx.CalibrationConfig(**kwargs)


def test_the_dotted_command_still_runs_and_the_package_keeps_its_function():
    done = subprocess.run([sys.executable, "-m", "asaf_fx.calibrate", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "python -m asaf_fx calibrate" in done.stdout
    assert callable(asaf_fx.calibrate) and asaf_fx.calibrate is engine.calibrate
