"""Shared Triton helpers: interpreter detection, config choice, exact rounding.

Kept apart so that every kernel module rounds the same way: the integer outputs of a Triton kernel
and of its torch reference agree exactly only if both use IEEE division and round half to even.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels in its numpy interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    """Smallest power of two ≥ n (1 for n ≤ 1); ``tl.arange`` needs power-of-two extents."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def pick_configs(gpu: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    """The GPU autotune list, or one small config under the interpreter (which is slow, and
    where timing configs would measure numpy, not a GPU)."""
    return [interpreter] if interpreting() else gpu


def divide_rn(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """x / divisor correctly rounded on every device, like the kernels' ``tl.math.div_rn``.

    CUDA torch divides by a Python scalar as a multiplication by its reciprocal, which can land
    one ulp away; dividing by a tensor of the same shape is a true division on CPU and CUDA.
    """
    return x / torch.full_like(x, divisor)


@triton.jit
def round_half_even(v):
    """Round float32 ``v`` to the nearest integer, ties to even, like ``torch.round``.

    ``floor(v + 0.5)`` is wrong for values just below 0.5 (the add rounds up) and rounds ties away
    from even; libdevice ``rint`` does not run in the interpreter. ``v - floor(v)`` is exact.
    """
    r = tl.floor(v)
    frac = v - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return tl.where(up, r + 1.0, r)
