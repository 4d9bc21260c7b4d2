"""INT4-weight GEMMs on the vendor's tensor-core GEMMs (cuBLASLt through torch), for many tokens.

Neither Triton nor cuBLAS has an INT4 tensor-core MMA on Hopper, and the 8-bit units run at twice
the 16-bit rate, so beyond a few tokens (``routes.py`` says where) the fastest exact route is to
widen the packed codes to an 8-bit type for the call (``int4.unpack_int4_to``, one pass over N·K
bytes, dropped afterwards) and hand the product to a tuned library GEMM. (Measured on an H200,
BENCHMARKS.md: the float8 GEMM is faster than fp16 from 2048 tokens on; cuBLASLt's int8 GEMM ran
no faster than fp16.)

* ``w4a4_fp8_linear``: 4-bit codes −8..7 are exact in ``float8_e4m3fn`` (3 mantissa bits hold
  integers up to 16), so ``torch._scaled_mm`` with row-wise scales (tokens × channels) computes
  ``Σ x_q·w_q`` in float32 and applies ``x_scale[m] · w_scale[n]`` in its epilogue. Sums of
  products up to 64 stay below 2^24 for K < 262 144, so the accumulator holds the integer exactly
  (``use_fast_accum=False``: cuBLAS promotes partial sums to full float32).
* ``w4a8_int8_linear``: 8-bit codes are not exact in float8, so ``torch._int_mm`` (int8 × int8 →
  int32) computes the dot product, and one fused epilogue applies the scales and bias.

Both need one scale per output channel (``group_size == K``): a per-group weight scale cannot be
applied after the sum. They match the references up to the order of the float32 scale products.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from asaf_fx.triton_kernels._runtime import interpreting
from asaf_fx.triton_kernels.int4 import unpack_int4_to

FP8 = torch.float8_e4m3fn
log = logging.getLogger(__name__)


def fp8_supported(device: torch.device) -> bool:
    """float8 tensor cores: compute capability 8.9 (Ada) or 9.0+ (Hopper); the CPU kernel is exact too."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.is_contiguous() else x2.contiguous()


