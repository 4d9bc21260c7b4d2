"""Online Hadamard rotation and fused rotation + quantization: Triton against the torch reference."""

from __future__ import annotations

import pytest
import torch

import asaf_fx.triton_kernels.ops  # noqa: F401
from asaf_fx.triton_kernels import hadamard

pytestmark = pytest.mark.interpreter

# n = 2^k · m: pure powers of two, odd widths (2^0), Kronecker cases like pruned MLP widths, and
# 16 · 43 = 688, whose dense factor runs as a tensor-core dot (Llama-2's 11008 = 256 · 43).
WIDTHS = [1, 7, 16, 64, 24, 28, 96, 688]


def _right(m: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(m)
    return torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))[0].to(device)


@pytest.mark.parametrize("n", WIDTHS)
def test_rotation_matches_reference(device, n, assert_float_close):
    right = _right(hadamard.split_width(n)[1], device)
    x = torch.randn(3, n, device=device)
    x[1] = 0.0
    ref = hadamard.hadamard_rotate_torch(x, right)
    out = hadamard.hadamard_rotate_triton(x, right)
    if n & (n - 1) == 0:
        assert torch.equal(out, ref)  # same butterfly, same order: bit-identical
    else:
        assert_float_close(out, ref, rtol=1e-6)
    # The transform is orthogonal: it preserves every row's norm.
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
def test_rotation_half_precision_keeps_dtype(device, dtype, rtol, assert_float_close):
    right = _right(3, device)
    x = torch.randn(2, 5, 48, device=device).to(dtype)
    out = hadamard.hadamard_rotate_triton(x, right)
    assert out.dtype == dtype and out.shape == x.shape
    assert_float_close(out, hadamard.hadamard_rotate_torch(x, right), rtol=rtol)


def test_rotation_equals_dense_matrix(device):
    right = _right(3, device)
    x = torch.randn(4, 24, device=device, dtype=torch.float64)
    dense = x @ hadamard.rotation_matrix(24, right).to(device)
    torch.testing.assert_close(hadamard.hadamard_rotate_triton(x.float(), right).double(), dense,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("bits", [4, 8])
def test_rotate_quantize_matches_reference(device, n, bits, assert_float_close):
    right = _right(hadamard.split_width(n)[1], device)
    x = torch.randn(5, n, device=device) * 10
    x[0] = 0.0
    q_ref, s_ref = hadamard.rotate_quantize_torch(x, right, bits, 0.9)
    q, s = hadamard.rotate_quantize_triton(x, right, bits, 0.9)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    if n & (n - 1) == 0:
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    else:
        # The dense factor sums in a different order than torch's matmul, so a value on a
        # rounding boundary may land one step away; nothing else may differ.
        assert_float_close(s, s_ref, rtol=1e-6)
        diff = (q.int() - q_ref.int()).abs()
        assert diff.max() <= 1 and diff.float().mean() < 0.01
    assert torch.equal(q[0], torch.zeros_like(q[0])) and s[0] == 0


def test_rotate_quantize_approximates_rotation(device):
    right = _right(7, device)
    x = torch.randn(6, 56, device=device)
    q, s = hadamard.rotate_quantize_triton(x, right, 8, 1.0)
    rotated = hadamard.hadamard_rotate_torch(x, right)
    assert torch.all((q.float() * s[:, None] - rotated).abs() <= s[:, None] / 2 + 1e-6)


def test_rotate_quantize_fp16_extremes_do_not_overflow(device):
    # Rotating fp16 rows of ±65504 overflows fp16 (the sums exceed its range), but the fused op
    # works in float32 and only writes int8 and a float32 scale.
    x = torch.full((2, 32), 65504.0, device=device).half()
    x[1, ::2] = -65504.0
    assert torch.isinf(hadamard.hadamard_rotate_torch(x, torch.ones(1, 1, device=device))).any()
    q, s = hadamard.rotate_quantize_triton(x, torch.ones(1, 1, device=device), 4, 1.0)
    q_ref, s_ref = hadamard.rotate_quantize_torch(x, torch.ones(1, 1, device=device), 4, 1.0)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref) and torch.isfinite(s).all()
    assert q[0, 0] == 7 and (q[0, 1:] == 0).all()  # all mass lands in the first Hadamard coefficient


def test_wrong_right_factor_is_reported(device):
    with pytest.raises(ValueError, match=r"\(3, 3\) right factor"):
        hadamard.hadamard_rotate_triton(torch.randn(2, 24, device=device), torch.eye(5, device=device))


def test_opcheck(device, backend):
    right = _right(3, device)
    x = torch.randn(2, 12, device=device)
    torch.library.opcheck(torch.ops.asaf_fx.hadamard_rotate.default, (x, right))
    torch.library.opcheck(torch.ops.asaf_fx.hadamard_rotate_quantize.default, (x, right, 4, 0.9))
