"""Online rotation by H_{2^k} ⊗ R_m for any width n = 2^k · m (m odd).

``hadamard_rotate_torch(x, right)`` returns ``x @ kron(H / sqrt(2^k), right)`` along the last axis,
where H is the Sylvester Hadamard matrix of order 2^k and ``right`` an (m, m) orthogonal matrix
(a Hadamard matrix of order m scaled to be orthogonal, or a seeded random orthogonal one). The
product is orthogonal, so ``rotation_matrix(n, right)`` can be folded into the neighbouring weights
offline while the op runs online. Cost per row: n·log2(2^k) adds for the butterfly plus n·m
multiply-adds for the small dense factor.
"""

from __future__ import annotations

import math

import torch


def split_width(n: int) -> tuple[int, int]:
    """n = 2^k · m with m odd; returns (2^k, m)."""
    if n <= 0:
        raise ValueError(f"rotation width must be positive, got {n}")
    power = n & -n
    return power, n // power


def _walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Sylvester Hadamard transform along axis -2 (length a power of two)."""
    *lead, size, m = x.shape
    h = 1
    while h < size:
        x = x.reshape(*lead, size // (2 * h), 2, h, m)
        a, b = x.select(-3, 0), x.select(-3, 1)
        x = torch.stack((a + b, a - b), dim=-3)
        h *= 2
    return x.reshape(*lead, size, m)


def hadamard_rotate_torch(x: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """x @ kron(H_{2^k} / sqrt(2^k), right), computed in float32 (float64 stays float64)."""
    n = x.shape[-1]
    power, m = split_width(n)
    if right.shape != (m, m):
        raise ValueError(f"width {n} = {power}·{m} needs a ({m}, {m}) right factor, got {tuple(right.shape)}")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(compute).reshape(*x.shape[:-1], power, m)
    if m > 1:
        y = y @ right.to(compute)
    y = _walsh_hadamard(y) * (1.0 / math.sqrt(power))
    return y.reshape(x.shape).to(x.dtype)


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
    h = sylvester_hadamard(power) / math.sqrt(power)
    return torch.kron(h, right.to(torch.float64).contiguous())
