"""Per-token activation quantization: Triton kernel against its torch reference."""

from __future__ import annotations

import pytest
import torch

import asaf_fx.triton_kernels.ops  # noqa: F401
from asaf_fx.triton_kernels import quantize

pytestmark = pytest.mark.interpreter


def _inputs(device):
    x = torch.randn(4, 1100, device=device)  # K > the kernel's 1024-wide block: two passes of two blocks
    x[1] = 0.0  # zero row: scale 0, q 0
    x[2, 5] = 3e4  # one huge outlier dominates the row's scale
    return {
        "M=1,K=1": torch.tensor([[-2.5]], device=device),
        # scale 1 at 4 bits: exact ties (round half to even) and the float just below 0.5
        "ties": torch.tensor([[7.0, 0.5, 1.5, 2.5, -2.5, -3.5, 0.49999997]], device=device),
        "odd K": torch.randn(3, 37, device=device) * 50,
        "K>block, zero row, outlier": x,
        "3-d fp16 extremes": torch.tensor([[[65504.0, -65504.0, 1.0, -0.0, 6e-8]]], device=device).half(),
        "bf16": torch.randn(2, 3, 33, device=device).bfloat16(),
        "no rows": torch.randn(0, 8, device=device),
    }


@pytest.mark.parametrize("bits,clip", [(4, 1.0), (4, 0.9), (8, 1.0), (8, 0.85)])
def test_triton_matches_reference_exactly(device, bits, clip):
    for name, x in _inputs(device).items():
        q_ref, s_ref = quantize.quantize_per_token_torch(x, bits, clip)
        q, s = quantize.quantize_per_token_triton(x, bits, clip)
        assert torch.equal(q, q_ref), name
        assert torch.equal(s, s_ref), name


def test_reference_semantics(device):
    x = torch.tensor([[1.0, -2.0, 0.5, 3.5], [0.0, 0.0, 0.0, 0.0]], device=device)
    q, s = quantize.quantize_per_token_torch(x, 4, 1.0)
    assert torch.allclose(s, torch.tensor([0.5, 0.0], device=device))
    # 0.5 / 0.5 = 1; -2 / 0.5 = -4; 3.5 / 0.5 = 7 (= qmax); 1 / 0.5 = 2
    assert q.tolist() == [[2, -4, 1, 7], [0, 0, 0, 0]]
    q, s = quantize.quantize_per_token_torch(x, 4, 0.5)  # clipping saturates at qmax
    assert q[0].tolist() == [4, -8, 2, 7]
    ties = torch.tensor([[7.0, 0.5, 1.5, 2.5, -2.5, -3.5, 0.49999997]], device=device)
    for impl in (quantize.quantize_per_token_torch, quantize.quantize_per_token_triton):
        assert impl(ties, 4, 1.0)[0].tolist() == [[7, 0, 2, 2, -2, -4, 0]]  # ties to even


def test_bad_arguments_say_what_is_wrong(device):
    x = torch.randn(2, 4, device=device)
    with pytest.raises(ValueError, match="4 or 8"):
        quantize.quantize_per_token_triton(x, 3, 1.0)
    with pytest.raises(ValueError, match="clip_ratio"):
        quantize.quantize_per_token_triton(x, 4, 0.0)
    with pytest.raises(TypeError, match="float16"):
        quantize.quantize_per_token_triton(x.double(), 4, 1.0)


def test_opcheck(device, backend):
    x = torch.randn(3, 19, device=device)
    torch.library.opcheck(torch.ops.asaf_fx.quantize_per_token.default, (x, 4, 0.9))


@pytest.mark.parametrize("divisor", [7, 15, 127, 255])
def test_reference_scale_division_is_correctly_rounded(device, divisor):
    # CUDA torch turns `tensor / python_scalar` into a multiplication by the reciprocal, one ulp off
    # for some inputs, while the kernels divide with div_rn: the references must divide exactly too.
    from asaf_fx.triton_kernels._runtime import divide_rn

    x = torch.rand(1 << 16, device=device, dtype=torch.float32) * 100
    exact = (x.double() / divisor).float()  # float64 quotient rounded once more: exact for float32 division
    assert torch.equal(divide_rn(x, divisor), exact)
