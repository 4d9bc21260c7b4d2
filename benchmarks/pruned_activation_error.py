"""Does pruning make down_proj's input harder to quantize? Per-token activation error at each width.

    python benchmarks/pruned_activation_error.py [--layers 0,3,10,20,29] [--removed 0,96,288]

Runs SmolLM2-135M (16-bit) on 4 × 256 tokens of WikiText-2 validation, records each chosen layer's
down_proj input, drops the ``--removed`` channels of lowest mean |activation| (what the pruning
keeps, to first order), rotates the kept ones with the online rotation compile uses at that width
(H_{2^k} ⊗ R_m) and prints the relative error ‖q(x) − x‖ / ‖x‖ of per-token symmetric 4- and
8-bit quantization (clip 0.9, as the W4A4KV4 settings use). Equal errors at every width mean the
pruned layers' activation quantization is no worse than the dense layer's.
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table

import asaf_fx
from asaf_fx.data import calibration_windows, wikitext2_valid_path
from asaf_fx.passes.rotations import online_rotation


def per_token_error(x: torch.Tensor, bits: int, clip: float = 0.9) -> float:
    top = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) * clip / top
    q = torch.clamp(torch.round(x / scale), -top - 1, top) * scale
    return float((q - x).norm() / x.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--layers", default="0,3,10,20,29")
    parser.add_argument("--removed", default="0,96,288", help="channels removed (multiples of the granularity)")
    args = parser.parse_args()
    layers = [int(v) for v in args.layers.split(",")]
    removed = [int(v) for v in args.removed.split(",")]

    model, tokenizer = asaf_fx.load_model("smollm2")
    ids = calibration_windows(tokenizer, wikitext2_valid_path(), 4, 256, seed=0)
    inputs: dict[int, torch.Tensor] = {}
    for layer in layers:
        down = model.model.layers[layer].mlp.down_proj
        down.register_forward_pre_hook(lambda _, a, layer=layer: inputs.__setitem__(
            layer, a[0].detach().reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        model(ids)

    grid = Table(title="per-token quantization error of down_proj's rotated input (SmolLM2-135M, 1024 tokens)")
    for column in ("layer", "kept width", "A4 error", "A8 error"):
        grid.add_column(column, justify="right")
    for layer in layers:
        x = inputs[layer]
        order = torch.argsort(x.abs().mean(dim=0), descending=True)
        for gone in removed:
            kept = x[:, order[: x.shape[1] - gone]]
            rotated = online_rotation(kept.shape[1], 0, "down").apply(kept)
            grid.add_row(str(layer), str(kept.shape[1]), f"{per_token_error(rotated, 4):.4f}",
                         f"{per_token_error(rotated, 8):.4f}")
    Console().print(grid)


if __name__ == "__main__":
    main()
