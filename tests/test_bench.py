"""asaf_fx.benchmark and python -m asaf_fx bench: every variant on the tiny preset, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asaf_fx.benchmark import CPU_LABEL, BenchConfig, benchmark
from asaf_fx.cli.bench import main
from asaf_fx.plan import uniform_plan

# One decoder layer keeps the two compiles (export + passes) of this run to a few seconds each.
TINY_RUN = ["--preset", "tiny", "--layers", "1", "--seq", "16", "--batch", "1", "--decode-tokens", "2",
            "--decode-batch", "1", "2",
            "--warmup", "0", "--repeats", "1", "--sparsity", "0.5"]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    assert main([*TINY_RUN, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_report_labels_the_cpu_reference_path(report):
    assert report["schema"] == "asaf_fx.bench/2"
    assert report["device"] == "cpu" and report["kernels"] == "reference" and report["label"] == CPU_LABEL
    assert report["versions"]["torch"] and report["versions"]["transformers"]
    assert report["command"].startswith("python -m asaf_fx bench --preset tiny")
    assert report["layers_run"] == 1 and report["shape"]["layers"] == 2
    assert any("1 of 2 decoder layers" in note and "not extrapolated" in note for note in report["notes"])


def test_every_variant_has_plausible_figures(report):
    assert list(report["variants"]) == ["fp16-eager", "fp16-compiled", "w4a4kv4", "w4a8kv4", "asaf"]
    for name, result in report["variants"].items():
        (cell,) = result["prefill"]
        assert (cell["seq"], cell["batch"]) == (16, 1), name
        assert cell["latency_ms"] > 0 and cell["tokens_per_s"] == pytest.approx(16 / (cell["latency_ms"] / 1e3)), name
        assert cell["peak_memory_bytes"] > 0, name
        assert 0 < cell["host_ms"] <= cell["latency_ms"], name  # the call returns before the device is done
        assert [d["batch"] for d in result["decode"]] == [1, 2], name
        for cell in result["decode"]:
            assert cell["tokens"] == 2 and cell["tokens_per_s"] == pytest.approx(cell["batch"] * 2 / cell["seconds"]), (
                name
            )
        assert result["weight_bytes"] > 0 and result["flops"] > 0, name
    fp, fpc, int4, a8, asaf = (
        report["variants"][k] for k in ("fp16-eager", "fp16-compiled", "w4a4kv4", "w4a8kv4", "asaf")
    )
    assert fp["compile_s"] is None and int4["compile_s"] > 0 and asaf["compile_s"] > 0
    assert fpc["weight_bytes"] == fp["weight_bytes"] and fpc["flops"] == fp["flops"]  # compiled, not compressed
    assert a8["weight_bytes"] == int4["weight_bytes"] and a8["quant"]["a_bits"] == 8 and int4["quant"]["a_bits"] == 4
    # Packed INT4 codes plus scales against float32 weights: a little over 1/8 of the bytes.
    assert int4["weight_bytes"] < fp["weight_bytes"] / 6
    assert int4["flops"] == fp["flops"]
    # Sparsity is a share of the layer's linear FLOPs: half of 73 728 is 96 of the 128 MLP channels
    # (3 blocks of 32), each 2 · 3 · 64 FLOPs — exactly half.
    assert int4["flops"] == 73728 and asaf["flops"] == int4["flops"] - 96 * 2 * 3 * 64 == 36864
    assert asaf["weight_bytes"] < int4["weight_bytes"]
    assert asaf["plan"]["layer_sparsity"] == [0.5]


def _error(capsys, argv: list[str]) -> str:
    """The message of a refused command line (argparse exits 2; main returns 2)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    return capsys.readouterr().err


def test_unknown_preset_is_refused(capsys):
    err = _error(capsys, ["--preset", "llama9-1t"])
    assert "invalid choice: 'llama9-1t'" in err and "llama2-7b" in err


@pytest.mark.parametrize("seq, why", [("0", "0 is below 1"), ("long", "'long' is not an integer")])
def test_bad_sequence_length_is_refused(capsys, seq, why):
    assert why in _error(capsys, ["--preset", "tiny", "--seq", seq])


def test_too_many_layers_is_refused(capsys):
    assert "tiny has only 2 decoder layers" in _error(capsys, ["--preset", "tiny", "--layers", "3"])


def test_plan_for_another_layer_count_is_refused(capsys, tmp_path: Path):
    plan = tmp_path / "plan.json"
    plan.write_text(uniform_plan(32, 0.1).to_json())
    err = _error(capsys, [*TINY_RUN[:-2], "--plan", str(plan)])  # without TINY_RUN's --sparsity
    assert "covers 32 decoder layers but the benchmark runs 1 of tiny's 2" in err and "solved for 1 layers" in err


def test_plan_and_sparsity_are_exclusive(capsys):
    assert "not allowed with argument" in _error(capsys, ["--preset", "tiny", "--plan", "p.json", "--sparsity", "0.2"])


def test_cache_too_short_for_decode_is_refused(capsys):
    err = _error(capsys, ["--preset", "tiny", "--decode-tokens", "8", "--cache-len", "4"])
    assert "cache length 4 holds fewer positions" in err and "raise it" in err


def test_the_python_api_measures_without_the_cli():
    config = BenchConfig(preset="tiny", layers=1, seq=(8,), batch=(1,), decode_tokens=0, variants=("fp16-eager",),
                         warmup=0, repeats=1)
    report = benchmark(config)
    (cell,) = report["variants"]["fp16-eager"]["prefill"]
    assert cell["seq"] == 8 and cell["latency_ms"] > 0 and report["command"] == "asaf_fx.benchmark"
    with pytest.raises(ValueError, match="unknown variants"):
        benchmark(BenchConfig(preset="tiny", variants=("int3",)))


def test_a_table_given_as_plan_is_named(capsys, tmp_path: Path):
    table = tmp_path / "table.safetensors"
    table.write_bytes(b"\x80\x00\xff binary, as a safetensors header is")
    err = _error(capsys, [*TINY_RUN[:-2], "--plan", str(table)])
    assert "is not a plan JSON file" in err and "python -m asaf_fx plan TABLE --out plan.json" in err.replace("\n", " ")
