"""Synthetic sensitivity tables shaped like measured ones, for examples, tests and benchmarks.

They imitate what calibration measures on small Llama models: the first and last layers are the
most sensitive, degradation grows faster than linearly with sparsity, pruning several layers
together hurts a little more than the sum of their single-layer effects, and the measurement is
noisy (so the table is neither monotone nor exactly additive, and can hold small negative values).
"""

from __future__ import annotations

import numpy as np

from asaf_fx.table import SensitivityTable

#: SmolLM2-135M: hidden 576, MLP 1536, 9 query heads / 3 KV heads of 64, 30 layers.
SMOLLM2_SHAPE = {"hidden": 576, "intermediate": 1536, "heads": 9, "kv_heads": 3, "head_dim": 64, "layers": 30}


def llama_layer_flops(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int) -> float:
    """Linear FLOPs per token of one Llama decoder layer (2 per multiply-add)."""
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o and k, v
    mlp = 3 * hidden * intermediate  # gate, up, down
    return 2.0 * (attention + mlp)


def synthetic_table(
    num_layers: int = SMOLLM2_SHAPE["layers"],
    sparsities: np.ndarray | None = None,
    *,
    seed: int = 0,
    total_at_5pct: float = 0.01,
    interaction: float = 0.05,
    noise: float = 0.1,
) -> SensitivityTable:
    """A full (p, p, S) table with SmolLM2-like layer FLOPs.

    Args:
        num_layers: p.
        sparsities: the grid; default 1% .. 15% in steps of 1%.
        seed: all randomness comes from ``numpy.random.default_rng(seed)``.
        total_at_5pct: Σ over layers of the single-layer degradation at 5% sparsity.
        interaction: a group of n layers costs (1 + interaction·(n − 1)) × the sum of its layers.
        noise: relative standard deviation of the measurement noise.
    """
    rng = np.random.default_rng(seed)
    if sparsities is None:
        sparsities = np.round(np.arange(1, 16) / 100.0, 4)
    sparsities = np.asarray(sparsities, dtype=np.float64)
    p = num_layers
    shape = {k: v for k, v in SMOLLM2_SHAPE.items() if k != "layers"}
    layer_flops = np.full(p, llama_layer_flops(**shape))

    depth = np.arange(p, dtype=np.float64)
    sensitivity = 1.0 + 3.0 * np.exp(-depth / 2.0) + 2.0 * np.exp(-(p - 1 - depth) / 3.0)
    sensitivity *= rng.lognormal(0.0, 0.3, size=p)
    sensitivity *= total_at_5pct / sensitivity.sum()
    growth = (sparsities / 0.05) ** 1.5  # (S,)

    prefix = np.concatenate([[0.0], np.cumsum(sensitivity)])
    start = np.arange(p)[:, None]
    length = np.arange(1, p + 1)[None, :]
    exists = start + length <= p
    stop = np.minimum(start + length, p)
    group = (prefix[stop] - prefix[start]) * (1.0 + interaction * (length - 1))
    mean = group[:, :, None] * growth[None, None, :]
    measured = mean * (1.0 + noise * rng.standard_normal(mean.shape))
    measured += noise * 1e-4 * rng.standard_normal(mean.shape)  # absolute noise floor
    degradation = np.where(exists[:, :, None], measured, np.nan)
    meta = {
        "source": "asaf_fx.synthetic",
        "seed": seed,
        "metric": "relative_ppl_increase",
        "model_shape": SMOLLM2_SHAPE | {"layers": p},
    }
    return SensitivityTable(layer_flops, sparsities, degradation, meta=meta)
