"""Graph-facing custom ops (``torch.ops.asaf_fx.*``) and their kernel dispatch.

Each op is a ``torch.library.custom_op`` with a fake kernel, so ``torch.export`` and
``torch.compile`` treat it as one opaque node. Its body picks an implementation:
CUDA tensors → Triton, CPU → the pure-torch reference; ``ASAF_FX_KERNELS=triton|reference|auto``
(default auto) forces one path, so the Triton path also runs on the CPU under TRITON_INTERPRET=1.

Ops (what each computes is documented beside its reference in ``asaf_fx.triton_kernels``):

* ``pack_int4(q) -> packed`` / ``unpack_int4(packed, k) -> q`` — INT4 nibble layout (``int4.py``).
* ``quantize_per_token(x, bits, clip_ratio) -> (q, scale)`` — symmetric activations (``quantize.py``).
* ``hadamard_rotate(x, right) -> y`` and ``hadamard_rotate_quantize(x, right, bits, clip_ratio)
  -> (q, scale)`` — online rotation, alone or fused with quantization (``hadamard.py``).
* ``w4a_int_linear(x_q, x_scale, w_packed, w_scale, bias, group_size, out_dtype, a_bits)`` (W4A4 /
  W4A8) and ``w4a16_linear(x, w_packed, w_scale, bias, group_size, out_dtype)``: on a GPU each call
  takes the kernel ``triton_kernels/routes.py`` picks for its shape (decode GEMV, cuBLAS float8 /
  int8, or the Triton GEMM in ``gemm.py``).
* ``kv_quantize(x, bits, group_size) -> (q, scale, zero)`` / ``kv_dequantize(q, scale, zero, bits,
  group_size, dtype)`` — asymmetric KV cache (``kv_quant.py``).
"""

from __future__ import annotations

import os
from typing import Callable, Optional, TypeVar

import torch

from asaf_fx.triton_kernels import gemm, hadamard, int4, kv_quant, quantize
from asaf_fx.triton_kernels._runtime import interpreting

_BACKENDS = ("auto", "triton", "reference")

F = TypeVar("F", bound=Callable)


def kernel_backend(x: torch.Tensor) -> str:
    """'triton' or 'reference' for an op whose main input is ``x``."""
    choice = os.environ.get("ASAF_FX_KERNELS", "auto").strip().lower() or "auto"
    if choice not in _BACKENDS:
        raise ValueError(f"ASAF_FX_KERNELS={choice!r} is not one of {', '.join(_BACKENDS)}")
    if choice == "auto":
        return "triton" if x.is_cuda else "reference"
    if choice == "triton" and not x.is_cuda and not interpreting():
        # Without this, Triton fails deep inside its launcher with a message about drivers.
        raise RuntimeError(
            "ASAF_FX_KERNELS=triton on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "before asaf_fx is imported, or use ASAF_FX_KERNELS=reference"
        )
    return choice


def _pick(x: torch.Tensor, triton_impl: F, torch_impl: F) -> F:
    return triton_impl if kernel_backend(x) == "triton" else torch_impl


def _lead(x: torch.Tensor) -> list:
    return list(x.shape[:-1])


# ----------------------------------------------------------------------------------- INT4 layout


@torch.library.custom_op("asaf_fx::pack_int4", mutates_args=())
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 (..., K) in [-8, 7] → uint8 (..., ceil(K/2)); offline only, so torch on every backend."""
    return int4.pack_int4(q)


@pack_int4.register_fake
def _(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty((*_lead(q), (q.shape[-1] + 1) // 2), dtype=torch.uint8)


@torch.library.custom_op("asaf_fx::unpack_int4", mutates_args=())
def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 (..., ceil(k/2)) → int8 (..., k); the inverse of pack_int4."""
    return int4.unpack_int4(packed, k)


@unpack_int4.register_fake
def _(packed: torch.Tensor, k: int) -> torch.Tensor:
    return packed.new_empty((*_lead(packed), k), dtype=torch.int8)


# ------------------------------------------------------------------------ activation quantization


