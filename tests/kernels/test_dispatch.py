"""Backend choice of the asaf_fx ops, and the benchmark script's no-GPU path."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

from asaf_fx.triton_kernels import ops


def test_auto_uses_reference_on_cpu_and_env_overrides(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.setenv("ASAF_FX_KERNELS", "auto")
    assert ops.kernel_backend(x) == "reference"
    monkeypatch.setenv("ASAF_FX_KERNELS", "reference")
    assert ops.kernel_backend(x) == "reference"
    monkeypatch.setenv("ASAF_FX_KERNELS", "fast")
    with pytest.raises(ValueError, match="triton, reference"):
        ops.kernel_backend(x)


def test_triton_on_cpu_without_interpreter_is_explained(monkeypatch):
    monkeypatch.setenv("ASAF_FX_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.kernel_backend(torch.zeros(1))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_benchmark_measures_nothing_without_gpu(capsys):
    path = pathlib.Path(__file__).parents[2] / "benchmarks" / "gemm_table.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([]) == 0
    assert "measured nothing" in capsys.readouterr().out
