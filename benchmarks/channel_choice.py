"""Which MLP channels to prune: the library's score against the alternatives tried on SmolLM2-135M.

    python benchmarks/channel_choice.py --choice importance|sequential|obs|residual-out|residual-in|fisher|taylor
        [--refit] [--sparsity 0.1] [--windows 4] [--calibration 32]

Every choice prunes the same number of channels per layer (a uniform plan at ``--sparsity``, the
library's granularity 32) from the rotated 16-bit model, so only *which* channels go (and, with
``--refit``, the least-squares down_proj correction) differs. Calibration: ``--calibration``
windows of 512 tokens from WikiText-2 *validation* (seed 0); evaluation: the first ``--windows``
windows of 2048 tokens of the test split. Prints one line with the perplexity.

Choices (h: down_proj's input, W: its weight, x: the residual stream, g = ∂loss/∂h):

* ``importance`` — the library's ``E[h_j²]·‖W[:, j]‖²`` with statistics from the dense model.
* ``sequential`` — the same score, but layer l's statistics come from the outputs of the already
  pruned layers 0..l−1 (as SparseGPT-style solvers do); with ``--refit`` the correction then also
  absorbs the earlier layers' error.
* ``obs`` — greedy structured OBS (ZipLM / SlimGPT) on the dense model's statistics: remove the
  channel whose loss with the rest refitted grows least, ``‖W[:, j]‖² / [H⁻¹]_jj``, update W and
  H⁻¹, repeat. Meant with ``--refit``.
* ``residual-out`` / ``residual-in`` — ``E[h_j² / ‖x‖²]·‖W[:, j]‖²`` with x the residual after /
  before the layer: the next RMSNorm divides by ‖x‖, so errors on tokens with a huge residual
  (attention sinks) matter less than their squared size says.
* ``fisher`` — ``Σ_windows (Σ_t g_j h_j)²``; ``taylor`` — ``Σ_t (g_j h_j)²``. Both need a backward
  pass of the whole model on the calibration data (not layer by layer: no offloading).

This is an experiment, not a library path: the alternatives patch ``asaf_fx.compile``'s channel
selection for the duration of the run.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

import asaf_fx
from asaf_fx.data import calibration_windows, perplexity, read_joined, token_windows, wikitext2_test_path, wikitext2_valid_path
from asaf_fx.passes import prune_mlp
from asaf_fx.passes.channel_selection import channel_importance, channels_to_keep, refit_down_proj
from asaf_fx.passes.graph_utils import get_tensor
from asaf_fx.passes.linear_stats import collect_linear_stats
from asaf_fx.passes.patterns import find_swiglus
from asaf_fx.sparsity_plan import uniform_plan

# `asaf_fx.compile` is the function; the module it lives in is patched.
compile_module = sys.modules["asaf_fx.compile"]
CHOICES = ("importance", "sequential", "obs", "residual-out", "residual-in", "fisher", "taylor")


def obs_removal_order(weight: torch.Tensor, gram: torch.Tensor, count: int, damp: float = 0.01) -> torch.Tensor:
    """The first ``count`` channels greedy structured OBS removes, in order."""
    w = weight.to(torch.float64).clone()
    g = gram.to(torch.float64)
    hinv = torch.linalg.inv(g + damp * torch.diagonal(g).mean() * torch.eye(g.shape[0], dtype=torch.float64))
    alive = torch.ones(g.shape[0], dtype=torch.bool)
    order = []
    for _ in range(count):
        score = w.pow(2).sum(dim=0) / torch.diagonal(hinv).clamp_min(torch.finfo(torch.float64).tiny)
        score[~alive] = torch.inf
        j = int(torch.argmin(score))
        order.append(j)
        row = hinv[j] / hinv[j, j]
        w -= torch.outer(w[:, j], row)
        hinv -= torch.outer(hinv[:, j], row)
        alive[j] = False
    return torch.tensor(order, dtype=torch.long)


def layerwise_selector(choice: str, refit: bool) -> Callable:
    """``sequential``: layer l's statistics on states advanced through the pruned layers 0..l−1;
    ``obs``: on the dense model's states, like the library."""

    def select(runner, states, sparsities, granularity=32, _refit=False):
        source = runner.split.source
        removed = prune_mlp.channels_removed(source, sparsities, granularity)
        result = []
        for layer, mlp in enumerate(find_swiglus(source)):
            down = get_tensor(source, mlp.down.args[1])
            if removed[layer] == 0:
                result.append(None)
                states[:] = [runner.run_layer(layer, s) for s in states]
                continue
            stats = collect_linear_stats(runner, layer, states)[mlp.down.args[1].target]
            gram = stats.hessian / stats.rows
            if choice == "obs":
                gone = torch.zeros(down.shape[1], dtype=torch.bool)
                gone[obs_removal_order(down, gram, removed[layer])] = True
                keep = torch.nonzero(~gone).flatten()
            else:
                keep = channels_to_keep(channel_importance(down, stats.mean_square), removed[layer])
            fitted = refit_down_proj(down, gram, keep) if refit else None
            result.append(prune_mlp.MlpPruning(keep, fitted))
            if choice != "sequential":
                states[:] = [runner.run_layer(layer, s) for s in states]
                continue
            # Run this layer as pruned: zero columns in place of the removed channels.
            pruned = torch.zeros_like(down)
            pruned[:, keep] = down[:, keep] if fitted is None else fitted
            dense = down.detach().clone()
            with torch.no_grad():
                down.copy_(pruned)
                states[:] = [runner.run_layer(layer, s) for s in states]
                down.copy_(dense)
        return result

    return select


