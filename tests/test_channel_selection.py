"""Channel counts at a granularity, activation-aware importance, least-squares down_proj refit."""

from __future__ import annotations

import pytest
import torch

from asaf_fx.passes.prune.channel_selection import (
    channel_importance,
    channels_to_keep,
    channels_to_remove,
    mlp_channel_flops,
    refit_down_proj,
)
from asaf_fx.synthetic import llama_layer_flops

SMOL = {"hidden": 576, "intermediate": 1536, "heads": 9, "kv_heads": 3, "head_dim": 64}


@pytest.mark.parametrize("sparsity", [0.0, 0.01, 0.05, 0.1, 0.15])
def test_removed_flops_are_within_half_a_block_of_the_target(sparsity):
    flops = llama_layer_flops(**SMOL)
    removed = channels_to_remove(flops, 576, 1536, sparsity, granularity=32)
    assert removed % 32 == 0
    achieved = removed * mlp_channel_flops(576) / flops
    half_block = 16 * mlp_channel_flops(576) / flops
    assert abs(achieved - sparsity) <= half_block + 1e-12


def test_unreachable_sparsity_is_refused_with_the_reachable_limit():
    flops = llama_layer_flops(**SMOL)
    with pytest.raises(ValueError, match=r"at most 1504 can go \(≈ 73.\d\d% of this layer's FLOPs\)"):
        channels_to_remove(flops, 576, 1536, 0.9, granularity=32)
    with pytest.raises(ValueError, match="must be positive and divide the MLP width 1536"):
        channels_to_remove(flops, 576, 1536, 0.1, granularity=100)


def test_least_important_channels_go():
    down = torch.ones(4, 6)
    mean_square = torch.tensor([5.0, 0.1, 3.0, 0.2, 4.0, 9.0])
    keep = channels_to_keep(channel_importance(down, mean_square), remove=2)
    assert keep.tolist() == [0, 2, 4, 5]


def test_importance_weighs_activations_and_weights():
    down = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    importance = channel_importance(down, torch.tensor([4.0, 1.0]))
    assert importance.tolist() == [4.0, 9.0]
    with pytest.raises(ValueError, match="down_proj has 2 input channels but the statistics cover 3"):
        channel_importance(down, torch.ones(3))


def test_refit_reproduces_the_unpruned_output_better_than_dropping():
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(24, 40, generator=generator)
    h = torch.randn(2048, 24, generator=generator) @ basis  # 40 channels, rank 24: redundant
    down = torch.randn(16, 40, generator=generator)
    gram = h.T @ h / h.shape[0]
    keep = channels_to_keep(channel_importance(down, torch.diagonal(gram)), remove=8)
    target = h @ down.T
    dropped = h[:, keep] @ down[:, keep].T
    refit = h[:, keep] @ refit_down_proj(down, gram, keep, ridge=1e-6).T
    error_drop = float((dropped - target).norm() / target.norm())
    error_refit = float((refit - target).norm() / target.norm())
    assert error_refit < 0.01 < error_drop  # 32 channels still span the rank-24 signal


def test_ridge_moves_the_refit_from_least_squares_to_no_refit():
    generator = torch.Generator().manual_seed(1)
    h = torch.randn(4096, 12, generator=generator) @ torch.randn(12, 24, generator=generator)
    down = torch.randn(8, 24, generator=generator, dtype=torch.float64)
    gram = (h.T @ h / h.shape[0]).to(torch.float64)
    keep = torch.arange(0, 24, 2)
    target = h.to(torch.float64) @ down.T
    errors = [float((h[:, keep].to(torch.float64) @ refit_down_proj(down, gram, keep, ridge=r).T - target).norm())
              for r in (1e-6, 1e-2, 1.0, 1e2)]
    assert errors == sorted(errors) and errors[0] < 0.5 * errors[-1]  # the fit worsens as the ridge grows
    assert torch.allclose(refit_down_proj(down, gram, keep, ridge=1e9), down[:, keep], atol=1e-6)
    with pytest.raises(ValueError, match="ridge must be positive"):
        refit_down_proj(down, gram, keep, ridge=0.0)
