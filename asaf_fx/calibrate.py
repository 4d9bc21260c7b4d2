"""python -m asaf_fx.calibrate --model smollm2|PATH --out TABLE.safetensors [--mode per-layer|groups|full]

Measure the sensitivity table the solver reads: ξ(group, s), the degradation of the rotated-quantized
model when the layers of one group are pruned at s, on calibration windows of a text file; and H,
each group's FLOPs after pruning at the real channel granularity. Resumable: progress is saved
after every measurement, and rerunning the same command continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from asaf_fx._atomic import sha256_file
from asaf_fx._cli import int_at_least
from asaf_fx.calibration.entries import MODES, distinct_variants, planned_entries
from asaf_fx.calibration.estimate import complete_table
from asaf_fx.calibration.measure import METRICS, DegradationMeter
from asaf_fx.calibration.runner import measure_entries, remove_progress
from asaf_fx.calibration.variants import CalibrationModel, build_calibration_model
from asaf_fx.compile import calibration_batches
from asaf_fx.config import CLIP_SEARCH, QuantConfig
from asaf_fx.data import calibration_windows, wikitext2_valid_path
from asaf_fx.table import SensitivityTable

DEFAULT_SPARSITIES = tuple(round(0.01 * k, 2) for k in range(1, 16))


def _sparsities(value: str) -> tuple[float, ...]:
    try:
        levels = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of numbers") from None
    if not levels:
        raise argparse.ArgumentTypeError("give at least one sparsity, e.g. 0.05,0.1")
    if any(not 0 < s < 1 for s in levels):
        raise argparse.ArgumentTypeError(f"every sparsity must lie in (0, 1); got {list(levels)}")
    if any(b <= a for a, b in zip(levels, levels[1:])):
        raise argparse.ArgumentTypeError(f"sparsities must be strictly increasing; got {list(levels)}")
    return levels


def add_quant_arguments(parser: argparse.ArgumentParser) -> None:
    """--w-bits, --a-bits, --kv-bits, --w-method, --group-size, --a-clip (W4A4KV4 GPTQ by default)."""
    parser.add_argument("--w-bits", type=int, default=4)
    parser.add_argument("--a-bits", type=int, default=4)
    parser.add_argument("--kv-bits", type=int, default=4)
    parser.add_argument("--w-method", choices=("gptq", "rtn"), default="gptq")
    parser.add_argument("--group-size", type=int, default=None, help="weight group size (default: per channel)")
    parser.add_argument("--a-clip", type=clip_ratio, default=0.9,
                        help="activation clip ratio in (0, 1], or 'mse' to choose one per linear on the "
                             "calibration data (default 0.9)")
    parser.add_argument("--overrides", type=_overrides, default={},
                        help='per-linear settings by weight-name pattern, as JSON, e.g. '
                             '\'{"*.down_proj.weight": {"a_bits": 8}}\' (QuantConfig.overrides)')


def clip_ratio(value: str) -> float | str:
    """--a-clip: a ratio, or CLIP_SEARCH."""
    if value == CLIP_SEARCH:
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--a-clip must be a number in (0, 1] or {CLIP_SEARCH!r}, got {value!r}") from None


def _overrides(value: str) -> dict[str, Any]:
    try:
        overrides = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--overrides is not valid JSON ({exc}); write e.g. "
                                         '\'{"*.down_proj.weight": {"a_bits": 8}}\'') from None
    if not isinstance(overrides, dict):
        raise argparse.ArgumentTypeError("--overrides must be a JSON object: weight-name pattern -> settings")
    return overrides


def quant_config(args: argparse.Namespace, rotate: bool = True) -> QuantConfig:
    """The QuantConfig the options of :func:`add_quant_arguments` describe."""
    return QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits, kv_bits=args.kv_bits, w_method=args.w_method,
                       w_group_size=args.group_size, a_clip=args.a_clip, rotate=rotate, seed=args.seed,
                       overrides=args.overrides)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m asaf_fx.calibrate", description=__doc__.strip().splitlines()[2])
    parser.add_argument("--model", required=True, help="'smollm2', a transformers model directory or a .gguf file")
    parser.add_argument("--text", type=Path, help="calibration text; default: the WikiText-2 validation split")
    parser.add_argument("--mode", choices=MODES, default="per-layer",
                        help="per-layer: p×S measured, groups estimated; groups: every group up to --max-length; full")
    parser.add_argument("--max-length", type=int_at_least(1), help="longest measured group in --mode groups")
    parser.add_argument("--sparsities", type=_sparsities, default=DEFAULT_SPARSITIES,
                        help="comma-separated levels in (0, 1), increasing (default 0.01,...,0.15)")
    parser.add_argument("--windows", type=int_at_least(1), default=8,
                        help="windows to fit GPTQ and the channel choice on, and as many other ones to measure ξ on "
                             "(default 8)")
    parser.add_argument("--seq-len", type=int_at_least(1), default=256, help="tokens per window (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="window choice and rotations (default 0)")
    parser.add_argument("--metric", choices=METRICS, default="ppl",
                        help="ppl: relative perplexity rise (default); kl: mean KL to the unpruned model")
    add_quant_arguments(parser)
    parser.add_argument("--no-rotate", action="store_true", help="calibrate the unrotated model")
    parser.add_argument("--granularity", type=int_at_least(1), default=32, help="channels removed per block (default 32)")
    parser.add_argument("--validate", type=int, default=0, metavar="N",
                        help="also measure N random plans and compare with the table's prediction")
    parser.add_argument("--out", type=Path, required=True, help="table file to write (.safetensors)")
    parser.add_argument("--plot", type=Path, help="PNG: heatmap of single-layer ξ (+ validation scatter); needs matplotlib")
    args = parser.parse_args(argv)
    if args.mode == "groups" and args.max_length is None:
        parser.error("--mode groups needs --max-length k (the longest group measured), e.g. --max-length 4")
    if args.mode != "groups" and args.max_length is not None:
        parser.error("--max-length applies to --mode groups only")
    if args.validate < 0:
        parser.error("--validate N needs N >= 0")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'asaf-fx[plot]'")
    try:
        args.quant = quant_config(args, rotate=not args.no_rotate)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    return args


def _text(args: argparse.Namespace) -> Path:
    path = args.text if args.text is not None else wikitext2_valid_path()
    if not path.is_file():
        hint = "" if args.text is not None else " (the default WikiText-2 validation split; set ASAF_FX_DATA)"
        raise FileNotFoundError(f"calibration text {path} does not exist{hint}; pass --text FILE")
    if path.stat().st_size == 0:
        raise ValueError(f"calibration text {path} is empty; pass a text file with at least "
                         f"{args.windows} × {args.seq_len} tokens")
    return path


def fingerprint(args: argparse.Namespace, model, text: Path) -> dict[str, Any]:
    """Everything a measured value depends on; progress made under another fingerprint is refused.
    The mode is not in it: a per-layer run's values are valid entries of a groups run."""
    config = model.config.to_dict()
    return {
        "measured_on": "held-out windows",  # progress from earlier in-sample runs is refused
        "model": str(args.model),
        "architecture": config.get("architectures"),
        "num_layers": config.get("num_hidden_layers"),
        "hidden_size": config.get("hidden_size"),
        "text_sha256": sha256_file(text),
        "windows": args.windows,
        "seq_len": args.seq_len,
        "seed": args.seed,
        "metric": args.metric,
        "quant": args.quant.to_dict(),
        "granularity": args.granularity,
        "sparsities": list(args.sparsities),
        "torch": torch.__version__,
    }


