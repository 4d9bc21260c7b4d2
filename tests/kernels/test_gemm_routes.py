"""The GPU routes of the INT4 linears (decode GEMV, float8 / int8 vendor GEMMs) against the references.

On a CUDA machine each route runs its real kernel; on the CPU the Triton kernels run in the
interpreter and the vendor routes run torch's CPU ``_scaled_mm`` / ``_int_mm``, which compute the
same exact integer products.
"""

from __future__ import annotations

import pytest
import torch

import asaf_fx.triton_kernels.ops  # noqa: F401
from asaf_fx.passes.quantize.rtn import quantize_rtn
from asaf_fx.triton_kernels import cublas, gemm, gemv, int4, quantize, routes

pytestmark = pytest.mark.interpreter


def _case(m, n, k, group_size, bits, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    gs = k if group_size is None else group_size
    q = quantize_rtn(torch.randn(n, k, generator=g), 4, gs, clip_search=False)
    packed, scale = q.packed(), q.scales
    x = torch.randn(m, k, generator=g)
    x_q, x_scale = quantize.quantize_per_token_torch(x, bits, 1.0)
    bias = torch.randn(n, generator=g)
    return [t.to(device) for t in (x, x_q, x_scale, packed, scale, bias)] + [gs]


@pytest.mark.parametrize("dtype", [torch.int8, torch.float16])
def test_unpack_to_matches_reference(device, dtype):
    q = torch.randint(-8, 8, (37, 75), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    packed = int4.pack_int4(q).to(device)
    out = int4.unpack_int4_to(packed, 75, dtype)
    assert out.dtype == dtype and torch.equal(out.cpu().to(torch.int8), q)


@pytest.mark.parametrize("m,n,k,group_size", [(1, 40, 256, None), (16, 17, 100, None), (3, 24, 256, 128),
                                               (7, 9, 33, None), (0, 8, 64, None), (1, 24, 256, 128),
                                               (1, 9, 33, None)])
@pytest.mark.parametrize("bits", [4, 8])
def test_gemv_int_is_exact(device, m, n, k, group_size, bits, assert_float_close):
    x, x_q, x_scale, packed, scale, bias, gs = _case(m, n, k, group_size, bits, device)
    for b in (None, bias):
        ref = gemm.w4a_int_linear_torch(x_q, x_scale, packed, scale, b, gs, torch.float32)
        out = gemv.w4_gemv(x_q, x_scale, packed, scale, b, gs, torch.float32)
        # Integer sums are exact in the float32 accumulator; only the scale products' order differs.
        assert_float_close(out, ref, rtol=2e-6)


def test_gemv_integer_sum_exact_at_extremes(device):
    n, k = 16, 512  # every product +1024: K · 1024 = 2^19 must come out exact
    packed = int4.pack_int4(torch.full((n, k), -8, dtype=torch.int8)).to(device)
    ones = torch.ones(n, 1, device=device)
    x_q = torch.full((2, k), -128, dtype=torch.int8, device=device)
    x_q[1, ::2] = 127
    out = gemv.w4_gemv(x_q, torch.ones(2, device=device), packed, ones, None, k, torch.float32)
    expected = (x_q.double() @ torch.full((k, n), -8.0, dtype=torch.float64, device=device)).float()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv_float_matches_reference(device, dtype, assert_float_close):
    x, _, _, packed, scale, bias, gs = _case(4, 48, 256, 128, 4, device)
    ref = gemm.w4a16_linear_torch(x.to(dtype), packed, scale, bias, gs, torch.float32)
    out = gemv.w4_gemv(x.to(dtype), None, packed, scale, bias, gs, torch.float32)
    assert_float_close(out, ref, rtol=2e-3 if dtype == torch.float16 else 1e-2)


def test_gemv_refuses_many_rows(device):
    x, x_q, x_scale, packed, scale, _, gs = _case(gemv.MAX_M + 1, 8, 64, None, 4, device)
    with pytest.raises(ValueError, match="at most 16 rows"):
        gemv.w4_gemv(x_q, x_scale, packed, scale, None, gs, torch.float32)


@pytest.mark.parametrize("bits", [4, 8])
def test_int8_route_is_exact(device, bits):
    x, x_q, x_scale, packed, scale, bias, gs = _case(40, 48, 128, None, bits, device)
    ones_x, ones_w = torch.ones_like(x_scale), torch.ones_like(scale)
    ref = gemm.w4a_int_linear_torch(x_q, ones_x, packed, ones_w, None, gs, torch.float32)
    assert torch.equal(cublas.w4a8_int8_linear(x_q, ones_x, packed, ones_w, None, torch.float32), ref)
    ref = gemm.w4a_int_linear_torch(x_q, x_scale, packed, scale, bias, gs, torch.float32)
    torch.testing.assert_close(cublas.w4a8_int8_linear(x_q, x_scale, packed, scale, bias, torch.float32), ref,
                               rtol=1e-6, atol=1e-5)


def test_fp8_route_is_exact_for_4bit_codes(device):
    if not cublas.fp8_supported(torch.device(device)):
        pytest.skip("float8 tensor cores need compute capability 8.9 or newer")
    # Extremes: codes -8 everywhere give products of 64; K = 4096 sums to 2^18, exact in float32.
    k = 4096
    x_q = torch.full((32, k), -8, dtype=torch.int8, device=device)
    x_q[1::2, ::3] = 7
    packed = int4.pack_int4(torch.full((16, k), -8, dtype=torch.int8)).to(device)
    ones_x, ones_w = torch.ones(32, device=device), torch.ones(16, 1, device=device)
    ref = gemm.w4a_int_linear_torch(x_q, ones_x, packed, ones_w, None, k, torch.float32)
    assert torch.equal(cublas.w4a4_fp8_linear(x_q, ones_x, packed, ones_w, None, torch.float32), ref)
    x, x_q, x_scale, packed, scale, bias, gs = _case(40, 48, 256, None, 4, device)
    ref = gemm.w4a_int_linear_torch(x_q, x_scale, packed, scale, bias, gs, torch.float32)
    torch.testing.assert_close(cublas.w4a4_fp8_linear(x_q, x_scale, packed, scale, bias, torch.float32), ref,
                               rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("m,group_size,bits,route", [
    (1, None, 4, "gemv"), (1, None, 8, "gemv"), (16, None, 4, "fp8"), (16, None, 8, "gemv"), (16, 128, 4, "gemv"),
    (64, None, 4, "fp8"), (64, None, 8, "int8"), (64, 128, 4, "triton")])
def test_routes_pick_by_shape(device, m, group_size, bits, route):
    _, x_q, _, packed, _, _, gs = _case(m, 32, 256, group_size, bits, device)
    assert routes.int_route(x_q, packed, gs, bits) == route


@pytest.mark.parametrize("m", [1, 40])
@pytest.mark.parametrize("bits", [4, 8])
def test_op_on_device_route_matches_reference(device, monkeypatch, m, bits):
    monkeypatch.setenv("ASAF_FX_KERNELS", "triton")
    x, x_q, x_scale, packed, scale, bias, gs = _case(m, 48, 256, None, bits, device)
    ref = gemm.w4a_int_linear_torch(x_q, x_scale, packed, scale, bias, gs, torch.float16)
    out = torch.ops.asaf_fx.w4a_int_linear(x_q, x_scale, packed, scale, bias, gs, torch.float16, bits)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("n,k", [(40, 256), (9, 33), (24, 1000)])
@pytest.mark.parametrize("bits", [4, 8])
def test_split_k_gemv_is_exact(device, n, k, bits, assert_float_close):
    x, x_q, x_scale, packed, scale, bias, gs = _case(1, n, k, None, bits, device)
    for b in (None, bias):
        ref = gemm.w4a_int_linear_torch(x_q, x_scale, packed, scale, b, gs, torch.float32)
        out = gemv.w4_gemv_split(x_q, x_scale, packed, scale, b, torch.float32)
        assert_float_close(out, ref, rtol=2e-6)
    sums = gemv.w4_gemv_split(x_q, torch.ones(1, device=device), packed, torch.ones(n, 1, device=device), None,
                              torch.float32)
    assert torch.equal(sums, (x_q.double() @ int4.unpack_int4(packed, k).double().T).float())  # exact integers


def test_split_k_gemv_refuses_what_it_cannot_compute(device):
    x, x_q, x_scale, packed, scale, bias, gs = _case(2, 8, 64, None, 4, device)
    with pytest.raises(ValueError, match="one row of int8 codes"):
        gemv.w4_gemv_split(x_q, x_scale, packed, scale, None, torch.float32)
