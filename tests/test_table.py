"""SensitivityTable validation and its safetensors round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from asaf_fx import SensitivityTable
from asaf_fx.synthetic import synthetic_table


def small_degradation(p: int = 3, levels: int = 2) -> np.ndarray:
    degradation = np.full((p, p, levels), np.nan)
    for i in range(p):
        for n in range(1, p - i + 1):
            degradation[i, n - 1] = 0.001 * n * np.arange(1, levels + 1)
    return degradation


def test_default_flops_is_group_flops_times_density():
    table = SensitivityTable(np.array([1.0, 2.0, 4.0]), np.array([0.1, 0.2]), small_degradation())
    assert table.flops[0, 2, 1] == pytest.approx(7.0 * 0.8)
    assert table.flops[1, 0, 0] == pytest.approx(2.0 * 0.9)
    assert np.isnan(table.flops[2, 1, 0])  # layers 2..3 do not exist
    assert table.dense_flops == 7.0


def test_round_trip_keeps_arrays_nan_holes_and_meta(tmp_path):
    table = synthetic_table(6, seed=5)
    path = tmp_path / "t.safetensors"
    table.save(path)
    loaded = SensitivityTable.load(path)
    for name in ("layer_flops", "sparsities", "degradation", "flops", "measured"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(table, name))
    assert loaded.meta == table.meta
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left nothing behind


def test_measured_mask_defaults_to_finite_entries_and_round_trips(tmp_path):
    degradation = small_degradation()
    table = SensitivityTable(np.ones(3), np.array([0.1, 0.2]), degradation)
    np.testing.assert_array_equal(table.measured, ~np.isnan(degradation))
    estimated = table.measured.copy()
    estimated[0, 2] = False  # the 3-layer group was estimated, not measured
    partial = SensitivityTable(np.ones(3), np.array([0.1, 0.2]), degradation, measured=estimated)
    partial.save(tmp_path / "t.safetensors")
    np.testing.assert_array_equal(SensitivityTable.load(tmp_path / "t.safetensors").measured, estimated)
    with pytest.raises(ValueError, match="marked measured but its degradation is NaN"):
        SensitivityTable(np.ones(3), np.array([0.1, 0.2]), degradation, measured=np.ones((3, 3, 2), bool))


def test_arrays_are_read_only():
    table = synthetic_table(3)
    with pytest.raises(ValueError):
        table.degradation[0, 0, 0] = 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"degradation": np.zeros((3, 2, 2))}, r"degradation must have shape \(p, p, S\) = \(3, 3, 2\)"),
        ({"layer_flops": np.array([1.0, -1.0, 1.0])}, "layer 1 has -1.0"),
        ({"layer_flops": np.array([1.0, np.inf, 1.0])}, "finite and positive"),
        ({"sparsities": np.array([0.2, 0.1])}, "strictly increasing"),
        ({"sparsities": np.array([0.5, 1.0])}, r"lie in \[0, 1\)"),
        ({"sparsities": np.array([-0.1, 0.1])}, r"lie in \[0, 1\)"),
        ({"flops": np.zeros((3, 3, 3))}, r"flops must have shape \(3, 3, 2\)"),
        ({"flops": -np.ones((3, 3, 2))}, r"flops\[0, 0, 0\] = -1.0"),
        ({"meta": {"bad": object()}}, "JSON-serialisable"),
        ({"layer_flops": np.zeros(0), "degradation": np.zeros((0, 0, 2))}, "layer_flops is empty"),
        ({"layer_flops": [[1.0]]}, "layer_flops must have 1 dimension"),
    ],
)
def test_bad_tables_are_refused(kwargs, message):
    arguments = {
        "layer_flops": np.ones(3),
        "sparsities": np.array([0.1, 0.2]),
        "degradation": small_degradation(),
        **kwargs,
    }
    with pytest.raises(ValueError, match=message):
        SensitivityTable(**arguments)


def test_entries_past_the_last_layer_must_be_nan():
    degradation = small_degradation()
    degradation[2, 1, 0] = 0.0  # layers 2..3 of a 3-layer model
    with pytest.raises(ValueError, match=r"degradation\[2, 1, 0\] is set but layers 2..3 run past"):
        SensitivityTable(np.ones(3), np.array([0.1, 0.2]), degradation)


def test_infinite_degradation_is_refused():
    degradation = small_degradation()
    degradation[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="use NaN"):
        SensitivityTable(np.ones(3), np.array([0.1, 0.2]), degradation)


def test_load_refuses_missing_foreign_and_wrong_schema_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        SensitivityTable.load(tmp_path / "absent.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        SensitivityTable.load(junk)
    other = tmp_path / "other.safetensors"
    save_file({"x": np.zeros(2)}, str(other), metadata={"schema": "someone.else/3"})
    with pytest.raises(ValueError, match="schema 'someone.else/3'"):
        SensitivityTable.load(other)


def test_load_refuses_a_file_missing_arrays(tmp_path):
    path = tmp_path / "partial.safetensors"
    save_file(
        {"layer_flops": np.ones(2)},
        str(path),
        metadata={"schema": "asaf_fx.sensitivity_table/1", "meta": json.dumps({})},
    )
    with pytest.raises(ValueError, match=r"lacks arrays \['degradation', 'flops', 'sparsities'\]"):
        SensitivityTable.load(path)


def _resave_with(path, change_arrays=None, change_header=None):
    """Rewrite a saved table's arrays or header in place, keeping its recorded hash: a corrupted file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        header = dict(f.metadata())
        arrays = {key: f.get_tensor(key).copy() for key in f.keys()}
    if change_arrays:
        change_arrays(arrays)
    if change_header:
        change_header(header)
    save_file(arrays, str(path), metadata=header)