def group_flops(cal: CalibrationModel) -> np.ndarray:
    """H[i, n-1, k]: the pruned FLOPs of layers i..i+n-1 at level k, from the real channel counts."""
    p, levels = cal.num_layers, len(cal.sparsities)
    pruned = np.array(cal.pruned_flops, dtype=np.float64)  # (p, S)
    prefix = np.concatenate([np.zeros((1, levels)), np.cumsum(pruned, axis=0)])
    flops = np.full((p, p, levels), np.nan)
    for start in range(p):
        for length in range(1, p - start + 1):
            flops[start, length - 1] = prefix[start + length] - prefix[start]
    return flops


def random_plans(table: SensitivityTable, count: int, seed: int, longest: int = 4) -> list[list[tuple[int, int, int]]]:
    """Seeded random plans: consecutive groups of 1..longest layers, each pruned (at a random
    level) with probability 1/2; at least one group pruned. Each plan is a list of (start, length, level)."""
    rng = np.random.default_rng(seed)
    plans = []
    while len(plans) < count:
        groups, start = [], 0
        while start < table.num_layers:
            length = int(rng.integers(1, min(longest, table.num_layers - start) + 1))
            if rng.random() < 0.5:
                groups.append((start, length, int(rng.integers(len(table.sparsities)))))
            start += length
        if groups:
            plans.append(groups)
    return plans


def validate(table: SensitivityTable, meter: DegradationMeter, count: int, seed: int) -> dict[str, Any]:
    """Predicted Σξ of random plans against their measured degradation."""
    predicted, measured = [], []
    for groups in random_plans(table, count, seed):
        predicted.append(float(sum(table.degradation[s, n - 1, k] for s, n, k in groups)))
        measured.append(meter({layer: k for s, n, k in groups for layer in range(s, s + n)}))
    pred, meas = np.array(predicted), np.array(measured)
    positive = (pred > 0) & (meas > 0)
    return {
        "plans": count,
        "predicted": predicted,
        "measured": measured,
        "correlation": float(np.corrcoef(pred, meas)[0, 1]) if count > 1 else math.nan,
        "mean_abs_log_ratio": float(np.mean(np.abs(np.log(pred[positive] / meas[positive])))) if positive.any() else math.nan,
        "log_ratio_plans": int(positive.sum()),
    }


