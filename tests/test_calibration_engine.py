"""Calibration bookkeeping: planned entries, resumable progress, estimation, distribution."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from asaf_fx.calibration.entries import distinct_variants, planned_entries
from asaf_fx.calibration.estimate import complete_stderr, complete_table, select_group_model
from asaf_fx.calibration.progress import Progress
from asaf_fx.calibration.runner import measure_entries, progress_files, remove_progress

FINGERPRINT = {"model": "tiny", "windows": 4, "seq_len": 64, "seed": 0}


def fake_value(entry):
    """Deterministic stand-in for a model evaluation: super-additive, noisy, order-independent."""
    start, length, level = entry
    rng = np.random.default_rng(hash(entry) % 2**32)
    return 1e-3 * (level + 1) * length * (1 + 0.1 * (length - 1)) * (1 + 0.3 * start / 10) + rng.normal(0, 1e-5)


def fake_measure(entry):
    """(value, standard error), as the degradation meter measures them."""
    return fake_value(entry), 1e-5 * (entry[1] + entry[2])


def test_planned_entries_per_mode():
    assert len(planned_entries(5, 3, "per-layer")) == 15
    assert len(planned_entries(5, 3, "groups", 2)) == (5 + 4) * 3
    assert len(planned_entries(5, 3, "full")) == 15 * 3
    assert planned_entries(3, 1, "groups", 9) == planned_entries(3, 1, "full")
    with pytest.raises(ValueError, match="needs --max-length"):
        planned_entries(5, 3, "groups")
    with pytest.raises(ValueError, match="unknown calibration mode 'all'"):
        planned_entries(5, 3, "all")


class Interrupt(KeyboardInterrupt):
    pass


def test_levels_that_prune_the_same_channels_are_measured_once():
    # Layer 1's levels 0 and 1 both remove 32 channels; layer 0's do not.
    removed = [[32, 64, 96], [32, 32, 64], [0, 32, 64]]
    entries = planned_entries(3, 3, "groups", 2)
    distinct, same_as = distinct_variants(entries, removed)
    assert same_as[(1, 1, 1)] == (1, 1, 0)  # the first of equal entries stands for the others
    assert same_as[(0, 2, 1)] == (0, 2, 1)  # layer 0 differs, so the group does
    assert same_as[(1, 2, 1)] == (1, 2, 1)  # layer 2 differs
    assert set(same_as) == set(entries) and set(same_as.values()) == set(distinct)
    assert len(distinct) == len(entries) - 1
    assert all(same_as[e] == e for e in distinct)


def test_interrupted_run_resumes_to_the_identical_result(tmp_path):
    entries = planned_entries(6, 3, "groups", 3)
    reference = measure_entries(entries, fake_measure, tmp_path / "a.safetensors", FINGERPRINT)

    calls = []

    def flaky(entry):
        if len(calls) == 7:
            raise Interrupt
        calls.append(entry)
        return fake_measure(entry)

    out = tmp_path / "b.safetensors"
    with pytest.raises(Interrupt):
        measure_entries(entries, flaky, out, FINGERPRINT)
    assert len(Progress(f"{out}.progress-0.json", FINGERPRINT).values) == 7  # nothing lost but the one in flight
    calls.clear()
    resumed = measure_entries(entries, lambda e: calls.append(e) or fake_measure(e), out, FINGERPRINT)
    assert resumed == reference
    assert len(calls) == len(entries) - 7  # finished ones were not measured again
    remove_progress(out)
    assert progress_files(out) == []


def test_progress_from_another_configuration_is_refused(tmp_path):
    out = tmp_path / "t.safetensors"
    measure_entries(planned_entries(2, 1, "per-layer"), fake_measure, out, FINGERPRINT)
    with pytest.raises(ValueError, match=r"another model or configuration \(differs in: seq_len\)"):
        measure_entries(planned_entries(2, 1, "per-layer"), fake_measure, out, {**FINGERPRINT, "seq_len": 128})
    Path(f"{out}.progress-0.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a calibration progress file"):
        Progress(f"{out}.progress-0.json", FINGERPRINT)


def test_progress_file_is_valid_json_after_every_record(tmp_path):
    progress = Progress(tmp_path / "p.json", FINGERPRINT)
    for i in range(3):
        progress.record((i, 1, 0), 0.1 * i, 0.01)
        body = json.loads((tmp_path / "p.json").read_text())
        assert len(body["values"]) == i + 1
    assert Progress(tmp_path / "p.json", FINGERPRINT).values[(2, 1, 0)] == (0.2, 0.01)


def test_a_value_without_standard_error_is_kept_as_unknown(tmp_path):
    # A plain value (a measure without an error, or a schema-1 progress file) reads back with NaN.
    values = measure_entries(planned_entries(2, 1, "per-layer"), fake_value, tmp_path / "t.safetensors", FINGERPRINT)
    assert all(v == fake_value(e) and np.isnan(se) for e, (v, se) in values.items())
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"schema": "asaf_fx.calibration_progress/1", "fingerprint": FINGERPRINT,
                               "values": [[0, 1, 0, 0.25]]}))
    value, stderr = Progress(old, FINGERPRINT).values[(0, 1, 0)]
    assert value == 0.25 and np.isnan(stderr)


def test_estimates_fill_long_groups_and_keep_measured_values():
    entries = planned_entries(8, 2, "groups", 3)
    values = {e: fake_value(e) for e in entries}
    degradation, measured, info = complete_table(8, 2, values)
    assert measured.sum() == len(entries)
    for (i, n, k), v in values.items():
        assert degradation[i, n - 1, k] == v
    assert info["model"] in ("interaction", "affine")  # the data is super-additive
    truth = fake_value((0, 8, 1))
    assert abs(degradation[0, 7, 1] - truth) / truth < 0.15
    assert np.isnan(degradation[5, 3, 0])  # layers 5..8 do not exist


def test_a_missing_single_layer_spoils_only_the_groups_that_contain_it():
    values = {e: fake_value(e) for e in planned_entries(5, 1, "per-layer") if e != (1, 1, 0)}
    degradation, _, _ = complete_table(5, 1, values)
    assert np.isnan(degradation[0, 1, 0]) and np.isnan(degradation[1, 0, 0])  # groups with layer 1
    assert degradation[2, 2, 0] == pytest.approx(sum(values[(i, 1, 0)] for i in (2, 3, 4)))


def test_plain_sums_when_only_single_layers_were_measured():
    values = {e: fake_value(e) for e in planned_entries(4, 1, "per-layer")}
    degradation, measured, info = complete_table(4, 1, values)
    assert info["model"] == "sum" and info["fitted_on"] == 0
    assert degradation[0, 3, 0] == pytest.approx(sum(values[(i, 1, 0)] for i in range(4)))


def test_estimated_groups_carry_the_error_of_the_singles_they_sum():
    stderrs = {(0, 1, 0): 0.003, (1, 1, 0): 0.004, (2, 1, 0): 0.012, (0, 2, 0): 0.001}  # (0, 2) measured
    stderr = complete_stderr(3, 1, stderrs)
    assert stderr[0, 1, 0] == 0.001  # measured: its own error
    assert stderr[1, 1, 0] == pytest.approx(np.hypot(0.004, 0.012))  # layers 1..2 estimated
    assert stderr[0, 2, 0] == pytest.approx(np.sqrt(0.003**2 + 0.004**2 + 0.012**2))
    assert np.isnan(stderr[2, 1, 0])  # layers 2..3 do not exist


def test_model_selection_prefers_the_sum_for_additive_data():
    rng = np.random.default_rng(0)
    total = rng.uniform(0.001, 0.01, 40)
    length = rng.integers(2, 5, 40).astype(float)
    model, errors = select_group_model(total, length, total + rng.normal(0, 1e-7, 40))
    assert model.name == "sum" or errors[model.name] <= errors["sum"]
    assert set(errors) == {"sum", "interaction", "affine"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORKER = """
