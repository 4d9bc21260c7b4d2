"""Per-token symmetric activation quantization (INT4 or INT8 values stored in int8).

For each row x of the last axis: ``scale = max|x| * clip_ratio / qmax`` with qmax = 2^(bits-1) - 1,
``q = clamp(round_half_even(x / scale), -qmax - 1, qmax)``; a row of zeros gets scale 0 and q = 0.
All arithmetic is float32 with IEEE division, so the Triton kernel and the torch reference give
identical ``q`` and ``scale``. ``q * scale[..., None]`` approximates x; values beyond
``clip_ratio * max|x|`` saturate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from asaf_fx.triton_kernels._runtime import divide_rn, next_pow2, round_half_even

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_act_quant_args(x: torch.Tensor, bits: int, clip_ratio: float) -> None:
    """Raise a ValueError/TypeError that says what is wrong with activation-quantization inputs."""
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"activations must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"activations need a non-empty last axis, got shape {tuple(x.shape)}")
    if bits not in (4, 8):
        raise ValueError(f"activation bits must be 4 or 8, got {bits}")
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must lie in (0, 1], got {clip_ratio}")


def quantize_rows_torch(xf: torch.Tensor, bits: int, clip_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantization rule on a float32 tensor (shared with the rotate+quantize reference)."""
    qmax = 2 ** (bits - 1) - 1
    scale = divide_rn(xf.abs().amax(dim=-1) * clip_ratio, qmax)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xf / safe[..., None]).clamp(-qmax - 1, qmax).to(torch.int8)
    return q, scale


def quantize_per_token_torch(x: torch.Tensor, bits: int, clip_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: ``(q int8 x.shape, scale float32 x.shape[:-1])`` (see module docstring)."""
    check_act_quant_args(x, bits, clip_ratio)
    return quantize_rows_torch(x.to(torch.float32), bits, clip_ratio)


@triton.jit
def _quantize_per_token_kernel(
    # pointers
    x_ptr, q_ptr, scale_ptr,
    # sizes and strides (rows are contiguous)
    K, stride_x, stride_q,
    clip_ratio,
    # meta-parameters
    QMAX: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * stride can pass 2^31 for long prefills
    offs = tl.arange(0, BLOCK_K)
    # Pass 1: row maximum; pass 2: quantize. Two passes keep any K inside a fixed block.
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + row * stride_x + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.math.div_rn(tl.max(amax, axis=0) * clip_ratio, QMAX * 1.0)
    safe = tl.where(scale > 0.0, scale, 1.0)
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        x = tl.load(x_ptr + row * stride_x + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        q = round_half_even(tl.math.div_rn(x, safe))
        q = tl.minimum(tl.maximum(q, -QMAX - 1.0), QMAX * 1.0)
        tl.store(q_ptr + row * stride_q + k0 + offs, q.to(tl.int8), mask=mask)
    tl.store(scale_ptr + row, scale)


def quantize_per_token_triton(x: torch.Tensor, bits: int, clip_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton kernel with the signature and exact results of :func:`quantize_per_token_torch`."""
    check_act_quant_args(x, bits, clip_ratio)
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    q = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    if x2.shape[0]:
        _quantize_per_token_kernel[(x2.shape[0],)](
            x2, q, scale, k, x2.stride(0), q.stride(0), float(clip_ratio),
            QMAX=2 ** (bits - 1) - 1, BLOCK_K=min(1024, next_pow2(k)),
        )
    return q.reshape(x.shape), scale.reshape(x.shape[:-1])