def _saved_table(tmp_path):
    path = tmp_path / "t.safetensors"
    SensitivityTable(np.ones(3), np.array([0.1, 0.2]), small_degradation(), meta={"metric": "ppl"}).save(path)
    return path


def test_an_edited_value_is_refused(tmp_path):
    path = _saved_table(tmp_path)
    SensitivityTable.load(path)  # intact: loads

    def flip(arrays):
        arrays["degradation"][0, 0, 0] = -arrays["degradation"][0, 0, 0]

    _resave_with(path, change_arrays=flip)
    with pytest.raises(ValueError, match="does not match the sha256 recorded in its header"):
        SensitivityTable.load(path)


def test_edited_metadata_is_refused(tmp_path):
    path = _saved_table(tmp_path)
    _resave_with(path, change_header=lambda h: h.update(meta=json.dumps({"metric": "kl"})))
    with pytest.raises(ValueError, match="does not match the sha256"):
        SensitivityTable.load(path)


def test_a_header_without_schema_says_the_file_is_corrupt(tmp_path):
    path = _saved_table(tmp_path)
    _resave_with(path, change_header=lambda h: h.update(schemb=h.pop("schema")))  # one flipped bit in a key
    with pytest.raises(ValueError, match="has no schema field.*corrupt"):
        SensitivityTable.load(path)


def test_a_version_1_table_without_hash_still_loads(tmp_path, caplog):
    path = _saved_table(tmp_path)

    def downgrade(header):
        header["schema"] = "asaf_fx.sensitivity_table/1"
        del header["content_sha256"]

    _resave_with(path, change_header=downgrade)
    assert SensitivityTable.load(path).meta == {"metric": "ppl"}
    assert "no content hash" in caplog.text


def test_standard_errors_round_trip_and_older_tables_read_as_unknown(tmp_path):
    from asaf_fx.table import _content_sha256

    degradation = small_degradation()
    stderr = np.where(np.isnan(degradation), np.nan, 0.001)
    SensitivityTable(np.ones(3), np.array([0.1, 0.2]), degradation, stderr=stderr).save(tmp_path / "t.safetensors")
    np.testing.assert_array_equal(SensitivityTable.load(tmp_path / "t.safetensors").stderr, stderr)

    def as_version_2(arrays, header):  # what an asaf_fx without standard errors wrote
        del arrays["stderr"]
        header.update(schema="asaf_fx.sensitivity_table/2", content_sha256=_content_sha256(arrays, header["meta"]))

    path = _saved_table(tmp_path)
    holder = {}
    _resave_with(path, change_arrays=lambda a: holder.update(arrays=a),
                 change_header=lambda h: as_version_2(holder["arrays"], h))
    old = SensitivityTable.load(path)
    assert old.meta == {"metric": "ppl"} and np.isnan(old.stderr).all()
    with pytest.raises(ValueError, match="standard error is negative"):
        SensitivityTable(np.ones(3), np.array([0.1, 0.2]), degradation, stderr=-stderr)