def w4a4_fp8_linear(x_q: torch.Tensor, x_scale: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """W4A4 with per-channel weight scales on float8 tensor cores (see module docstring)."""
    k, n = x_q.shape[-1], w_packed.shape[0]
    a = codes_to_fp8(_rows(x_q))
    w = unpack_int4_to(w_packed, k, FP8)  # (N, K) row-major = the column-major (K, N) operand cuBLAS wants
    y = _rowwise(a, w, x_scale, w_scale, out_dtype)
    if y is None:
        one = torch.ones((), dtype=torch.float32, device=a.device)
        acc = torch._scaled_mm(a, w.t(), scale_a=one, scale_b=one, out_dtype=torch.float32, use_fast_accum=False)
        return scale_epilogue(acc, x_scale, w_scale, bias, out_dtype).reshape(*x_q.shape[:-1], n)
    if bias is not None:
        y = (y.to(torch.float32) + bias.to(torch.float32)).to(out_dtype)
    return y.to(out_dtype).reshape(*x_q.shape[:-1], n)


@triton.jit
def _codes_to_fp8_kernel(x_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    # Through float16 (exact for integer codes): Triton converts to float8 only from floating types.
    x = tl.load(x_ptr + offs, mask=mask, other=0).to(tl.float16)
    tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)


def codes_to_fp8(x_q: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-16, 16] as float8_e4m3fn (exact), in one vectorised pass on the GPU.

    torch's generic int8 → float8 copy moved about 0.7 TB/s (read + written) in a Llama-2-7B
    prefill profile on an H200, a sixth of the memory's bandwidth (BENCHMARKS.md).
    """
    if not x_q.is_cuda:
        return x_q.to(FP8)
    out = torch.empty(x_q.shape, dtype=FP8, device=x_q.device)
    numel = x_q.numel()
    if numel:
        _codes_to_fp8_kernel[(triton.cdiv(numel, 4096),)](x_q, out, numel, BLOCK=4096)
    return out


# (device type, wanted dtype) -> the output dtype _scaled_mm accepted with row-wise scales, or None
_ROWWISE_OUT: dict[tuple[str, torch.dtype], torch.dtype | None] = {}


def _rowwise(a, w, x_scale, w_scale, out_dtype):
    """``_scaled_mm`` with (M, 1) × (1, N) scales, writing ``out_dtype`` when cuBLASLt offers it
    (one pass), else float32; None when row-wise scaling is refused altogether. Versions of torch
    differ in which output dtypes they accept with row-wise scales, so the first call finds out.

    On the CPU the scales are left to :func:`scale_epilogue`: the oneDNN kernel behind
    ``_scaled_mm`` there may apply them before the sum (on an AVX-512/AMX Xeon its results were
    up to 7e-6 relative off the exact integer sum scaled afterwards), so the CPU, which stands in
    for the GPU in the exactness tests, keeps the route's integer sum exact."""
    if a.device.type == "cpu":
        return None
    key = (a.device.type, out_dtype)
    tried = [_ROWWISE_OUT[key]] if key in _ROWWISE_OUT else list(dict.fromkeys((out_dtype, torch.float32)))
    scale_a = x_scale.reshape(-1, 1).to(torch.float32).contiguous()
    scale_b = w_scale.reshape(1, -1).to(torch.float32).contiguous()
    for dtype in tried:
        if dtype is None:
            break
        try:
            y = torch._scaled_mm(a, w.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=dtype, use_fast_accum=False)
        except RuntimeError as exc:
            log.warning("torch._scaled_mm refused row-wise scales with %s output: %s", dtype, str(exc).splitlines()[0])
            continue
        _ROWWISE_OUT[key] = dtype
        return y
    _ROWWISE_OUT[key] = None
    return None


@triton.jit
def _scale_epilogue_kernel(acc_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N,
                           HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    idx = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    acc = tl.load(acc_ptr + idx, mask=mask, other=0).to(tl.float32)
    ws = tl.load(w_scale_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    xs = tl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=0.0)
    y = acc * ws[None, :] * xs[:, None]  # the reference's order: (sum · w_scale) · x_scale
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + idx, y.to(out_ptr.dtype.element_ty), mask=mask)


def scale_epilogue(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """``(acc · w_scale[n]) · x_scale[m] (+ bias[n])`` in float32, written as ``out_dtype``, in one pass."""
    m, n = acc.shape
    xs = x_scale.reshape(-1).to(torch.float32).contiguous()
    ws = w_scale.reshape(-1).contiguous()
    if not (acc.is_cuda or interpreting()):
        y = acc.to(torch.float32) * ws.to(torch.float32)[None, :] * xs[:, None]
        return (y if bias is None else y + bias.to(torch.float32)).to(out_dtype)
    out = torch.empty((m, n), dtype=out_dtype, device=acc.device)
    if m and n:
        grid = (triton.cdiv(m, 32), triton.cdiv(n, 128))
        _scale_epilogue_kernel[grid](acc.contiguous(), xs, ws, bias if bias is not None else ws, out, m, n,
                                     HAS_BIAS=bias is not None, BLOCK_M=32, BLOCK_N=128)
    return out


def w4a8_int8_linear(x_q: torch.Tensor, x_scale: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """W4A4/W4A8 with per-channel weight scales on int8 tensor cores (``torch._int_mm``)."""
    k, n = x_q.shape[-1], w_packed.shape[0]
    a = _rows(x_q)
    w = unpack_int4_to(w_packed, k, torch.int8)
    acc = torch._int_mm(a, w.t())
    return scale_epilogue(acc, x_scale, w_scale, bias, out_dtype).reshape(*x_q.shape[:-1], n)


def int_mm_shape_ok(m: int, k: int, n: int) -> bool:
    """cuBLASLt's int8 GEMM through torch: more than 16 rows, K and N multiples of 8."""
    return m > 16 and k % 8 == 0 and n % 8 == 0


def fp8_shape_ok(m: int, k: int, n: int) -> bool:
    """torch._scaled_mm: K and N multiples of 16."""
    return k % 16 == 0 and n % 16 == 0
