"""Which kernel runs an INT4 linear on a CUDA device, chosen from (kind, M, K, N, group size).

The rule is read off the kernel table of ``benchmarks/gemm_table.py`` on an H200 (BENCHMARKS.md,
Llama-2-7B widths 4096→11008 and 11008→4096, CUDA-graph timings):

* one token (batch-1 decode): the weight-streaming kernel ``gemv.w4_gemv``, which reads the packed
  weight once (1.50× / 1.04× torch fp16; the float8 route, which widens the weight first, 0.52×);
* more tokens, 4-bit activation codes, one weight scale per output channel: widen to float8 and
  ``torch._scaled_mm`` (``cublas.w4a4_fp8_linear``; 1.57× / 1.10× fp16 at 2048 tokens, and the
  fastest INT4 route at 16 tokens: 0.53× against the 16-row GEMV kernel's 0.30×);
* more than 16 tokens, 8-bit codes, per-channel scales: ``torch._int_mm`` (0.97× / 1.00× fp16 at
  2048 tokens, against 0.11× for the Triton GEMM);
* 2–16 tokens of 8-bit codes or of 16-bit activations: the 16-row tensor-core GEMV;
* anything else (per-group scales, widths cuBLAS refuses): the portable Triton GEMM (``gemm``).
"""

from __future__ import annotations

import torch

from asaf_fx.triton_kernels import cublas, gemv


def int_route(x_q: torch.Tensor, w_packed: torch.Tensor, group_size: int, a_bits: int) -> str:
    """'gemv', 'fp8', 'int8' or 'triton' for ``w4a_int_linear`` on ``x_q``."""
    k, n = x_q.shape[-1], w_packed.shape[0]
    m = x_q.numel() // max(k, 1)
    if m <= 1:
        return "gemv"
    per_channel = group_size == k
    if per_channel and a_bits <= 4 and cublas.fp8_supported(x_q.device) and cublas.fp8_shape_ok(m, k, n):
        return "fp8"
    if m <= gemv.MAX_M:
        return "gemv"
    if per_channel and cublas.int_mm_shape_ok(m, k, n):
        return "int8"
    return "triton"


def float_route(x: torch.Tensor, w_packed: torch.Tensor) -> str:
    """'gemv' or 'triton' for ``w4a16_linear`` on ``x``."""
    k = x.shape[-1]
    few = x.numel() // max(k, 1) <= gemv.MAX_M
    return "gemv" if few and x.dtype in (torch.float16, torch.bfloat16) else "triton"
