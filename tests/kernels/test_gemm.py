"""INT4 GEMMs: Triton against the torch references, on awkward shapes and extreme values."""

from __future__ import annotations

import pytest
import torch

import asaf_fx.triton_kernels.ops  # noqa: F401
from asaf_fx.passes.quantize.rtn import quantize_rtn
from asaf_fx.triton_kernels import gemm, int4, quantize

pytestmark = pytest.mark.interpreter

# (M, N, K, group_size): M = 1 (decode), odd N and K, K not a multiple of the 64-wide K-block,
# per-group scales with a partial last group, no rows at all, and N = K = 1. None = per output channel.
SHAPES = [(1, 17, 33, None), (5, 40, 100, None), (3, 19, 192, 64), (2, 16, 200, 128), (0, 8, 9, None),
          (2, 1, 1, None)]
OUT_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _weights(n, k, group_size, device):
    gs = k if group_size is None else group_size
    q = quantize_rtn(torch.randn(n, k), 4, gs, clip_search=False)
    packed, scale = q.packed(), q.scales
    return packed.to(device), scale.to(device), gs


@pytest.mark.parametrize("m,n,k,group_size", SHAPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_w4a_int_matches_reference(device, m, n, k, group_size, bits, assert_float_close):
    w_packed, w_scale, gs = _weights(n, k, group_size, device)
    x = torch.randn(m, k, device=device)
    if m > 1:
        x[1] = 0.0  # zero row
    x_q, x_scale = quantize.quantize_per_token_torch(x, bits, 1.0)
    bias = torch.randn(n, device=device)
    for b in (None, bias):
        ref = gemm.w4a_int_linear_torch(x_q, x_scale, w_packed, w_scale, b, gs, torch.float32)
        out = gemm.w4a_int_linear_triton(x_q, x_scale, w_packed, w_scale, b, gs, torch.float32)
        assert out.shape == (m, n)
        if group_size is None and b is None:
            assert torch.equal(out, ref)  # exact int32 sum, then the same float32 products
        else:
            # Per-group partial sums add in another order; a GPU also contracts "* scale + bias"
            # into one FMA (one rounding fewer than torch).
            assert_float_close(out, ref, rtol=1e-5)


def test_w4a_int_integer_path_is_exact_at_extremes(device):
    # All weights -8 and activations -128: every product is +1024, K · 1024 must not overflow or round.
    n, k = 3, 257
    w_packed = int4.pack_int4(torch.full((n, k), -8, dtype=torch.int8)).to(device)
    ones = torch.ones(n, 1, device=device)
    x_q = torch.full((2, k), -128, dtype=torch.int8, device=device)
    x_q[1, ::2] = 127
    x_scale = torch.ones(2, device=device)
    out = gemm.w4a_int_linear_triton(x_q, x_scale, w_packed, ones, None, k, torch.float32)
    expected = (x_q.double() @ torch.full((k, n), -8.0, dtype=torch.float64, device=device)).float()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_w4a_int_half_outputs(device, out_dtype, assert_float_close):
    w_packed, w_scale, gs = _weights(24, 70, None, device)
    x_q, x_scale = quantize.quantize_per_token_torch(torch.randn(2, 3, 70, device=device), 4, 0.9)
    ref = gemm.w4a_int_linear_torch(x_q, x_scale, w_packed, w_scale.half(), None, gs, out_dtype)
    out = gemm.w4a_int_linear_triton(x_q, x_scale, w_packed, w_scale.half(), None, gs, out_dtype)
    assert out.shape == (2, 3, 24)
    assert_float_close(out, ref, rtol=OUT_TOL[out_dtype])


@pytest.mark.parametrize("m,n,k,group_size", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_w4a16_matches_reference(device, m, n, k, group_size, dtype, assert_float_close):
    w_packed, w_scale, gs = _weights(n, k, group_size, device)
    x = torch.randn(m, k, device=device).to(dtype)
    bias = torch.randn(n, device=device)
    ref = gemm.w4a16_linear_torch(x, w_packed, w_scale, bias, gs, dtype)
    out = gemm.w4a16_linear_triton(x, w_packed, w_scale, bias, gs, dtype)
    assert_float_close(out, ref, rtol=OUT_TOL[dtype])


def test_strided_activations(device):
    # The kernel reads activations through their strides: a transposed view needs no copy.
    w_packed, w_scale, gs = _weights(12, 80, None, device)
    x_q = torch.randint(-8, 8, (80, 3), dtype=torch.int8, device=device).T
    x_scale = torch.rand(3, device=device)
    ref = gemm.w4a_int_linear_torch(x_q.contiguous(), x_scale, w_packed, w_scale, None, gs, torch.float32)
    assert torch.equal(gemm.w4a_int_linear_triton(x_q, x_scale, w_packed, w_scale, None, gs, torch.float32), ref)
    x = torch.randn(80, 3, device=device).T
    ref = gemm.w4a16_linear_torch(x.contiguous(), w_packed, w_scale, None, gs, torch.float32)
    torch.testing.assert_close(gemm.w4a16_linear_triton(x, w_packed, w_scale, None, gs, torch.float32), ref)


def test_quantized_linear_approximates_float_linear(device):
    # End to end: W4A8 of a random layer stays close to the float layer (SQNR floor, torchao style).
    generator = torch.Generator().manual_seed(0)  # the test's own draw, whatever ran before it
    w = torch.randn(32, 128, generator=generator)
    x = torch.randn(8, 128, generator=generator)
    q = quantize_rtn(w, 4, 64, clip_search=False)
    w_packed, w_scale = q.packed(), q.scales
    x_q, x_scale = quantize.quantize_per_token_triton(x.to(device), 8, 1.0)
    y = gemm.w4a_int_linear_triton(x_q, x_scale, w_packed.to(device), w_scale.to(device), None, 64, torch.float32)
    ref = x @ w.T
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (y.cpu() - ref).pow(2).mean())
    assert sqnr > 18


def test_bad_arguments_say_what_is_wrong(device):
    w_packed, w_scale, gs = _weights(8, 64, None, device)
    x_q = torch.zeros(2, 64, dtype=torch.int8, device=device)
    x_scale = torch.ones(2, device=device)
    with pytest.raises(ValueError, match="bytes per row"):
        gemm.w4a_int_linear_triton(x_q[:, :62], x_scale, w_packed, w_scale, None, gs, torch.float32)
    with pytest.raises(TypeError, match="int8"):
        gemm.w4a_int_linear_triton(x_q.float(), x_scale, w_packed, w_scale, None, gs, torch.float32)
    with pytest.raises(ValueError, match="w_scale"):
        gemm.w4a_int_linear_triton(x_q, x_scale, w_packed, w_scale[:4], None, gs, torch.float32)
    with pytest.raises(TypeError, match="out_dtype"):
        gemm.w4a16_linear_triton(x_q.float(), w_packed, w_scale, None, gs, torch.int32)


def test_opcheck(device, backend):
    w_packed, w_scale, gs = _weights(16, 70, None, device)
    x = torch.randn(3, 70, device=device)
    x_q, x_scale = quantize.quantize_per_token_torch(x, 4, 1.0)
    bias = torch.randn(16, device=device)
    torch.library.opcheck(torch.ops.asaf_fx.w4a_int_linear.default,
                          (x_q, x_scale, w_packed, w_scale, bias, gs, torch.float16))
    torch.library.opcheck(torch.ops.asaf_fx.w4a16_linear.default, (x, w_packed, w_scale, None, gs, torch.float32))


@pytest.mark.parametrize("m,group,expect_m,expect_k", [
    (1, 0, {16}, {64, 128, 256}),         # decode: 16-row tiles only
    (16, 128, {16}, {64, 128}),           # BLOCK_K must divide the group
    (2048, 0, {64, 128, 256}, {64, 128}),  # prefill: large tiles only
    (4096, 192, {64, 128}, {64}),          # 192 = 3 · 64: only 64-wide K-blocks stay in one group
])
def test_autotune_pruning_picks_decode_or_prefill_tiles(m, group, expect_m, expect_k):
    kept = gemm._prune_configs(gemm._gpu_configs(), {"M": m}, GROUP_K=group)
    assert kept
    assert {c.kwargs["BLOCK_M"] for c in kept} <= expect_m
    assert {c.kwargs["BLOCK_K"] for c in kept} <= expect_k
    assert all(group == 0 or group % c.kwargs["BLOCK_K"] == 0 for c in kept)


@pytest.mark.parametrize("k,group_size", [(16384, 16384), (16448, 16448), (300, 128)])
def test_w4a_int_reference_sums_exactly(k, group_size):
    # The reference sums in float32 up to groups of 16 384 (every partial sum ≤ 2^24) and in
    # float64 above; both must give the int64 sums. Row 0 is the extreme: 16 384 · 1024 = 2^24.
    n, generator = 3, torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=generator)
    codes[0] = -8
    x_q = torch.randint(-128, 128, (2, k), dtype=torch.int8, generator=generator)
    x_q[0] = -128
    w_scale = torch.rand(n, int4.num_groups(k, group_size), generator=generator) + 0.5
    x_scale = torch.rand(2, generator=generator) + 0.5
    out = gemm.w4a_int_linear_torch(x_q, x_scale, int4.pack_int4(codes), w_scale, None, group_size, torch.float32)
    pad = int4.num_groups(k, group_size) * group_size - k
    xg = torch.nn.functional.pad(x_q.long(), (0, pad)).view(2, -1, group_size)
    wg = torch.nn.functional.pad(codes.long(), (0, pad)).view(n, -1, group_size)
    sums = torch.einsum("mgk,ngk->mng", xg, wg)  # int64: exact
    expected = (sums.float() * w_scale[None]).sum(-1) * x_scale[:, None]
    if group_size == k:
        assert int(sums[0, 0, 0]) == 2**24 or k > 16384
    assert torch.equal(out, expected)
