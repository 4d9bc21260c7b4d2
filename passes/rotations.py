"""Seeded orthogonal matrices for any width n = 2^k · m (m odd).

Hadamard matrices exist only for orders 1, 2 and multiples of 4, so no odd m > 1 has one. The
"Hadamard" rotation of width n is therefore ``kron(H_{2^k}/√2^k, R_m)`` with R_m a seeded random
orthogonal m×m matrix (identity when m = 1): exactly orthogonal, and applied online by
``torch.ops.asaf_fx.hadamard_rotate(x, R_m)`` in O(n log 2^k + n·m). Every matrix is a pure
function of (seed, tag, n), so two graphs captured from one model get identical rotations.
"""

from __future__ import annotations

import zlib

import torch

from asaf_fx.triton_kernels.hadamard import rotation_matrix, split_width

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


def online_rotation(n: int, seed: int, tag: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(right factor, dense matrix R) with ``hadamard_rotate(x, right) == x @ R``; both float64."""
    right = right_factor(n, seed, tag)
    return right, rotation_matrix(n, right)


def residual_rotation(n: int, seed: int, kind: str = "hadamard") -> torch.Tensor:
    """Dense (n, n) orthogonal float64 matrix Q for the residual stream.

    ``hadamard``: diag(random ±1) · kron(H_{2^k}/√2^k, R_m) (QuaRot's randomised Hadamard);
    ``orthogonal``: Haar-random orthogonal.
    """
    if kind not in KINDS:
        raise ValueError(f"rotation kind {kind!r} is not one of {KINDS}")
    if kind == "orthogonal":
        return random_orthogonal(n, seed, "residual")
    g = generator(seed, "residual-signs", n)
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.int64).to(torch.float64) * 2 - 1
    _, dense = online_rotation(n, seed, "residual")
    return signs.unsqueeze(1) * dense
