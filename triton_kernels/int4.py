"""INT4 weight storage: nibble packing and unpacking, and the scale layout the kernels read.

The codes themselves come from the weight quantizers in ``asaf_fx.passes.quantize`` (RTN, GPTQ).

Packed layout (used by every INT4 kernel here):

* A logical int4 tensor ``q`` of shape (..., K) with values in [-8, 7] is stored as ``uint8`` of
  shape (..., ceil(K / 2)).
* Byte ``j`` holds element ``2j`` in its low nibble (bits 0-3) and element ``2j + 1`` in its high
  nibble (bits 4-7), each as a 4-bit two's-complement number (-8 = 0b1000, -1 = 0b1111).
* If K is odd the high nibble of the last byte is 0, so a kernel may read it as a zero weight.

Weight scales: ``scale`` has shape (N, G) with G = ceil(K / group_size); element (n, k) of the
real weight is ``q[n, k] * scale[n, k // group_size]``. ``group_size = K`` (G = 1) is per output
channel. Scales are any float dtype; kernels read them as float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

INT4_MIN, INT4_MAX = -8, 7


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 values (int8 tensor in [-8, 7], shape (..., K)) into uint8 (..., ceil(K/2)).

    Exact and invertible: ``unpack_int4(pack_int4(q), q.shape[-1]) == q``.
    """
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4 needs int8 values in [-8, 7], got dtype {q.dtype}; cast with .to(torch.int8)")
    if q.dim() == 0:
        raise ValueError("pack_int4 needs at least one dimension (the packed axis is the last one)")
    if q.numel() and (int(q.min()) < INT4_MIN or int(q.max()) > INT4_MAX):
        raise ValueError(f"pack_int4 values must lie in [-8, 7], got [{int(q.min())}, {int(q.max())}]")
    k = q.shape[-1]
    if k % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    nibbles = q.to(torch.int16) & 0xF  # two's complement in 4 bits
    packed = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    return packed.to(torch.uint8)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 (..., ceil(k/2)) → int8 (..., k) in [-8, 7]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 needs the uint8 tensor made by pack_int4, got dtype {packed.dtype}")
    if packed.shape[-1] != (k + 1) // 2:
        raise ValueError(f"{k} int4 values pack into {(k + 1) // 2} bytes, but the last axis has {packed.shape[-1]}")
    b = packed.to(torch.int16)
    low = ((b & 0xF) ^ 8) - 8  # sign-extend a 4-bit two's-complement nibble
    high = (((b >> 4) & 0xF) ^ 8) - 8
    q = torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], -1)
    return q[..., :k].to(torch.int8).contiguous()


def num_groups(k: int, group_size: int) -> int:
    """G = ceil(k / group_size): the number of scale columns for width k."""
    return -(-k // group_size)


def check_group_size(k: int, group_size: int) -> None:
    """Group sizes the kernels accept: k itself (per channel) or a positive multiple of 64.

    Multiples of 64 let every K-block of the GEMM lie inside one group, so the per-group scale is
    applied once per block to an exact int32 partial sum.
    """
    if group_size != k and (group_size <= 0 or group_size % 64):
        raise ValueError(
            f"group_size must equal K={k} (per output channel) or be a positive multiple of 64, got {group_size}"
        )


def dequantize_weight_int4(packed: torch.Tensor, scale: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """float32 (N, K) weight ``q[n, k] * scale[n, k // group_size]`` from the packed form."""
    q = unpack_int4(packed, k).to(torch.float32)
    cols = torch.arange(k, device=packed.device) // group_size
    return q * scale.to(torch.float32)[:, cols]


# ------------------------------------------------------------------------- unpack on the device


@triton.jit
def _unpack_int4_kernel(p_ptr, out_ptr, N, K, KB, stride_pn, stride_on,
                        BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.program_id(1) * BLOCK_KB + tl.arange(0, BLOCK_KB)
    mask = (offs_n[:, None] < N) & (offs_b[None, :] < KB)
    b = tl.load(p_ptr + offs_n[:, None].to(tl.int64) * stride_pn + offs_b[None, :], mask=mask, other=0).to(tl.int32)
    low = ((b & 0xF) ^ 8) - 8
    high = (((b >> 4) & 0xF) ^ 8) - 8
    # (BLOCK_N, BLOCK_KB, 2) → (BLOCK_N, 2·BLOCK_KB): element 2j then 2j + 1, the logical order.
    q = tl.reshape(tl.join(low, high), (BLOCK_N, 2 * BLOCK_KB))
    offs_k = 2 * tl.program_id(1) * BLOCK_KB + tl.arange(0, 2 * BLOCK_KB)
    out = out_ptr + offs_n[:, None].to(tl.int64) * stride_on + offs_k[None, :]
    # Through float16 (exact for -8..7): Triton converts to float8 only from floating types.
    tl.store(out, q.to(tl.float16).to(out_ptr.dtype.element_ty), mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))


def unpack_int4_to(packed: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """``unpack_int4(packed, k).to(dtype)`` in one pass on the GPU (or under the interpreter).

    The GEMMs on vendor libraries read int8 or float8 operands; this widens the packed codes for
    one call and the result is dropped after it, so only the packed weights stay resident.
    """
    from asaf_fx.triton_kernels._runtime import interpreting

    if not (packed.is_cuda or interpreting()) or (dtype.itemsize == 1 and dtype.is_floating_point and interpreting()):
        return unpack_int4(packed, k).to(dtype)  # the interpreter cannot store float8
    if packed.dtype != torch.uint8 or packed.shape[-1] != (k + 1) // 2:
        raise ValueError(f"unpack_int4_to needs the uint8 (..., {(k + 1) // 2}) tensor from pack_int4, "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    p2 = packed.reshape(-1, packed.shape[-1])
    if not p2.is_contiguous():
        p2 = p2.contiguous()
    n, kb = p2.shape
    out = torch.empty((n, k), dtype=dtype, device=packed.device)
    if n and k:
        block_n, block_kb = 32, 64
        grid = (triton.cdiv(n, block_n), triton.cdiv(kb, block_kb))
        _unpack_int4_kernel[grid](p2, out, n, k, kb, p2.stride(0), out.stride(0), BLOCK_N=block_n, BLOCK_KB=block_kb)
    return out.reshape(*packed.shape[:-1], k)
