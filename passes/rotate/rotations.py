"""Seeded orthogonal matrices for any width n = 2^k · m (m odd).

Hadamard matrices exist only for orders 1, 2 and multiples of 4, so no odd m > 1 has one. The
"Hadamard" rotation of width n is therefore ``kron(H_{2^k}/√2^k, R_m)`` with R_m a seeded random
orthogonal m×m matrix (identity when m = 1): exactly orthogonal, and applied online by
``torch.ops.asaf_fx.hadamard_rotate(x, R_m)`` in O(n log 2^k + n·m). Every matrix is a pure
function of (seed, tag, n), so two graphs captured from one model get identical rotations.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from asaf_fx.triton_kernels.hadamard import hadamard_rotate_torch, split_width

KINDS = ("hadamard", "orthogonal")


def generator(seed: int, tag: str, n: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, tag, n)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(f"{tag}:{n}".encode())) % 2**63)


def random_orthogonal(n: int, seed: int, tag: str) -> torch.Tensor:
    """Haar-random (n, n) orthogonal matrix in float64 (QR of a Gaussian, signs fixed)."""
    g = generator(seed, tag, n)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def right_factor(n: int, seed: int, tag: str) -> torch.Tensor:
    """The (m, m) odd factor for width n = 2^k · m, float64: identity for m = 1, else random orthogonal."""
    _, m = split_width(n)
    return torch.eye(1, dtype=torch.float64) if m == 1 else random_orthogonal(m, seed, tag + ":right")


@dataclass(frozen=True)
class Rotation:
    """An orthogonal Q of width n: diag(signs) · kron(H_{2^k}/√2^k, right), or a dense matrix.

    ``apply(w)`` computes w·Q along the last axis in float64 with the fast transform
    (O(n log n + n·m) per row instead of O(n²)), which matters for 49k-row embedding matrices.
    """

    width: int
    right: torch.Tensor | None = None  # (m, m) odd factor, float64
    signs: torch.Tensor | None = None  # (n,) ±1, float64
    dense: torch.Tensor | None = None  # (n, n) float64, for the "orthogonal" kind

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        """w · Q (rows of w rotated)."""
        w = w.to(torch.float64)
        if self.dense is not None:
            return w @ self.dense.to(w.device)
        if self.signs is not None:
            w = w * self.signs.to(w.device)
        return hadamard_rotate_torch(w, self.right)

    def apply_left_transposed(self, w: torch.Tensor) -> torch.Tensor:
        """Qᵀ · w (columns of w rotated)."""
        return self.apply(w.T).T

    def matrix(self) -> torch.Tensor:
        return self.apply(torch.eye(self.width, dtype=torch.float64))


def online_rotation(n: int, seed: int, tag: str) -> Rotation:
    """kron(H_{2^k}/√2^k, R_m): exactly what ``hadamard_rotate(x, rotation.right)`` applies to x."""
    return Rotation(n, right=right_factor(n, seed, tag))


def residual_rotation(n: int, seed: int, kind: str = "hadamard") -> Rotation:
    """Orthogonal Q for the residual stream.

    ``hadamard``: diag(random ±1) · kron(H_{2^k}/√2^k, R_m) (QuaRot's randomised Hadamard);
    ``orthogonal``: Haar-random orthogonal.
    """
    if kind not in KINDS:
        raise ValueError(f"rotation kind {kind!r} is not one of {KINDS}")
    if kind == "orthogonal":
        return Rotation(n, dense=random_orthogonal(n, seed, "residual"))
    g = generator(seed, "residual-signs", n)
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.int64).to(torch.float64) * 2 - 1
    return Rotation(n, right=right_factor(n, seed, "residual"), signs=signs)