def health(singles: np.ndarray) -> dict[str, Any]:
    """How much a (layers × levels) grid of single-layer ξ looks like signal rather than noise.

    Pruning more of a layer should not help, so ξ should be ≥ 0 and rise with the level.
    ``negative_mass``, the summed size of the negative values over the sum of the positive ones,
    says how large the noise (of the measurement, or of re-quantizing the pruned layer) is against
    the effect; ``falling_step_fraction`` catches noise riding on a positive offset (pure noise
    falls in half of the steps). ``noisy``: negative_mass > 0.5 or more than a third of the steps
    fall — the solver would allocate on noise. SmolLM2 (5/10/15 %, 8 × 256 held-out tokens):
    W4A16 0.15 and 23 %; W4A4KV4 with 8-bit down_proj inputs 0.06 and 43 %; W4A4KV4 1.8.
    """
    values = singles[np.isfinite(singles)]
    steps = np.diff(singles, axis=1)
    steps = steps[np.isfinite(steps)]
    positive = float(values[values > 0].sum())
    negative_mass = float(-values[values < 0].sum() / positive) if positive > 0 else math.inf
    falling = float(np.mean(steps < 0)) if steps.size else math.nan
    return {"negative_fraction": float(np.mean(values < 0)) if values.size else math.nan,
            "falling_step_fraction": falling, "negative_mass": negative_mass,
            "noisy": bool(negative_mass > 0.5 or falling > 1 / 3)}


