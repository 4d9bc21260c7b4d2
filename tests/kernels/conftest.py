"""Kernel tests run the Triton kernels on the CPU through Triton's interpreter when there is no GPU.

TRITON_INTERPRET must be set before the kernel modules are imported (``triton.jit`` decides between
compiled and interpreted functions when it decorates), hence at the top of this conftest.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    """Where kernel tests allocate tensors: the GPU when there is one, else the CPU (interpreter)."""
    return DEVICE


@pytest.fixture(params=["triton", "reference"])
def backend(request, monkeypatch) -> str:
    """Run a test once per ``ASAF_FX_KERNELS`` backend of the ``torch.ops.asaf_fx`` ops."""
    monkeypatch.setenv("ASAF_FX_KERNELS", request.param)
    return request.param


def _assert_float_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Elementwise |a - e| ≤ rtol · (|e| + max|e|): relative, but with a floor set by the tensor's
    magnitude so that sums which cancel to ~0 are not held to a relative bound they cannot meet."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    a, e = actual.to(torch.float64), expected.to(torch.float64)
    floor = e.abs().max() if e.numel() else 0.0
    torch.testing.assert_close(a, e, rtol=rtol, atol=float(rtol * floor) + 1e-30)


@pytest.fixture
def assert_float_close():
    """The float comparison above, as a fixture (importlib mode makes conftest unimportable)."""
    return _assert_float_close
