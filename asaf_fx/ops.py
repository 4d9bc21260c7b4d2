"""Graph-facing custom ops (``torch.ops.asaf_fx.*``) and their kernel dispatch.

Each op is a ``torch.library.custom_op`` with a fake kernel, so ``torch.export`` and
``torch.compile`` treat it as one opaque node. Its body picks an implementation:
CUDA tensors → Triton, CPU → the pure-torch reference; ``ASAF_FX_KERNELS=triton|reference|auto``
(default auto) forces one path, so the Triton path also runs on the CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os

import torch

from asaf_fx.triton_kernels import hadamard

_BACKENDS = ("auto", "triton", "reference")


def kernel_backend(x: torch.Tensor) -> str:
    """'triton' or 'reference' for an op whose main input is ``x``."""
    choice = os.environ.get("ASAF_FX_KERNELS", "auto").strip().lower() or "auto"
    if choice not in _BACKENDS:
        raise ValueError(f"ASAF_FX_KERNELS={choice!r} is not one of {', '.join(_BACKENDS)}")
    if choice == "auto":
        return "triton" if x.is_cuda else "reference"
    return choice


@torch.library.custom_op("asaf_fx::hadamard_rotate", mutates_args=())
def hadamard_rotate(x: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """x @ kron(H_{2^k}/√2^k, right) along the last axis (see triton_kernels/hadamard.py)."""
    return hadamard.hadamard_rotate_torch(x, right)


@hadamard_rotate.register_fake
def _(x: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    power, m = hadamard.split_width(x.shape[-1]) if isinstance(x.shape[-1], int) else (None, None)
    if m is not None:
        torch._check(right.shape[0] == m and right.shape[1] == m, lambda: "right factor has the wrong size")
    return torch.empty_like(x)
