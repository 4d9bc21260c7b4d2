"""Weight-streaming INT4 GEMM for few tokens (decode, M ≤ 16): each packed weight byte is read once.

Computes what ``gemm.w4a_int_linear_torch`` / ``gemm.w4a16_linear_torch`` compute, on the same
packed layout (``int4.py``), for x of at most 16 rows. At this size a linear is bound by the bytes
of its weights, so the kernel is organised around the weight stream: every program owns a block
of output channels, reads their packed rows front to back in wide contiguous loads (no mask on K
when the block divides it) and keeps the tiny activation tile in cache.

Two kinds of program, both in the autotuner's list: for one row, float32 multiply-adds into a
(BLOCK_N, BLOCK_KB) accumulator reduced once at the end; for 2–16 rows (or one, if faster), two
16-row tensor-core dots per K-block with both operands as float16 (bfloat16 for bfloat16 inputs).

``w4_gemv_split`` is a second form for one row of integer codes with one scale per output channel:
the K axis is also split over ``SPLIT_K`` programs, which add their exact integer partial sums
into a zeroed float32 row with atomics, and ``cublas.scale_epilogue`` applies the scales and bias.
More programs keep more loads in flight when N is small against K (a down_proj: 4096 outputs,
11008-deep rows); the cost is two small launches more. Integer partial sums are exact, so the order
in which the atomics land changes nothing.

Arithmetic: integer activation codes (|v| ≤ 128) and weight codes (|v| ≤ 8) are exact in float16
and float32, and for K < 16 384 their products and sums stay integers below 2^24, so the float32
accumulator holds the exact integer dot product the reference computes: W4A4/W4A8 results equal
the reference's up to the order of the final float32 scale multiplications. Float activations
(W4A16) are multiplied in float32 by the one-row kernel and rounded to the input dtype by the
tensor-core one, like any fp16 GEMM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from asaf_fx.triton_kernels._runtime import interpreting
from asaf_fx.triton_kernels.cublas import scale_epilogue

MAX_M = 16  # rows one program's 16-row MMA tile covers; more tokens go to the GEMM paths


def _configs() -> list[triton.Config]:
    # Two shapes of program, tried by the autotuner per (N, K, rows): for one row, plain
    # multiply-adds into a (BLOCK_N, BLOCK_KB) accumulator reduced once at the end (no tensor-core
    # tiles, no layout shuffles per step); for 2-16 rows, two 16-row tensor-core dots per K-block
    # on a K-major weight tile.
    fma = [triton.Config({"BLOCK_N": bn, "BLOCK_KB": bkb, "USE_DOT": False}, num_warps=w, num_stages=st)
           for bn, bkb, w, st in [(8, 256, 4, 3), (16, 128, 4, 3), (16, 256, 4, 3), (32, 128, 4, 3), (8, 512, 4, 2),
                                  (16, 256, 8, 4), (4, 512, 4, 3), (32, 64, 4, 4)]]
    dot = [triton.Config({"BLOCK_N": bn, "BLOCK_KB": bkb, "USE_DOT": True}, num_warps=w, num_stages=st)
           for bn, bkb, w, st in [(16, 128, 4, 4), (32, 128, 4, 4), (32, 64, 4, 5), (64, 64, 4, 4), (16, 256, 4, 3),
                                  (64, 128, 8, 3)]]
    return fma + dot


# Under the interpreter one small config of each kind, chosen by the row count (no timing there).
_CONFIGS = _configs() if not interpreting() else [
    triton.Config({"BLOCK_N": 8, "BLOCK_KB": 32, "USE_DOT": False}, num_warps=4),
    triton.Config({"BLOCK_N": 16, "BLOCK_KB": 32, "USE_DOT": True}, num_warps=4)]


def _prune(configs, named_args, **kwargs):
    # One row: both kinds compete; more rows: tensor-core dots only. A K-block must sit inside one
    # scale group (the group's scale is applied per block).
    m = named_args["M"]
    group = kwargs.get("GROUP_K", named_args.get("GROUP_K", 0))
    keep = [c for c in configs if (m == 1 or c.kwargs["USE_DOT"]) and
            (group == 0 or group % (2 * c.kwargs["BLOCK_KB"]) == 0)]
    if interpreting():
        keep = [c for c in keep if c.kwargs["USE_DOT"] == (m > 1)]
    return keep or configs[-1:]


@triton.jit
def _load_rows(ptrs, row_mask, col_mask, EVEN_K: tl.constexpr):
    """A (rows, bytes) tile of packed weights; without a mask on K when the block divides it (so
    the compiler can prove the 16-byte alignment that wide loads need)."""
    if EVEN_K:
        tile = tl.load(ptrs, mask=row_mask[:, None], other=0)
    else:
        tile = tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0)
    return tile


@triton.jit
def _nibbles(w_bytes):
    """(element 2j, element 2j + 1) of packed bytes as int32, sign-extended from 4 bits."""
    w = w_bytes.to(tl.int32)
    return ((w & 0xF) ^ 8) - 8, (((w >> 4) & 0xF) ^ 8) - 8


@triton.jit
def _one_row_block(a_ptr, w_tile, kb0, offs_b, n_mask, k_bytes, K, EVEN_K: tl.constexpr):
    """(BLOCK_N, BLOCK_KB) float32 products of one row's K-block with the weight rows' block at kb0."""
    b = kb0 + offs_b
    w_low, w_high = _nibbles(_load_rows(w_tile + kb0, n_mask, b < k_bytes, EVEN_K))
    k_even = 2 * b
    x_even = tl.load(a_ptr + k_even, mask=k_even < K, other=0).to(tl.float32)
    x_odd = tl.load(a_ptr + k_even + 1, mask=k_even + 1 < K, other=0).to(tl.float32)
    return w_low.to(tl.float32) * x_even[None, :] + w_high.to(tl.float32) * x_odd[None, :]


@triton.autotune(configs=_CONFIGS, key=["N", "K", "M_ONE", "GROUP_K", "INT_ACT"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.heuristics({"EVEN_K": lambda a: a["K"] % (2 * a["BLOCK_KB"]) == 0})
@triton.jit
def _w4_gemv_kernel(
    a_ptr, w_ptr, w_scale_ptr, a_scale_ptr, bias_ptr, c_ptr,
    M, N, K, M_ONE,
    stride_am, stride_wn, stride_sn, stride_sg, stride_cm,
    GROUP_K: tl.constexpr, INT_ACT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, USE_DOT: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, BLOCK_KB)
    n_mask = offs_n < N
    k_bytes = (K + 1) // 2
    dot_t = tl.bfloat16 if DOT_BF16 else tl.float16
    if USE_DOT:
        offs_m = tl.arange(0, 16)
        m_mask = offs_m < M
        a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am
        # Rows of W as they lie in memory (wide contiguous loads), transposed in registers for the dot.
        w_tile = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_b[None, :]
        acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        for kb0 in range(0, k_bytes, BLOCK_KB):
            b = kb0 + offs_b
            w_low, w_high = _nibbles(tl.trans(_load_rows(w_tile + kb0, n_mask, b < k_bytes, EVEN_K)))
            w_low, w_high = w_low.to(dot_t), w_high.to(dot_t)
            k_even = 2 * b
            a_even = tl.load(a_rows + k_even[None, :], mask=m_mask[:, None] & (k_even[None, :] < K), other=0)
            a_odd = tl.load(a_rows + k_even[None, :] + 1, mask=m_mask[:, None] & (k_even[None, :] + 1 < K), other=0)
            part = tl.dot(a_even.to(dot_t), w_low, out_dtype=tl.float32)
            part = tl.dot(a_odd.to(dot_t), w_high, acc=part, out_dtype=tl.float32)
            if GROUP_K == 0:
                acc += part
            else:
                s = tl.load(w_scale_ptr + offs_n * stride_sn + ((2 * kb0) // GROUP_K) * stride_sg, mask=n_mask,
                            other=0.0)
                acc += part * s.to(tl.float32)[None, :]
    else:
        offs_m = tl.arange(0, 1)
        m_mask = offs_m < M
        w_tile = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_b[None, :]
        acc2 = tl.zeros((BLOCK_N, BLOCK_KB), dtype=tl.float32)
        for kb0 in range(0, k_bytes, BLOCK_KB):
            part = _one_row_block(a_ptr, w_tile, kb0, offs_b, n_mask, k_bytes, K, EVEN_K)
            if GROUP_K == 0:
                acc2 += part
            else:
                s = tl.load(w_scale_ptr + offs_n * stride_sn + ((2 * kb0) // GROUP_K) * stride_sg, mask=n_mask,
                            other=0.0)
                acc2 += part * s.to(tl.float32)[:, None]
        acc = tl.reshape(tl.sum(acc2, axis=1), (1, BLOCK_N))
    if GROUP_K == 0:
        acc = acc * tl.load(w_scale_ptr + offs_n * stride_sn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if INT_ACT:
        acc = acc * tl.load(a_scale_ptr + offs_m, mask=m_mask, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def w4_gemv(x: torch.Tensor, x_scale: torch.Tensor | None, w_packed: torch.Tensor, w_scale: torch.Tensor,
            bias: torch.Tensor | None, group_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    """y (..., N) for x (..., K) of at most 16 rows: int8 codes with ``x_scale``, or float x with None.

    Arguments as ``gemm.w4a_int_linear_torch`` / ``w4a16_linear_torch`` (checked by their callers).
    """
    k, n = x.shape[-1], w_packed.shape[0]
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m > MAX_M:
        raise ValueError(f"w4_gemv takes at most {MAX_M} rows, got {m}; use the GEMM paths")
    c = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m and n:
        w_scale = w_scale.contiguous()
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        # The interpreter has no bfloat16 matmul (numpy multiplies raw bits): float16 there, exact for codes.
        dot_bf16 = x.dtype == torch.bfloat16 and not interpreting()
        _w4_gemv_kernel[grid](
            x2, w_packed, w_scale, x_scale.reshape(-1).contiguous() if x_scale is not None else w_scale,
            bias if bias is not None else w_scale, c,
            m, n, k, int(m == 1), x2.stride(0), w_packed.stride(0), w_scale.stride(0), w_scale.stride(1), c.stride(0),
            GROUP_K=0 if group_size == k else group_size, INT_ACT=x_scale is not None,
            HAS_BIAS=bias is not None, DOT_BF16=dot_bf16,
        )
    return c.reshape(*x.shape[:-1], n)


def _split_configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_N": bn, "BLOCK_KB": bkb, "SPLIT_K": sk}, num_warps=4, num_stages=st)
            for bn, bkb, st in [(8, 256, 3), (16, 128, 3), (16, 256, 3), (32, 128, 4), (8, 512, 2)]
            for sk in (2, 4, 8)]


@triton.autotune(configs=_split_configs() if not interpreting() else
                 [triton.Config({"BLOCK_N": 8, "BLOCK_KB": 32, "SPLIT_K": 3}, num_warps=4)],
                 key=["N", "K"], reset_to_zero=["acc_ptr"])
@triton.heuristics({"EVEN_K": lambda a: a["K"] % (2 * a["SPLIT_K"] * a["BLOCK_KB"]) == 0})
@triton.jit
def _w4_gemv_split_kernel(
    a_ptr, w_ptr, acc_ptr, N, K, stride_wn,
    BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, BLOCK_KB)
    n_mask = offs_n < N
    k_bytes = (K + 1) // 2
    # Each split owns a run of whole K-blocks; the last may be short or empty.
    blocks = tl.cdiv(k_bytes, BLOCK_KB)
    per_split = tl.cdiv(blocks, SPLIT_K)
    first = pid_k * per_split * BLOCK_KB
    last = tl.minimum(first + per_split * BLOCK_KB, k_bytes)
    w_tile = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_b[None, :]
    acc2 = tl.zeros((BLOCK_N, BLOCK_KB), dtype=tl.float32)
    for kb0 in range(first, last, BLOCK_KB):
        acc2 += _one_row_block(a_ptr, w_tile, kb0, offs_b, n_mask, k_bytes, K, EVEN_K)
    tl.atomic_add(acc_ptr + offs_n, tl.sum(acc2, axis=1), mask=n_mask)


def w4_gemv_split(x_q: torch.Tensor, x_scale: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """y (1, N) for one row of int8 codes, per-channel ``w_scale`` (N, 1), K split over programs."""
    k, n = x_q.shape[-1], w_packed.shape[0]
    x2 = x_q.reshape(-1, k).contiguous()
    if x2.shape[0] != 1 or x_q.dtype != torch.int8 or w_scale.shape[-1] != 1:
        raise ValueError("w4_gemv_split takes one row of int8 codes and one weight scale per output channel")
    acc = torch.zeros((1, n), dtype=torch.float32, device=x_q.device)
    if n:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        _w4_gemv_split_kernel[grid](x2, w_packed, acc, n, k, w_packed.stride(0))
    return scale_epilogue(acc, x_scale, w_scale, bias, out_dtype).reshape(*x_q.shape[:-1], n)