@torch.library.custom_op("asaf_fx::quantize_per_token", mutates_args=())
def quantize_per_token(x: torch.Tensor, bits: int, clip_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token quantization: (q int8 x.shape, scale float32 x.shape[:-1])."""
    impl = _pick(x, quantize.quantize_per_token_triton, quantize.quantize_per_token_torch)
    return impl(x, bits, clip_ratio)


@quantize_per_token.register_fake
def _(x: torch.Tensor, bits: int, clip_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(_lead(x), dtype=torch.float32)


# ----------------------------------------------------------------------------------- rotation


@torch.library.custom_op("asaf_fx::hadamard_rotate", mutates_args=())
def hadamard_rotate(x: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """x @ kron(H_{2^k}/√2^k, right) along the last axis (see triton_kernels/hadamard.py)."""
    return _pick(x, hadamard.hadamard_rotate_triton, hadamard.hadamard_rotate_torch)(x, right)


def _check_right_fake(x: torch.Tensor, right: torch.Tensor) -> None:
    _, m = hadamard.split_width(x.shape[-1]) if isinstance(x.shape[-1], int) else (None, None)
    if m is not None:
        torch._check(right.shape[0] == m and right.shape[1] == m, lambda: "right factor has the wrong size")


@hadamard_rotate.register_fake
def _(x: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    _check_right_fake(x, right)
    # new_empty, not empty_like: the real op returns a contiguous tensor even for strided x.
    return x.new_empty(x.shape)


@torch.library.custom_op("asaf_fx::hadamard_rotate_quantize", mutates_args=())
def hadamard_rotate_quantize(
    x: torch.Tensor, right: torch.Tensor, bits: int, clip_ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_per_token of the float32 hadamard_rotate(x, right), fused on the Triton path."""
    impl = _pick(x, hadamard.rotate_quantize_triton, hadamard.rotate_quantize_torch)
    return impl(x, right, bits, clip_ratio)


@hadamard_rotate_quantize.register_fake
def _(x: torch.Tensor, right: torch.Tensor, bits: int, clip_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check_right_fake(x, right)
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(_lead(x), dtype=torch.float32)


# ------------------------------------------------------------------------------------- GEMMs


@torch.library.custom_op("asaf_fx::w4a_int_linear", mutates_args=())
def w4a_int_linear(
    x_q: torch.Tensor, x_scale: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
    bias: Optional[torch.Tensor], group_size: int, out_dtype: torch.dtype, a_bits: int = 8,
) -> torch.Tensor:
    """W4A4 / W4A8 GEMM on per-token quantized activations: (..., K) int8 → (..., N) out_dtype.

    ``a_bits``: the width of the codes (4 or 8); with 4 the GPU may run the product in float8.
    """
    if kernel_backend(x_q) == "reference":
        return gemm.w4a_int_linear_torch(x_q, x_scale, w_packed, w_scale, bias, group_size, out_dtype)
    return gemm.w4a_int_linear_device(x_q, x_scale, w_packed, w_scale, bias, group_size, out_dtype, a_bits)


@w4a_int_linear.register_fake
def _(x_q, x_scale, w_packed, w_scale, bias, group_size, out_dtype, a_bits=8):
    return x_q.new_empty((*_lead(x_q), w_packed.shape[0]), dtype=out_dtype)


@torch.library.custom_op("asaf_fx::w4a16_linear", mutates_args=())
def w4a16_linear(
    x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
    bias: Optional[torch.Tensor], group_size: int, out_dtype: torch.dtype,
) -> torch.Tensor:
    """Weight-only INT4 GEMM: float (..., K) → (..., N) out_dtype."""
    impl = _pick(x, gemm.w4a16_linear_device, gemm.w4a16_linear_torch)
    return impl(x, w_packed, w_scale, bias, group_size, out_dtype)


@w4a16_linear.register_fake
def _(x, w_packed, w_scale, bias, group_size, out_dtype):
    return x.new_empty((*_lead(x), w_packed.shape[0]), dtype=out_dtype)


# ---------------------------------------------------------------------------------- KV cache


@torch.library.custom_op("asaf_fx::kv_quantize", mutates_args=())
def kv_quantize(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-(token, group) quantization: (q uint8, scale float32, zero float32)."""
    return _pick(x, kv_quant.kv_quantize_triton, kv_quant.kv_quantize_torch)(x, bits, group_size)


@kv_quantize.register_fake
def _(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = x.shape[-1]
    groups = x.new_empty((*_lead(x), d // group_size), dtype=torch.float32)
    return x.new_empty((*_lead(x), d * bits // 8), dtype=torch.uint8), groups, torch.empty_like(groups)


@torch.library.custom_op("asaf_fx::kv_dequantize", mutates_args=())
def kv_dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of kv_quantize: ``q * scale + zero`` per group, as ``dtype`` (..., D)."""
    impl = _pick(q, kv_quant.kv_dequantize_triton, kv_quant.kv_dequantize_torch)
    return impl(q, scale, zero, bits, group_size, dtype)


@kv_dequantize.register_fake
def _(q, scale, zero, bits, group_size, dtype):
    return q.new_empty((*_lead(q), scale.shape[-1] * group_size), dtype=dtype)
