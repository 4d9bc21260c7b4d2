"""Online rotation by H_{2^k} ⊗ R_m for any width n = 2^k · m (m odd).

``hadamard_rotate_torch(x, right)`` returns ``x @ kron(H / sqrt(2^k), right)`` along the last axis,
where H is the Sylvester Hadamard matrix of order 2^k and ``right`` an (m, m) orthogonal matrix
(a Hadamard matrix of order m scaled to be orthogonal, or a seeded random orthogonal one). The
product is orthogonal, so ``rotation_matrix(n, right)`` can be folded into the neighbouring weights
offline while the op runs online. Cost per row: n·log2(2^k) adds for the butterfly plus n·m
multiply-adds for the small dense factor.

``hadamard_rotate_triton`` is the same transform as a Triton kernel; ``rotate_quantize_*`` fuse it
with per-token symmetric quantization (``quantize.py``) of the float32 rotated row, so the rotated
activations never go to memory in floating point.

The kernel holds whole rows in registers as (2^k, next_pow2(m)) float32 tiles (several narrow rows
per program) and applies the dense factor as one float32-accurate tensor-core dot when the tile is
at least 16 × 16 (3×TF32 on a GPU), else as m rank-1 updates; its cost per row is about
2^k · next_pow2(m)² multiply-adds. Widths with a small odd factor are cheap (Llama: 4096 = 2^12,
14336 = 2^11·7, 11008 = 2^8·43); pruned widths should keep m small (e.g. round to a multiple of 64
or 128), since a width like 8 · 1125 makes the dense factor dominate. (The power-of-two factor as
two tensor-core dots, H_2^k = H_a ⊗ H_b, was measured 1.3× slower at 11008 and 7× at 4096 on an
H200: BENCHMARKS.md.)
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from asaf_fx.triton_kernels._runtime import interpreting, next_pow2, pick_configs, round_half_even
from asaf_fx.triton_kernels.quantize import check_act_quant_args, quantize_rows_torch


def split_width(n: int) -> tuple[int, int]:
    """n = 2^k · m with m odd; returns (2^k, m)."""
    if n <= 0:
        raise ValueError(f"rotation width must be positive, got {n}")
    power = n & -n
    return power, n // power


def _walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Sylvester Hadamard transform along axis -2 (length a power of two).

    Butterflies between two buffers: each stage writes a+b and a-b in place of a copying stack,
    which makes the offline rotation of a 49k-row embedding a few times faster, same bits.
    """
    *lead, size, m = x.shape
    rows = x.numel() // (size * m) if x.numel() else 0
    src = x.reshape(rows, size, m)
    dst = None  # never the input: the first two stages each get a new buffer
    h = 1
    while h < size:
        if h <= 2:
            dst = torch.empty((rows, size, m), dtype=x.dtype, device=x.device)
        s, d = src.reshape(rows, size // (2 * h), 2, h, m), dst.view(rows, size // (2 * h), 2, h, m)
        torch.add(s[:, :, 0], s[:, :, 1], out=d[:, :, 0])
        torch.sub(s[:, :, 0], s[:, :, 1], out=d[:, :, 1])
        src, dst = dst, src
        h *= 2
    return src.reshape(*lead, size, m)


def _rotate_compute(x: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """The rotation in float32 (float64 stays float64), before the cast back to x.dtype."""
    n = x.shape[-1]
    power, m = split_width(n)
    if right.shape != (m, m):
        raise ValueError(f"width {n} = {power}·{m} needs a ({m}, {m}) right factor, got {tuple(right.shape)}")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(compute).reshape(*x.shape[:-1], power, m)
    if m > 1:
        y = y @ right.to(device=x.device, dtype=compute)
    y = _walsh_hadamard(y) * (1.0 / math.sqrt(power))
    return y.reshape(x.shape)


def hadamard_rotate_torch(x: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """x @ kron(H_{2^k} / sqrt(2^k), right), computed in float32 (float64 stays float64)."""
    return _rotate_compute(x, right).to(x.dtype)


def sylvester_hadamard(power: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The unnormalised Sylvester Hadamard matrix of order ``power`` (a power of two)."""
    if power & (power - 1):
        raise ValueError(f"Sylvester Hadamard needs a power of two, got {power}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < power:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def rotation_matrix(n: int, right: torch.Tensor) -> torch.Tensor:
    """The dense (n, n) orthogonal matrix R with ``hadamard_rotate_torch(x, right) == x @ R``."""
    power, m = split_width(n)
    h = sylvester_hadamard(power).to(right.device) / math.sqrt(power)
    return torch.kron(h, right.to(torch.float64).contiguous())


def rotate_quantize_torch(
    x: torch.Tensor, right: torch.Tensor, bits: int, clip_ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: per-token quantization of the float32 rotation of x (not of its cast to x.dtype).

    Returns ``(q int8 x.shape, scale float32 x.shape[:-1])`` with
    ``q * scale[..., None] ≈ hadamard_rotate_torch(x.float(), right)``.
    """
    check_act_quant_args(x, bits, clip_ratio)
    return quantize_rows_torch(_rotate_compute(x, right).to(torch.float32), bits, clip_ratio)


# Warps per program, chosen by timing on the first call of each shape. A wide row is one program
# holding 2^k · next_pow2(m) float32 values (16 384 for Llama-2's 11008 and Llama-3's 14336): for
# sm_90, ptxas gives it 255 registers and spills at 4 warps, 222-229 at 8 (one program per SM) and
# 90-124 at 16, so which count hides latency best is a question for the GPU, not for a rule.
_WARPS = pick_configs([triton.Config({}, num_warps=w) for w in (4, 8, 16)], triton.Config({}, num_warps=4))


@triton.autotune(configs=_WARPS, key=["M_ODD", "POWER", "MP", "BR", "QUANTIZE", "few_rows"])
@triton.jit
def _rotate_kernel(
    # pointers
    x_ptr, right_ptr, out_ptr, scale_ptr,
    # sizes, strides (rows are contiguous) and scalars; few_rows (≤ 16 rows, decode) is a tuning key
    rows, few_rows, stride_x, stride_out, inv_sqrt, clip_ratio,
    # meta-parameters: width n = POWER * M_ODD, MP = next power of two ≥ M_ODD, BR rows per program
    M_ODD: tl.constexpr, POWER: tl.constexpr, LOG2P: tl.constexpr, MP: tl.constexpr, BR: tl.constexpr,
    QUANTIZE: tl.constexpr, QMAX: tl.constexpr, DENSE_DOT: tl.constexpr, EXACT_DOT: tl.constexpr,
):
    # BR rows per program, each viewed as a (POWER, M_ODD) matrix Y: the rotation is H · Y · right.
    # Narrow rows (a 128-wide attention head) come many to a program, so a program has work.
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)[:, None, None]
    p = tl.arange(0, POWER)[None, :, None]
    c = tl.arange(0, MP)[None, None, :]
    rmask = r < rows
    cmask = c < M_ODD
    # One contiguous (BR, POWER, MP) load of the rows; padded columns read as zero.
    y = tl.load(x_ptr + r * stride_x + p * M_ODD + c, mask=rmask & cmask, other=0.0).to(tl.float32)
    if M_ODD > 1:
        if DENSE_DOT:
            # BR == 1: Y · right as one (POWER, MP) × (MP, MP) dot; right's padded rows and columns
            # are zero, so padded columns stay exactly zero (they must not enter the row maximum).
            rr = tl.arange(0, MP)[:, None]
            rc = tl.arange(0, MP)[None, :]
            right = tl.load(right_ptr + rr * M_ODD + rc, mask=(rr < M_ODD) & (rc < M_ODD), other=0.0)
            y2 = tl.reshape(y, (POWER, MP))
            if EXACT_DOT:
                y2 = tl.dot(y2, right, input_precision="ieee")
            else:
                y2 = tl.dot(y2, right, input_precision="tf32x3")  # float32-accurate on tensor cores
            y = tl.reshape(y2, (BR, POWER, MP))
        else:
            # Few columns: M_ODD rank-1 updates, each column taken from the loaded tile.
            acc = tl.zeros((BR, POWER, MP), dtype=tl.float32)
            for j in range(M_ODD):
                yj = tl.sum(tl.where(c == j, y, 0.0), axis=2, keep_dims=True)
                rj = tl.load(right_ptr + j * M_ODD + c, mask=cmask, other=0.0)
                acc += yj * rj
            y = acc
    # Walsh-Hadamard butterfly along the POWER axis. Each stage splits off the lowest index bit
    # (pairs 2r, 2r + 1 → a + b, a - b) and moves it to the top, a cyclic rotation of the index
    # bits; after LOG2P stages every bit was processed once and the order is back to normal.
    # Stage i thus handles original bit i, in the reference's order, so power-of-two widths match
    # it bit for bit. (A tl.gather of partners compiles super-linearly in POWER: ptxas ran out of
    # memory at 4096.)
    for _ in tl.static_range(LOG2P):
        pairs = tl.permute(tl.reshape(y, (BR, POWER // 2, 2, MP)), (0, 1, 3, 2))
        a, b = tl.split(pairs)
        y = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 3, 1, 2)), (BR, POWER, MP))
    y = y * inv_sqrt
    offs = r * stride_out + p * M_ODD + c
    if QUANTIZE:
        amax = tl.max(tl.max(tl.abs(y), axis=2, keep_dims=True), axis=1, keep_dims=True)
        scale = tl.math.div_rn(amax * clip_ratio, QMAX * 1.0)
        safe = tl.where(scale > 0.0, scale, 1.0)
        q = round_half_even(tl.math.div_rn(y, safe))
        q = tl.minimum(tl.maximum(q, -QMAX - 1.0), QMAX * 1.0)
        tl.store(out_ptr + offs, q.to(out_ptr.dtype.element_ty), mask=rmask & cmask)
        tl.store(scale_ptr + r, scale, mask=rmask)
    else:
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=rmask & cmask)


def _launch_rotate(x: torch.Tensor, right: torch.Tensor, out: torch.Tensor, scale: torch.Tensor | None,
                   bits: int, clip_ratio: float) -> None:
    n = x.shape[-1]
    power, m = split_width(n)
    if right.shape != (m, m):
        raise ValueError(f"width {n} = {power}·{m} needs a ({m}, {m}) right factor, got {tuple(right.shape)}")
    x2 = x.reshape(-1, n)
    rows = x2.shape[0]
    if rows == 0:
        return
    mp = next_pow2(m)
    br = max(1, min(64, 2048 // (power * mp)))
    dense_dot = br == 1 and m > 1 and mp >= 16 and power >= 16  # tl.dot needs 16-wide tiles
    _rotate_kernel[(triton.cdiv(rows, br),)](
        x2, right.to(device=x.device, dtype=torch.float32).contiguous(), out, scale if scale is not None else out,
        rows, int(rows <= 16), x2.stride(0), n, 1.0 / math.sqrt(power), float(clip_ratio),
        M_ODD=m, POWER=power, LOG2P=power.bit_length() - 1, MP=mp, BR=br,
        QUANTIZE=scale is not None, QMAX=2 ** (bits - 1) - 1, DENSE_DOT=dense_dot, EXACT_DOT=interpreting(),
    )


def hadamard_rotate_triton(x: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Triton kernel for :func:`hadamard_rotate_torch` (same signature and result up to float32
    summation order in the dense factor; bit-identical when m = 1). float64 input has no fast
    path and goes to the reference."""
    if x.dtype == torch.float64:
        return hadamard_rotate_torch(x, right)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"hadamard_rotate needs a float tensor, got {x.dtype}")
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch_rotate(x, right, out, None, 8, 1.0)
    return out


def rotate_quantize_triton(
    x: torch.Tensor, right: torch.Tensor, bits: int, clip_ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused Triton kernel for :func:`rotate_quantize_torch`: one read of x, one int8 write."""
    check_act_quant_args(x, bits, clip_ratio)
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    _launch_rotate(x, right, q, scale, bits, clip_ratio)
    return q, scale
