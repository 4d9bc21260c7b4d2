"""Asymmetric KV-cache quantization per token and channel group (4 or 8 bits).

x (..., D) is split along its last axis into G = D / group_size contiguous groups (group_size =
head_dim gives one group per token and head). For each group, in float32:
``lo = min(x)``, ``scale = (max(x) - lo) / (2^bits - 1)``,
``q = clamp(round_half_even((x - lo) / scale), 0, 2^bits - 1)`` (a constant group gets scale 0 and
q = 0). Dequantization is ``q * scale + lo``, which returns min exactly and is off by at most
scale / 2 elsewhere.

Storage: ``q`` is uint8 (..., D) for 8 bits; for 4 bits two unsigned nibbles per byte,
(..., D / 2), element 2j in the low nibble of byte j and 2j + 1 in the high one (the INT4 weight
layout of ``int4.py``, but unsigned). ``scale`` and ``zero`` (= lo) are float32 (..., G).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from asaf_fx.triton_kernels._runtime import divide_rn, next_pow2, round_half_even
from asaf_fx.triton_kernels.quantize import FLOAT_DTYPES


def _check(d: int, bits: int, group_size: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"KV-cache bits must be 4 or 8, got {bits}")
    if group_size <= 0 or d % group_size:
        raise ValueError(f"group_size must be positive and divide the last axis ({d}), got {group_size}")
    if bits == 4 and group_size % 2:
        raise ValueError(f"4-bit KV packing needs an even group_size, got {group_size}")


def kv_quantize_torch(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference: ``(q uint8, scale float32 (..., G), zero float32 (..., G))`` (module docstring)."""
    if x.dtype not in FLOAT_DTYPES or x.dim() < 1:
        raise TypeError(f"kv_quantize needs a float16/bfloat16/float32 tensor (..., D), got {x.dtype} {tuple(x.shape)}")
    d = x.shape[-1]
    _check(d, bits, group_size)
    xg = x.to(torch.float32).reshape(*x.shape[:-1], d // group_size, group_size)
    lo = xg.amin(-1)
    scale = divide_rn(xg.amax(-1) - lo, 2**bits - 1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((xg - lo[..., None]) / safe[..., None]).clamp(0, 2**bits - 1).to(torch.uint8)
    q = q.reshape(x.shape)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return q.contiguous(), scale, lo


def kv_dequantize_torch(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """Reference inverse: ``q * scale + zero`` per group, in float32, cast to ``dtype``."""
    d = _check_dequant(q, scale, zero, bits, group_size, dtype)
    if bits == 4:
        q = torch.stack((q & 0xF, q >> 4), dim=-1).reshape(*q.shape[:-1], d)
    qg = q.to(torch.float32).reshape(*q.shape[:-1], d // group_size, group_size)
    return (qg * scale[..., None] + zero[..., None]).reshape(*q.shape[:-1], d).to(dtype)


def _check_dequant(q, scale, zero, bits, group_size, dtype) -> int:
    """Validate dequantization inputs; returns D."""
    if q.dtype != torch.uint8:
        raise TypeError(f"q must be the uint8 tensor from kv_quantize, got {q.dtype}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    if scale.dtype != torch.float32 or zero.dtype != torch.float32 or scale.shape != zero.shape:
        raise TypeError("scale and zero must be float32 tensors of the same shape, as kv_quantize returns them")
    d = scale.shape[-1] * group_size
    _check(d, bits, group_size)
    if q.shape[:-1] != scale.shape[:-1] or q.shape[-1] != d * bits // 8:
        raise ValueError(f"q has shape {tuple(q.shape)}; scale {tuple(scale.shape)} with group_size {group_size} "
                         f"at {bits} bits needs {(*scale.shape[:-1], d * bits // 8)}")
    return d


@triton.jit
def _kv_quant_kernel(
    x_ptr, q_ptr, scale_ptr, zero_ptr,
    n_groups,
    GS: tl.constexpr, HALF_P: tl.constexpr, BITS: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Rows are (token, group) pairs of GS contiguous values; even and odd positions load apart so
    # the 4-bit path can pack them into one byte without shuffling registers.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.arange(0, HALF_P)
    rmask = rows < n_groups
    mask = rmask[:, None] & (j[None, :] < GS // 2)
    # One contiguous load of each row, split into even and odd positions in registers.
    k = tl.arange(0, 2 * HALF_P)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * GS + k[None, :], mask=rmask[:, None] & (k[None, :] < GS),
                other=0.0).to(tl.float32)
    xe, xo = tl.split(tl.reshape(x, (BLOCK_R, HALF_P, 2)))
    inf = float("inf")
    lo = tl.min(tl.minimum(tl.where(mask, xe, inf), tl.where(mask, xo, inf)), axis=1)
    hi = tl.max(tl.maximum(tl.where(mask, xe, -inf), tl.where(mask, xo, -inf)), axis=1)
    # Rows past the end would give inf - inf below; give them a harmless range.
    lo = tl.where(rmask, lo, 0.0)
    hi = tl.where(rmask, hi, 0.0)
    qmax: tl.constexpr = (1 << BITS) - 1
    scale = tl.math.div_rn(hi - lo, qmax * 1.0)
    safe = tl.where(scale > 0.0, scale, 1.0)
    qe = round_half_even(tl.math.div_rn(xe - lo[:, None], safe[:, None]))
    qo = round_half_even(tl.math.div_rn(xo - lo[:, None], safe[:, None]))
    qe = tl.minimum(tl.maximum(qe, 0.0), qmax * 1.0).to(tl.int32)
    qo = tl.minimum(tl.maximum(qo, 0.0), qmax * 1.0).to(tl.int32)
    if BITS == 4:
        tl.store(q_ptr + rows[:, None].to(tl.int64) * (GS // 2) + j[None, :], (qe | (qo << 4)).to(tl.uint8), mask=mask)
    else:
        q = tl.reshape(tl.join(qe, qo), (BLOCK_R, 2 * HALF_P))
        tl.store(q_ptr + rows[:, None].to(tl.int64) * GS + k[None, :], q.to(tl.uint8),
                 mask=rmask[:, None] & (k[None, :] < GS))
    tl.store(scale_ptr + rows, scale, mask=rmask)
    tl.store(zero_ptr + rows, lo, mask=rmask)


@triton.jit
def _kv_dequant_kernel(
    q_ptr, scale_ptr, zero_ptr, out_ptr,
    n_groups,
    GS: tl.constexpr, HALF_P: tl.constexpr, BITS: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.arange(0, HALF_P)
    rmask = rows < n_groups
    mask = rmask[:, None] & (j[None, :] < GS // 2)
    if BITS == 4:
        b = tl.load(q_ptr + rows[:, None].to(tl.int64) * (GS // 2) + j[None, :], mask=mask, other=0).to(tl.int32)
        qe, qo = b & 0xF, b >> 4
    else:
        qbase = q_ptr + rows[:, None].to(tl.int64) * GS + 2 * j[None, :]
        qe = tl.load(qbase, mask=mask, other=0).to(tl.int32)
        qo = tl.load(qbase + 1, mask=mask, other=0).to(tl.int32)
    s = tl.load(scale_ptr + rows, mask=rmask, other=0.0)[:, None]
    z = tl.load(zero_ptr + rows, mask=rmask, other=0.0)[:, None]
    # Interleave even and odd positions in registers: one contiguous store of each row.
    out = tl.reshape(tl.join(qe.to(tl.float32) * s + z, qo.to(tl.float32) * s + z), (BLOCK_R, 2 * HALF_P))
    k = tl.arange(0, 2 * HALF_P)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * GS + k[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & (k[None, :] < GS))


def _grid_args(n_groups: int, group_size: int) -> tuple[tuple[int], dict]:
    half_p = next_pow2(max(1, group_size // 2))
    block_r = max(1, min(64, 4096 // (2 * half_p)))
    return (triton.cdiv(n_groups, block_r),), {"GS": group_size, "HALF_P": half_p, "BLOCK_R": block_r}


def kv_quantize_triton(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton kernel for :func:`kv_quantize_torch` (same signature, identical results)."""
    if x.dtype not in FLOAT_DTYPES or x.dim() < 1:
        raise TypeError(f"kv_quantize needs a float16/bfloat16/float32 tensor (..., D), got {x.dtype} {tuple(x.shape)}")
    d = x.shape[-1]
    _check(d, bits, group_size)
    if bits == 8 and group_size % 2:
        # The kernel walks values in (even, odd) pairs; an odd 8-bit group has no fast path.
        return kv_quantize_torch(x, bits, group_size)
    x = x.contiguous()
    lead = x.shape[:-1]
    q = torch.empty((*lead, d * bits // 8), dtype=torch.uint8, device=x.device)
    scale = torch.empty((*lead, d // group_size), dtype=torch.float32, device=x.device)
    zero = torch.empty_like(scale)
    n_groups = scale.numel()
    if n_groups:
        grid, meta = _grid_args(n_groups, group_size)
        _kv_quant_kernel[grid](x, q, scale, zero, n_groups, BITS=bits, **meta)
    return q, scale, zero


def kv_dequantize_triton(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """Triton kernel for :func:`kv_dequantize_torch` (same signature)."""
    d = _check_dequant(q, scale, zero, bits, group_size, dtype)
    if bits == 8 and group_size % 2:
        return kv_dequantize_torch(q, scale, zero, bits, group_size, dtype)
    q, scale, zero = q.contiguous(), scale.contiguous(), zero.contiguous()
    out = torch.empty((*q.shape[:-1], d), dtype=dtype, device=q.device)
    n_groups = scale.numel()
    if n_groups:
        grid, meta = _grid_args(n_groups, group_size)
        _kv_dequant_kernel[grid](q, scale, zero, out, n_groups, BITS=bits, **meta)
    return out
