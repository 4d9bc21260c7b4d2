"""GEMMs on packed INT4 weights: integer activations (W4A4 / W4A8) and float activations (W4A16).

Both compute ``y = x @ W.T (+ bias)`` for W (N, K) stored as in ``int4.py`` (packed uint8
(N, ceil(K/2)), scales (N, G)). Shapes: x (..., K) → y (..., N).

* ``w4a_int_linear``: x is int8 holding per-token quantized values (int4 range for W4A4, int8 range
  for W4A8, see ``quantize.py``) with float32 ``x_scale`` (...,). Dot products accumulate exactly in
  int32; per channel (group_size = K) the epilogue is ``acc * x_scale[m] * w_scale[n] (+ bias[n])``
  in float32; per group each K-block's int32 partial sum is scaled by its group's ``w_scale`` and
  summed in float32, then times ``x_scale[m]``.
* ``w4a16_linear``: x is float16/bfloat16/float32; weights are unpacked to x's dtype (exact: the
  values are small integers) and dotted with float32 accumulation; scales apply as above.

Triton has no int4 MMA, so the kernel unpacks nibbles to int8 and issues int8 ``tl.dot`` with
int32 accumulation. It never interleaves nibbles in registers: low nibbles (even k) are dotted with
the even activation columns and high nibbles (odd k) with the odd ones.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from asaf_fx.triton_kernels import cublas, gemv, routes
from asaf_fx.triton_kernels._runtime import interpreting, pick_configs
from asaf_fx.triton_kernels.int4 import check_group_size, dequantize_weight_int4, num_groups, unpack_int4
from asaf_fx.triton_kernels.quantize import FLOAT_DTYPES

OUT_DTYPES = FLOAT_DTYPES


# ----------------------------------------------------------------------------------- references


def w4a_int_linear_torch(
    x_q: torch.Tensor, x_scale: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None, group_size: int, out_dtype: torch.dtype,
) -> torch.Tensor:
    """Reference for the W4A4/W4A8 GEMM (see module docstring). Integer sums are exact: in float32
    while no partial sum can pass 2^24 (|x| ≤ 128, |w| ≤ 8, so groups of up to 16 384), else in
    float64; on the CPU the float32 GEMM takes about half the time of the float64 einsum."""
    k, n = _check_common(x_q, w_packed, w_scale, bias, group_size, out_dtype)
    _check_int_act(x_q, x_scale)
    g = num_groups(k, group_size)
    exact = torch.float32 if 128 * 8 * group_size <= 2**24 else torch.float64
    xq = x_q.reshape(-1, k).to(exact)
    wq = unpack_int4(w_packed, k).to(exact)
    if g == 1:
        acc = (xq @ wq.T).to(torch.float32) * w_scale.to(torch.float32).T
    else:
        pad = g * group_size - k
        xg = torch.nn.functional.pad(xq, (0, pad)).reshape(-1, g, group_size)
        wg = torch.nn.functional.pad(wq, (0, pad)).reshape(n, g, group_size)
        partial = torch.einsum("mgk,ngk->mng", xg, wg).to(torch.float32)  # exact int32-range sums
        acc = (partial * w_scale.to(torch.float32)[None]).sum(-1)
    y = acc * x_scale.reshape(-1, 1).to(torch.float32)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype).reshape(*x_q.shape[:-1], n)


def w4a16_linear_torch(
    x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None, group_size: int, out_dtype: torch.dtype,
) -> torch.Tensor:
    """Reference for the weight-only GEMM: ``x.float() @ dequantized(W).T (+ bias)`` in float32."""
    k, n = _check_common(x, w_packed, w_scale, bias, group_size, out_dtype)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"w4a16_linear needs float16/bfloat16/float32 activations, got {x.dtype}")
    w = dequantize_weight_int4(w_packed, w_scale, k, group_size)
    y = x.reshape(-1, k).to(torch.float32) @ w.T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype).reshape(*x.shape[:-1], n)


# ------------------------------------------------------------------------------------- checks


def _check_common(x, w_packed, w_scale, bias, group_size, out_dtype) -> tuple[int, int]:
    """Validate shapes/dtypes/devices shared by both GEMMs; returns (K, N)."""
    if x.dim() < 1:
        raise ValueError("activations need at least one dimension (the last is K)")
    k = x.shape[-1]
    if w_packed.dtype != torch.uint8 or w_packed.dim() != 2:
        raise TypeError(
            "w_packed must be the uint8 (N, ceil(K/2)) tensor from pack_int4, "
            f"got {w_packed.dtype} {tuple(w_packed.shape)}"
        )
    n = w_packed.shape[0]
    if w_packed.shape[1] != (k + 1) // 2:
        raise ValueError(
            f"activations have K={k}, so w_packed needs {(k + 1) // 2} bytes per row, got {w_packed.shape[1]}"
        )
    check_group_size(k, group_size)
    groups = num_groups(k, group_size)
    if w_scale.shape != (n, groups) or not w_scale.is_floating_point():
        raise ValueError(
            f"w_scale must be float (N, ceil(K/group_size)) = ({n}, {groups}), "
            f"got {w_scale.dtype} {tuple(w_scale.shape)}"
        )
    if bias is not None and (bias.shape != (n,) or not bias.is_floating_point()):
        raise ValueError(f"bias must be a float ({n},) tensor, got {bias.dtype} {tuple(bias.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    others = [t for t in (w_packed, w_scale, bias) if t is not None]
    if any(t.device != x.device for t in others):
        raise ValueError(
            f"activations are on {x.device} but some weights are not: move them with .to({str(x.device)!r})"
        )
    return k, n


def _check_float_act(x: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"w4a16_linear needs float16/bfloat16/float32 activations, got {x.dtype}")


def _check_int_act(x_q: torch.Tensor, x_scale: torch.Tensor) -> None:
    if x_q.dtype != torch.int8:
        raise TypeError(f"x_q must be int8 quantized activations (quantize_per_token), got {x_q.dtype}")
    if x_scale.shape != x_q.shape[:-1] or x_scale.dtype != torch.float32:
        raise ValueError(
            f"x_scale must be float32 of shape {tuple(x_q.shape[:-1])}, got {x_scale.dtype} {tuple(x_scale.shape)}"
        )


# --------------------------------------------------------------------------------------- kernel


def _gpu_configs() -> list[triton.Config]:
    # Decode (M ≤ 16): one 16-row tile, wide N to stream weights; prefill: square-ish tiles.
    # BLOCK_K ≥ 64 keeps each half-dot (BLOCK_K / 2 deep) at the int8 MMA's K ≥ 32.
    decode = [
        triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1}, num_warps=w, num_stages=s)
        for bn, bk, w, s in [(32, 128, 4, 4), (64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 3), (128, 64, 4, 4)]
    ]
    prefill = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (256, 128, 128, 8, 3),
            (64, 128, 128, 4, 4), (128, 64, 128, 4, 4), (64, 64, 128, 4, 4), (128, 128, 64, 8, 4),
        ]
    ]
    return decode + prefill


_CONFIGS = pick_configs(
    _gpu_configs(),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 2}, num_warps=4),
)


def _prune_configs(configs, named_args, **kwargs):
    """Decode configs for M ≤ 16, prefill ones above; BLOCK_K must divide the group size."""
    m, group = named_args["M"], kwargs.get("GROUP_K", named_args.get("GROUP_K", 0))
    keep = [c for c in configs if (c.kwargs["BLOCK_M"] == 16) == (m <= 16) or len(configs) == 1]
    keep = [c for c in keep if group == 0 or group % c.kwargs["BLOCK_K"] == 0]
    return keep or [c for c in configs if group == 0 or group % c.kwargs["BLOCK_K"] == 0]


@triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "N", "K", "GROUP_K", "INT_ACT"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _w4_gemm_kernel(
    # pointers
    a_ptr, w_ptr, w_scale_ptr, a_scale_ptr, bias_ptr, c_ptr,
    # sizes
    M, N, K, M_BUCKET,
    # strides
    stride_am, stride_ak, stride_wn, stride_wk, stride_sn, stride_sg, stride_cm, stride_cn,
    # meta-parameters
    GROUP_K: tl.constexpr,  # 0: one scale per output channel; else the group size
    INT_ACT: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order (Triton matmul tutorial): neighbouring programs share weight tiles in L2.
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group_id = pid // (GROUP_M * num_n)
    first_m = group_id * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_K // 2)  # byte index inside the K-block
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_bytes = (K + 1) // 2

    acc_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_even = k0 + 2 * offs_j
        a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am
        a_even = tl.load(a_rows + k_even[None, :] * stride_ak, mask=m_mask[:, None] & (k_even[None, :] < K), other=0)
        a_odd = tl.load(a_rows + (k_even[None, :] + 1) * stride_ak,
                        mask=m_mask[:, None] & (k_even[None, :] + 1 < K), other=0)
        byte_idx = k0 // 2 + offs_j
        w_bytes = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + byte_idx[:, None] * stride_wk,
                          mask=n_mask[None, :] & (byte_idx[:, None] < k_bytes), other=0).to(tl.int32)
        # Sign-extend 4-bit two's complement: (v ^ 8) - 8 maps 0..7 → 0..7 and 8..15 → -8..-1.
        w_low = ((w_bytes & 0xF) ^ 8) - 8
        w_high = (((w_bytes >> 4) & 0xF) ^ 8) - 8
        if INT_ACT:
            part = tl.dot(a_even, w_low.to(tl.int8), out_dtype=tl.int32)
            part = tl.dot(a_odd, w_high.to(tl.int8), acc=part, out_dtype=tl.int32)
        else:
            if FP32_DOT:
                a_even = a_even.to(tl.float32)
                a_odd = a_odd.to(tl.float32)
                part = tl.dot(a_even, w_low.to(tl.float32), input_precision="ieee")
                part = tl.dot(a_odd, w_high.to(tl.float32), acc=part, input_precision="ieee")
            else:
                part = tl.dot(a_even, w_low.to(a_even.dtype))
                part = tl.dot(a_odd, w_high.to(a_odd.dtype), acc=part)
        if GROUP_K == 0:
            if INT_ACT:
                acc_i += part
            else:
                acc_f += part
        else:
            # GROUP_K % BLOCK_K == 0, so this block lies in a single group.
            s = tl.load(w_scale_ptr + offs_n * stride_sn + (k0 // GROUP_K) * stride_sg, mask=n_mask, other=0.0)
            acc_f += part.to(tl.float32) * s.to(tl.float32)[None, :]

    if GROUP_K == 0:
        if INT_ACT:
            acc_f = acc_i.to(tl.float32)
        s = tl.load(w_scale_ptr + offs_n * stride_sn, mask=n_mask, other=0.0).to(tl.float32)
        acc_f = acc_f * s[None, :]
    if INT_ACT:
        a_s = tl.load(a_scale_ptr + offs_m, mask=m_mask, other=0.0)
        acc_f = acc_f * a_s[:, None]
    if HAS_BIAS:
        acc_f += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc_f.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _needs_fp32_dot(dtype: torch.dtype) -> bool:
    # float32 activations need IEEE dots (the default would be TF32). The interpreter has no
    # bfloat16 matmul (numpy multiplies the raw bits), so there bfloat16 is widened to float32
    # exactly; on a GPU bfloat16 goes to the tensor cores as it is.
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


def _launch(a, a_scale, w_packed, w_scale, bias, group_size, out_dtype, int_act: bool) -> torch.Tensor:
    k, n = a.shape[-1], w_packed.shape[0]
    a2 = a.reshape(-1, k)
    m = a2.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m and n:
        w_scale = w_scale.contiguous()
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _w4_gemm_kernel[grid](
            a2, w_packed, w_scale, a_scale if a_scale is not None else w_scale,
            bias if bias is not None else w_scale, c,
            m, n, k, min(triton.next_power_of_2(m), 8192),
            a2.stride(0), a2.stride(1), w_packed.stride(0), w_packed.stride(1),
            w_scale.stride(0), w_scale.stride(1), c.stride(0), c.stride(1),
            GROUP_K=0 if group_size == k else group_size,
            INT_ACT=int_act, HAS_BIAS=bias is not None, FP32_DOT=_needs_fp32_dot(a.dtype),
        )
    return c.reshape(*a.shape[:-1], n)


def w4a_int_linear_triton(
    x_q: torch.Tensor, x_scale: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None, group_size: int, out_dtype: torch.dtype,
) -> torch.Tensor:
    """Triton kernel for :func:`w4a_int_linear_torch` (same signature)."""
    _check_common(x_q, w_packed, w_scale, bias, group_size, out_dtype)
    _check_int_act(x_q, x_scale)
    return _launch(x_q, x_scale.reshape(-1).contiguous(), w_packed, w_scale, bias, group_size, out_dtype, True)


def w4a_int_linear_device(
    x_q: torch.Tensor, x_scale: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None, group_size: int, out_dtype: torch.dtype, a_bits: int = 8,
) -> torch.Tensor:
    """:func:`w4a_int_linear_torch` on the fastest kernel for its shape (``routes.int_route``).

    ``a_bits`` is the width the codes were quantized to (4 or 8): 4-bit codes may take float8.
    """
    _check_common(x_q, w_packed, w_scale, bias, group_size, out_dtype)
    _check_int_act(x_q, x_scale)
    route = routes.int_route(x_q, w_packed, group_size, a_bits)
    if route == "gemv":
        return gemv.w4_gemv(x_q, x_scale, w_packed, w_scale, bias, group_size, out_dtype)
    if route == "fp8":
        return cublas.w4a4_fp8_linear(x_q, x_scale, w_packed, w_scale, bias, out_dtype)
    if route == "int8":
        return cublas.w4a8_int8_linear(x_q, x_scale, w_packed, w_scale, bias, out_dtype)
    return _launch(x_q, x_scale.reshape(-1).contiguous(), w_packed, w_scale, bias, group_size, out_dtype, True)


def w4a16_linear_triton(
    x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None, group_size: int, out_dtype: torch.dtype,
) -> torch.Tensor:
    """Triton kernel for :func:`w4a16_linear_torch` (same signature)."""
    _check_common(x, w_packed, w_scale, bias, group_size, out_dtype)
    _check_float_act(x)
    return _launch(x, None, w_packed, w_scale, bias, group_size, out_dtype, False)


def w4a16_linear_device(
    x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None, group_size: int, out_dtype: torch.dtype,
) -> torch.Tensor:
    """:func:`w4a16_linear_torch` on the fastest kernel for its shape (``routes.float_route``)."""
    if routes.float_route(x, w_packed) != "gemv":
        return w4a16_linear_triton(x, w_packed, w_scale, bias, group_size, out_dtype)
    _check_common(x, w_packed, w_scale, bias, group_size, out_dtype)
    _check_float_act(x)
    return gemv.w4_gemv(x, None, w_packed, w_scale, bias, group_size, out_dtype)
