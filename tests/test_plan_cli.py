"""python -m asaf_fx plan end to end."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from asaf_fx import Plan
from asaf_fx.cli.plan import main
from asaf_fx.synthetic import synthetic_table


def test_cli_solves_a_saved_table_and_writes_the_plan(tmp_path, capsys):
    table_path = tmp_path / "table.safetensors"
    synthetic_table(8, seed=2).save(table_path)
    out = tmp_path / "plans" / "plan.json"
    assert main([str(table_path), "--max-degradation", "0.01", "--method", "two-phase", "--out", str(out)]) == 0
    plan = Plan.from_json(out.read_text(), num_layers=8)
    assert plan.method == "two-phase"
    printed = capsys.readouterr().out
    assert "FLOPs saved" in printed and "predicted degradation" in printed
    assert f"{1 - plan.flops_ratio:.2%}" in printed


def test_cli_reports_infeasible_budget_without_traceback(tmp_path, capsys):
    table_path = tmp_path / "table.safetensors"
    synthetic_table(8).save(table_path)
    assert main([str(table_path), "--max-degradation", "0.00001", "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert "smallest achievable degradation" in err and "--allow-dense" in err
    assert not (tmp_path / "p.json").exists()


def test_cli_allow_dense_keeps_the_layers_the_budget_cannot_pay_for(tmp_path):
    table_path = tmp_path / "table.safetensors"
    table = synthetic_table(8)
    table.save(table_path)
    budget = float(table.degradation[:, 0, 0].min()) * 1.5  # one single-layer prune at the lowest level fits
    out = tmp_path / "p.json"
    assert main([str(table_path), "--max-degradation", str(budget), "--out", str(out)]) == 2
    assert main([str(table_path), "--max-degradation", str(budget), "--allow-dense", "--out", str(out)]) == 0
    plan = Plan.from_json(out.read_text(), num_layers=8)
    pruned = [g for g in plan.groups if g.sparsity > 0]
    assert pruned and len(pruned) < len(plan.groups)  # some layers pruned, the rest left dense
    assert 0 < plan.predicted_degradation <= budget and plan.flops_ratio < 1


def test_cli_runs_as_a_module(tmp_path):
    table_path = tmp_path / "table.safetensors"
    synthetic_table(5).save(table_path)
    done = subprocess.run(
        [sys.executable, "-m", "asaf_fx", "plan", str(table_path), "--max-degradation", "0.02"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "ASAF plan (exact)" in done.stdout


def test_cli_charge_raw_charges_xi_as_measured_and_refuses_z(tmp_path, capsys):
    table_path = tmp_path / "table.safetensors"
    table = synthetic_table(6, seed=1)
    table.save(table_path)
    out = tmp_path / "raw.json"
    assert main([str(table_path), "--max-degradation", "0.01", "--charge", "raw", "--out", str(out)]) == 0
    plan = Plan.from_json(out.read_text(), num_layers=6)
    assert plan.stats["charge"] == "raw" and plan.stats["z"] == 0.0
    levels = [int(np.flatnonzero(np.isclose(table.sparsities, g.sparsity))[0]) for g in plan.groups]
    xi = [max(table.degradation[g.start, g.stop - g.start - 1, k], 0.0)
          for g, k in zip(plan.groups, levels, strict=True)]
    assert plan.predicted_degradation == pytest.approx(sum(xi))  # the table's ξ, no envelope, no margin
    assert main([str(table_path), "--charge", "raw", "--z", "1", "--out", str(tmp_path / "p.json")]) == 2
    assert "charge='raw' never does" in capsys.readouterr().err
