"""Which MLP intermediate channels a layer loses at sparsity s, and how down_proj compensates.

A layer's sparsity ``s`` is the fraction of its linear FLOPs removed. Deleting one intermediate
channel of a SwiGLU MLP removes one row of gate_proj and up_proj and one column of down_proj:
``3 · hidden`` multiply-adds per token. Channels go in multiples of ``granularity`` so the pruned
GEMMs keep kernel-friendly widths; the FLOPs actually removed are therefore close to, not exactly,
``s`` — :func:`channels_to_remove` says how many, and the calibration's H table records the truth.

Importance is activation-aware: channel j's expected squared contribution to the MLP output,
``E[h_j²] · ‖W_down[:, j]‖²`` with ``h`` the input of down_proj on calibration data.

The optional least-squares correction refits the kept down_proj columns so that, on the
calibration inputs, ``W' h_keep`` best reproduces the unpruned ``W h`` (``G = E[h hᵀ]``, the same
Gram matrix GPTQ uses), with a ridge that pulls ``W'`` back towards the unrefitted columns.
"""

from __future__ import annotations

import torch

# The ridge with the lowest perplexity on held-out validation windows for SmolLM2 at uniform 10 %
# and the default W4A8KV8 (0.03, 0.1, 0.3 tried); at 16 bits 0.1 and 0.3 tie, the best of 1e-3 … 10
# (docs/results.md, investigation "Ridge refit of down_proj").
RIDGE = 0.3


def mlp_channel_flops(hidden: int) -> int:
    """Linear FLOPs per token of one SwiGLU intermediate channel (gate, up and down; 2 per MAC)."""
    return 2 * 3 * hidden


def channels_to_remove(
    layer_flops: float, hidden: int, intermediate: int, sparsity: float, granularity: int = 32
) -> int:
    """Intermediate channels to delete so that about ``sparsity`` of ``layer_flops`` goes.

    Rounds to the nearest multiple of ``granularity``; at least one block of channels must stay.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    if granularity <= 0 or intermediate % granularity:
        raise ValueError(
            f"granularity {granularity} must be positive and divide the MLP width {intermediate}; "
            "pick a divisor such as 16, 32 or 64"
        )
    wanted = sparsity * layer_flops / mlp_channel_flops(hidden)
    blocks = round(wanted / granularity)
    removed = blocks * granularity
    if removed > intermediate - granularity:
        reachable = (intermediate - granularity) * mlp_channel_flops(hidden) / layer_flops
        raise ValueError(
            f"sparsity {sparsity:.2%} is a share of the layer's linear FLOPs (attention and MLP), all taken from "
            f"the MLP: it would remove {wanted:.0f} MLP channels, but the MLP has {intermediate} and at granularity "
            f"{granularity} at most {intermediate - granularity} can go (≈ {reachable:.2%} of this layer's FLOPs); "
            "lower the sparsity or the granularity"
        )
    return removed


def channel_importance(down_weight: torch.Tensor, mean_square_input: torch.Tensor) -> torch.Tensor:
    """E[h_j²] · ‖W_down[:, j]‖² per intermediate channel j (shape (intermediate,))."""
    if down_weight.shape[1] != mean_square_input.shape[0]:
        raise ValueError(
            f"down_proj has {down_weight.shape[1]} input channels but the statistics cover "
            f"{mean_square_input.shape[0]}"
        )
    return mean_square_input.to(torch.float64) * down_weight.to(torch.float64).pow(2).sum(dim=0)


def channels_to_keep(importance: torch.Tensor, remove: int) -> torch.Tensor:
    """Indices (ascending) of the channels left after removing the ``remove`` least important."""
    if not 0 <= remove < importance.shape[0]:
        raise ValueError(f"cannot remove {remove} of {importance.shape[0]} channels")
    # Stable sort: equal scores fall back to channel order, so the choice is reproducible.
    order = torch.sort(importance, stable=True).indices
    return torch.sort(order[remove:]).values


def refit_down_proj(
    down_weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, ridge: float = RIDGE
) -> torch.Tensor:
    """Ridge least-squares down_proj weight over the kept channels, anchored at the unrefitted one.

    Minimises ``E‖W h − W' h_keep‖² + λ‖W' − W[:, keep]‖²`` over ``W'``:
    ``W' = W[:, keep] + W[:, drop] G[drop, keep] (G[keep, keep] + λI)⁻¹`` with
    ``λ = ridge · mean(diag G[keep, keep])``. ``ridge`` → 0 is the plain least-squares refit,
    ``ridge`` → ∞ no refit at all; in between the removed channels' contribution is carried over
    to the kept ones only as far as the calibration data supports it.
    Returns a tensor of shape (out_features, len(keep)) in ``down_weight``'s dtype.
    """
    if ridge <= 0:
        raise ValueError(f"ridge must be positive (it also keeps the solve stable), got {ridge}")
    w = down_weight.to(torch.float64)
    g = gram.to(device=w.device, dtype=torch.float64)
    dropped = torch.ones(g.shape[0], dtype=torch.bool, device=w.device)
    dropped[keep] = False
    kept = g[keep][:, keep]
    kept = kept + ridge * torch.diagonal(kept).mean() * torch.eye(len(keep), dtype=torch.float64, device=w.device)
    cross = w[:, dropped] @ g[dropped][:, keep]  # (out, keep): what the removed channels carried
    solution = w[:, keep] + torch.linalg.solve(kept, cross.T).T
    return solution.to(down_weight.dtype)
