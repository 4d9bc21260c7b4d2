"""Asymmetric KV-cache quantization: Triton against the torch reference, and round-trip error."""

from __future__ import annotations

import pytest
import torch

import asaf_fx.triton_kernels.ops  # noqa: F401
from asaf_fx.triton_kernels import kv_quant

pytestmark = pytest.mark.interpreter

# (shape (..., D), group_size): per head (group = head_dim), sub-head groups, odd group counts.
CASES = [((2, 3, 16), 16), ((1, 64), 32), ((5, 2, 12), 6), ((4, 1, 8), 2), ((0, 8), 8)]


@pytest.mark.parametrize("shape,group_size", CASES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_reference(device, shape, group_size, bits, dtype, assert_float_close):
    x = (torch.randn(shape, device=device) * 4).to(dtype)
    if x.shape[0] > 1:
        x[1] = 1.25  # constant groups: scale 0, dequantized exactly
    ref = kv_quant.kv_quantize_torch(x, bits, group_size)
    out = kv_quant.kv_quantize_triton(x, bits, group_size)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
    deq_ref = kv_quant.kv_dequantize_torch(*ref, bits, group_size, dtype)
    deq = kv_quant.kv_dequantize_triton(*out, bits, group_size, dtype)
    # q * scale + zero: a GPU fuses it into one FMA, so allow a rounding of the output dtype.
    assert_float_close(deq, deq_ref, rtol=torch.finfo(dtype).eps)
    assert deq.shape == x.shape and deq.dtype == dtype
    # Round trip: within half a step of each group's scale (plus the dtype's rounding).
    q, scale, zero = ref
    step = scale.repeat_interleave(group_size, dim=-1)
    magnitude = x.float().abs().max().item() if x.numel() else 0.0
    slack = 2 * torch.finfo(dtype).eps * magnitude
    assert torch.all((deq.float() - x.float()).abs() <= step / 2 + slack)
    if x.shape[0] > 1:
        assert torch.equal(deq[1], x[1])


def test_packed_layout(device):
    # Group [0, 1, ..., 15] at 4 bits: lo = 0, scale = 1, q = the values; byte j = q[2j] | q[2j+1] << 4.
    x = torch.arange(16, dtype=torch.float32, device=device)[None]
    q, scale, zero = kv_quant.kv_quantize_triton(x, 4, 16)
    assert q.tolist() == [[0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]]
    assert scale.item() == 1.0 and zero.item() == 0.0


def test_extreme_values(device):
    x = torch.tensor([[-65504.0, 65504.0, 0.0, 1.0]], device=device).half()
    for bits in (4, 8):
        ref = kv_quant.kv_quantize_torch(x, bits, 4)
        for a, b in zip(kv_quant.kv_quantize_triton(x, bits, 4), ref):
            assert torch.equal(a, b)


def test_bad_arguments_say_what_is_wrong(device):
    x = torch.randn(2, 12, device=device)
    with pytest.raises(ValueError, match="divide"):
        kv_quant.kv_quantize_triton(x, 4, 5)
    with pytest.raises(ValueError, match="4 or 8"):
        kv_quant.kv_quantize_triton(x, 2, 6)
    with pytest.raises(ValueError, match="even group_size"):
        kv_quant.kv_quantize_triton(torch.randn(2, 9, device=device), 4, 3)
    q, s, z = kv_quant.kv_quantize_triton(x, 4, 6)
    with pytest.raises(ValueError, match="needs"):
        kv_quant.kv_dequantize_triton(q, s, z, 8, 6, torch.float16)


def test_opcheck(device, backend):
    x = torch.randn(2, 3, 16, device=device)
    torch.library.opcheck(torch.ops.asaf_fx.kv_quantize.default, (x, 4, 8))
    q, s, z = kv_quant.kv_quantize_torch(x, 4, 8)
    torch.library.opcheck(torch.ops.asaf_fx.kv_dequantize.default, (q, s, z, 4, 8, torch.float16))