def fixed_selector(importances: list[torch.Tensor]) -> Callable:
    def select(runner, states, sparsities, granularity=32, _refit=False):
        return [prune_mlp.MlpPruning(channels_to_keep(imp, r)) if r else None
                for imp, r in zip(importances, prune_mlp.channels_removed(runner.split.source, sparsities, granularity), strict=True)]

    return select


def hf_importances(model, calibration: torch.Tensor, choice: str) -> list[torch.Tensor]:
    """Scores from the transformers model itself (h and ‖x‖ are unchanged by the rotation)."""
    layers = model.model.layers
    scores = [torch.zeros(model.config.intermediate_size, dtype=torch.float64) for _ in layers]
    seen: dict[int, torch.Tensor] = {}

    def keep_input(i):
        def hook(module, args):
            if choice in ("fisher", "taylor"):
                args[0].retain_grad()
            seen[i] = args[0]
        return hook

    def weigh_by_residual(i):
        def hook(module, args, kwargs, out):
            x = (out[0] if isinstance(out, tuple) else out) if choice == "residual-out" else (
                args[0] if args else kwargs["hidden_states"])
            h = seen[i].detach().double()
            scores[i] += (h.pow(2) / x.detach().double().pow(2).sum(-1, keepdim=True)).sum((0, 1))
        return hook

    handles = [layer.mlp.down_proj.register_forward_pre_hook(keep_input(i)) for i, layer in enumerate(layers)]
    if choice.startswith("residual"):
        handles += [layer.register_forward_hook(weigh_by_residual(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for batch in calibration.split(4 if choice.startswith("residual") else 2):
            if choice.startswith("residual"):
                with torch.no_grad():
                    model(batch)
                continue
            model(batch, labels=batch).loss.backward()
            model.zero_grad(set_to_none=True)
            for i in range(len(layers)):
                gh = (seen[i].grad * seen[i]).detach().double()  # (batch, tokens, channels)
                scores[i] += gh.sum(1).pow(2).sum(0) if choice == "fisher" else gh.pow(2).sum((0, 1))
    finally:
        for handle in handles:
            handle.remove()
    if choice.startswith("residual"):
        scores = [s * layer.mlp.down_proj.weight.detach().double().pow(2).sum(0) for s, layer in zip(scores, layers)]
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--choice", choices=CHOICES, default="importance")
    parser.add_argument("--refit", action="store_true", help="least-squares down_proj refit over the kept channels")
    parser.add_argument("--sparsity", type=float, default=0.1)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--calibration", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)

    model, tokenizer = asaf_fx.load_model("smollm2")
    model.eval()
    test = token_windows(tokenizer, read_joined(wikitext2_test_path()), 2048, args.windows)
    calibration = calibration_windows(tokenizer, wikitext2_valid_path(), args.calibration, 512, seed=0)
    started = time.perf_counter()
    if args.choice in ("sequential", "obs"):
        compile_module.select_mlp_channels = layerwise_selector(args.choice, args.refit)
    elif args.choice != "importance":
        if args.refit:
            parser.error(f"--refit is not built for --choice {args.choice}")
        compile_module.select_mlp_channels = fixed_selector(hf_importances(model, calibration, args.choice))
    quant = asaf_fx.QuantConfig(w_bits=16, a_bits=16, kv_bits=16)
    compiled = asaf_fx.compile(model, uniform_plan(model.config.num_hidden_layers, args.sparsity), quant=quant,
                               calibration=calibration, decode=False, prune=asaf_fx.PruneConfig(refit=args.refit))
    ppl = perplexity(lambda ids: compiled(ids).logits, test)
    print(f"SmolLM2-135M rotated 16-bit · uniform {args.sparsity:g} · choice {args.choice}"
          f"{' + refit' if args.refit else ''} · {test.shape[0]} test windows × 2048 · PPL {ppl:.3f} · "
          f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