import json, sys
import numpy as np
import torch.distributed as dist
from asaf_fx.calibration.entries import planned_entries
from asaf_fx.calibration.runner import measure_entries

def fake_measure(entry):
    start, length, level = entry
    rng = np.random.default_rng(hash(entry) % 2**32)
    value = 1e-3 * (level + 1) * length * (1 + 0.1 * (length - 1)) * (1 + 0.3 * start / 10) + rng.normal(0, 1e-5)
    return value, 1e-5 * (length + level)

dist.init_process_group("gloo")
values = measure_entries(planned_entries(5, 2, "groups", 2), fake_measure, sys.argv[1], json.loads(sys.argv[2]),
                         rank=dist.get_rank(), world=dist.get_world_size())
with open(f"{sys.argv[3]}.{dist.get_rank()}", "w") as f:
    json.dump([[*k, *v] for k, v in values.items()], f)
dist.destroy_process_group()
"""


def test_two_gloo_processes_give_the_single_process_result(tmp_path):
    entries = planned_entries(5, 2, "groups", 2)
    single = measure_entries(entries, fake_measure, tmp_path / "one.safetensors", FINGERPRINT)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out, result = tmp_path / "two.safetensors", tmp_path / "result"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(free_port()), str(script), str(out), json.dumps(FINGERPRINT), str(result)],
        capture_output=True, text=True, check=False, timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        gathered = {(i, n, k): (v, se) for i, n, k, v, se in json.loads(Path(f"{result}.{rank}").read_text())}
        assert gathered == single
    assert len(progress_files(out)) == 2  # each rank kept its own resumable record