def plot(table: SensitivityTable, validation: dict[str, Any] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from asaf_fx._atomic import atomic_path

    panels = 2 if validation else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 5), squeeze=False)
    ax = axes[0, 0]
    image = ax.imshow(table.degradation[:, 0, :], aspect="auto", cmap="viridis", origin="lower")
    ax.set_xticks(range(len(table.sparsities)), [f"{s:g}" for s in table.sparsities], rotation=90)
    ax.set_xlabel("sparsity")
    ax.set_ylabel("layer")
    ax.set_title(f"single-layer ξ ({table.meta.get('metric')})")
    fig.colorbar(image, ax=ax)
    if validation:
        ax = axes[0, 1]
        ax.scatter(validation["measured"], validation["predicted"], s=12)
        values = validation["measured"] + validation["predicted"]
        ax.plot([min(values), max(values)], [min(values), max(values)], color="grey", linewidth=1)  # y = x
        ax.set_xlabel("measured ξ of the plan")
        ax.set_ylabel("predicted Σ ξ")
        ax.set_title(f"{validation['plans']} random plans, r = {validation['correlation']:.3f}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), world


def run(args: argparse.Namespace, console: Console, loaded: tuple[Any, Any] | None = None) -> SensitivityTable:
    """Measure (or resume) the table ``args`` describes and save it to ``args.out``.

    ``loaded``: the (model, tokenizer) that ``load_model(args.model)`` returns, when the caller
    already holds them (``python -m asaf_fx run``); the model is not modified.
    """
    from asaf_fx.models import load_model

    rank, world = _distributed()
    text = _text(args)
    started = time.perf_counter()
    model, tokenizer = load_model(args.model) if loaded is None else loaded
    torch.manual_seed(args.seed)
    # ξ is measured on windows the model was not fitted on: in-sample, GPTQ and the channel choice
    # hide most of the damage (SmolLM2 W4A4KV4, layer 0 at 6 %: −0.1 % on its fitting windows,
    # +9.8 % on test text) and re-solving a layer's GPTQ looks like a gain of ~10 %.
    windows = calibration_windows(tokenizer, text, 2 * args.windows, args.seq_len, seed=args.seed)
    fit, held = windows[: args.windows], windows[args.windows:]
    batches = calibration_batches(held, getattr(model.config, "max_position_embeddings", None))
    fp = fingerprint(args, model, text)
    console.print(f"building the rotated-quantized model (W{args.w_bits}A{args.a_bits}KV{args.kv_bits} "
                  f"{args.w_method}) on {args.windows} × {args.seq_len} tokens of {text.name}; ξ is measured on "
                  f"{args.windows} other windows ...")
    cal = build_calibration_model(model, args.quant, fit, args.sparsities, args.granularity,
                                  cache_size=(args.max_length or 1) * len(args.sparsities) + len(args.sparsities))
    meter = DegradationMeter(cal, batches, args.metric)
    built = time.perf_counter() - started
    entries = planned_entries(cal.num_layers, len(args.sparsities), args.mode, args.max_length)
    distinct, same_as = distinct_variants(entries, cal.removed)
    console.print(f"base model ready in {built:.0f} s; {len(entries)} entries, {len(distinct)} distinct prunings to measure "
                  f"({args.mode}{f' --max-length {args.max_length}' if args.max_length else ''}, "
                  f"{len(args.sparsities)} levels, metric {args.metric}){f', rank {rank} of {world}' if world > 1 else ''}")
    measuring = time.perf_counter()
    columns = (TextColumn("[bold]calibrate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=rank != 0) as bar:
        task = bar.add_task("measure", total=None)

        def measure(entry):
            start, length, level = entry
            return meter({layer: level for layer in range(start, start + length)})

        def advance(entry, value):
            bar.advance(task)

        values = measure_entries(distinct, measure, args.out, fp, rank=rank, world=world, on_measured=advance,
                                 on_todo=lambda todo: bar.update(task, total=todo))
    measured_s = time.perf_counter() - measuring
    values = {entry: values[same_as[entry]] for entry in entries}
    degradation, measured_mask, estimate = complete_table(cal.num_layers, len(args.sparsities), values, seed=args.seed)
    meta = {
        "model": str(args.model), "metric": args.metric, "mode": args.mode, "max_length": args.max_length,
        "text": str(text), "windows": args.windows, "seq_len": args.seq_len, "seed": args.seed,
        "quant": args.quant.to_dict(), "granularity": args.granularity, "estimate": estimate,
        "layer_forwards": meter.layer_forwards * world, "batches": len(batches),
        "time_s": {"build": round(built, 1), "measure": round(measured_s, 1)},
        "removed_channels": cal.removed, "health": health(degradation[:, 0, :]),
        "fingerprint": fp,
    }
    table = SensitivityTable(np.array(cal.layer_flops, dtype=np.float64), np.array(args.sparsities), degradation,
                             flops=group_flops(cal), meta=meta, measured=measured_mask)
    validation = None
    if args.validate and rank == 0:
        validation = validate(table, meter, args.validate, args.seed)
        table = SensitivityTable(table.layer_flops, table.sparsities, table.degradation, table.flops,
                                 {**meta, "validation": validation}, table.measured)
    if rank == 0:
        table.save(args.out)
        remove_progress(args.out)
        if args.plot is not None:
            plot(table, validation, args.plot)
        summary(console, table, meter, built, measured_s, time.perf_counter() - started, validation)
    return table


def summary(console: Console, table: SensitivityTable, meter: DegradationMeter, built: float, measured: float,
            total: float, validation: dict[str, Any] | None) -> None:
    estimate = table.meta["estimate"]
    singles = table.degradation[:, 0, :]
    console.print(
        f"[bold]table[/bold]: {table.num_layers} layers × {len(table.sparsities)} levels, metric {table.meta['metric']}; "
        f"{estimate['measured_entries']} entries measured, {estimate['estimated_entries']} estimated "
        f"(model {estimate['model']!r}, fitted on {estimate['fitted_on']} measured groups)\n"
        f"single-layer ξ at the top level: min {np.nanmin(singles[:, -1]):.4g}, median {np.nanmedian(singles[:, -1]):.4g}, "
        f"max {np.nanmax(singles[:, -1]):.4g} (layer {int(np.nanargmax(singles[:, -1]))})\n"
        f"cost: {meter.layer_forwards} decoder-layer forwards × batch this run ({len(meter.batches)} batches); "
        f"base build {built:.0f} s, measuring {measured:.0f} s, total {total:.0f} s")
    check = table.meta["health"]
    console.print(f"{check['negative_fraction']:.0%} of single-layer ξ are negative (their summed size is "
                  f"{check['negative_mass']:.2f} × that of the positive ones) and ξ falls in "
                  f"{check['falling_step_fraction']:.0%} of steps to the next level"
                  + (": [bold red]the table looks noise-dominated[/bold red] and the solver would allocate on "
                     "noise (README, 'Sensitivity tables')" if check["noisy"] else ""))
    if validation:
        console.print(f"validation on {validation['plans']} random plans: correlation {validation['correlation']:.3f}, "
                      f"mean |log(predicted/measured)| {validation['mean_abs_log_ratio']:.3f} "
                      f"(over {validation['log_ratio_plans']} plans with both positive)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True)
    try:
        run(args, console)
    except KeyboardInterrupt:
        console.print(f"interrupted: measured values are saved next to {args.out}; rerun the same command to continue",
                      soft_wrap=True)
        return 130
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"error: {exc}", soft_wrap=True, markup=False, highlight=False)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
