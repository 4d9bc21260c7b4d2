"""``asaf_fx.calibrate``: measure the sensitivity table the solver reads.

ξ(group, s) is the degradation of the rotated-quantized model when the layers of one group are
pruned at s, measured on calibration windows of a text file the model was not fitted on; H is each
group's FLOPs after pruning at the real channel granularity. Resumable: with ``out`` given, every
measured value is saved at once beside the table, and calling again with the same settings
continues where it stopped.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from asaf_fx.calibration.entries import MODES, distinct_variants, planned_entries
from asaf_fx.calibration.estimate import complete_stderr, complete_table
from asaf_fx.calibration.measure import METRICS, DegradationMeter
from asaf_fx.calibration.progress import Progress as SavedProgress
from asaf_fx.calibration.runner import measure_entries, progress_files, remove_progress
from asaf_fx.calibration.variants import CalibrationModel, build_calibration_model
from asaf_fx.compile import calibration_batches
from asaf_fx.config import QuantConfig
from asaf_fx.data import calibration_windows, text_sha256, wikitext2_valid_path
from asaf_fx.passes.prune.channel_selection import RIDGE
from asaf_fx.table import SensitivityTable

DEFAULT_SPARSITIES = tuple(round(0.01 * k, 2) for k in range(1, 16))
FIT_WINDOWS = 32


@dataclass(frozen=True)
class CalibrationConfig:
    """What a sensitivity table is measured on and how.

    ``mode``: ``per-layer`` measures every single layer at every level and estimates the groups;
    ``groups`` also measures every group of up to ``max_length`` layers; ``full`` measures all.
    ``fit_windows`` windows of ``seq_len`` tokens fit GPTQ, the channel choice and the refit;
    ``windows`` other ones measure ξ (their count sets each entry's standard error, and the
    calibration's time is proportional to it; the fit costs only the base build). ``metric``:
    ``ppl`` (relative perplexity rise) or ``kl`` (mean KL to the unpruned model). ``granularity``
    and ``refit`` (the ridge refit of down_proj over the kept channels): how pruning is done, as in
    the :class:`PruneConfig` the plan will be compiled with.
    ``validate``: also measure that many random plans and compare them with the table's prediction.
    """

    mode: str = "per-layer"
    max_length: int | None = None
    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES
    windows: int = 8
    fit_windows: int = FIT_WINDOWS
    seq_len: int = 256
    seed: int = 0
    metric: str = "ppl"
    granularity: int = 32
    refit: bool = True
    validate: int = 0
    budget: float = 0.01

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.mode == "groups" and self.max_length is None:
            raise ValueError("mode 'groups' needs max_length k (the longest group measured), e.g. 4")
        if self.mode != "groups" and self.max_length is not None:
            raise ValueError("max_length applies to mode 'groups' only")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {self.max_length}")
        levels = tuple(float(s) for s in self.sparsities)
        if not levels:
            raise ValueError("give at least one sparsity, e.g. (0.05, 0.1)")
        if any(not 0 < s < 1 for s in levels):
            raise ValueError(f"every sparsity must lie in (0, 1); got {list(levels)}")
        if any(b <= a for a, b in zip(levels, levels[1:])):
            raise ValueError(f"sparsities must be strictly increasing; got {list(levels)}")
        object.__setattr__(self, "sparsities", levels)
        for name in ("windows", "fit_windows", "seq_len", "granularity"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not isinstance(self.refit, bool):
            raise ValueError(f"refit must be True or False, got {self.refit!r}")
        if self.metric not in METRICS:
            raise ValueError(f"metric {self.metric!r} is not one of {', '.join(METRICS)}")
        if not math.isfinite(self.budget) or self.budget <= 0:
            raise ValueError(f"budget must be a number > 0 (e.g. 0.01 for 1 %), got {self.budget}")
        if self.validate < 0:
            raise ValueError(f"validate (random plans to check) must be >= 0, got {self.validate}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sparsities": list(self.sparsities)}

    @property
    def drawn(self) -> int:
        """Windows drawn from the text: the fitting ones first, then the held-out ones."""
        return self.fit_windows + self.windows


def fit_and_held(tokenizer, text: str | os.PathLike, config: CalibrationConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows that fit the model and the other ones ξ is measured on, from one seeded draw;
    the fitting windows are the ones ``calibration_windows(…, config.fit_windows, …)`` returns."""
    windows = calibration_windows(tokenizer, text, config.drawn, config.seq_len, seed=config.seed)
    return windows[: config.fit_windows], windows[config.fit_windows:]


def calibration_text(text: str | os.PathLike | None, config: CalibrationConfig) -> Path:
    """``text`` (default: the WikiText-2 validation split), checked to exist and hold something."""
    path = Path(text) if text is not None else wikitext2_valid_path()
    if not path.is_file():
        hint = "" if text is not None else " (the default WikiText-2 validation split; set ASAF_FX_DATA)"
        raise FileNotFoundError(f"calibration text {path} does not exist{hint}; pass another text file")
    if path.stat().st_size == 0:
        raise ValueError(f"calibration text {path} is empty; pass a text file with at least "
                         f"{config.drawn} × {config.seq_len} tokens")
    return path


def fingerprint(model_name: str, model, text: Path, config: CalibrationConfig, quant: QuantConfig) -> dict[str, Any]:
    """Everything a measured value depends on; progress made under another fingerprint is refused.
    The mode is not in it: a per-layer run's values are valid entries of a groups run."""
    hf_config = model.config.to_dict()
    return {
        "measured_on": "held-out windows",  # progress from earlier in-sample runs is refused
        "model": str(model_name),
        "architecture": hf_config.get("architectures"),
        "num_layers": hf_config.get("num_hidden_layers"),
        "hidden_size": hf_config.get("hidden_size"),
        "text_sha256": text_sha256(text),
        "windows": config.windows,
        # only when it differs, so progress measured before the two counts were separate is still read
        **({"fit_windows": config.fit_windows} if config.fit_windows != config.windows else {}),
        "seq_len": config.seq_len,
        "seed": config.seed,
        "metric": config.metric,
        "quant": quant.to_dict(),
        "granularity": config.granularity,
        # only when on, so progress measured without the refit (before it existed) is still read
        **({"refit_ridge": RIDGE} if config.refit else {}),
        "sparsities": list(config.sparsities),
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
        "mean_abs_log_ratio": float(np.mean(np.abs(np.log(pred[positive] / meas[positive]))))
        if positive.any()
        else math.nan,
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


def calibrate(model, quant: QuantConfig, text: str | os.PathLike | None = None, *, tokenizer,
              config: CalibrationConfig = CalibrationConfig(), out: str | os.PathLike | None = None,
              model_name: str | None = None, plot_path: str | os.PathLike | None = None,
              console: Console | None = None) -> SensitivityTable:
    """Measure the sensitivity table of ``model`` rotated and quantized as ``quant`` asks.

    ``text``: a text file to calibrate on (default: the embedded WikiText-2 validation split);
    ``tokenizer`` turns it into windows. ``out``: the table file (.safetensors); progress is kept
    beside it, so an interrupted call resumes. ``model_name`` is recorded in the table (default:
    the model config's ``name_or_path``). ``plot_path``: a PNG heatmap of single-layer ξ (needs
    matplotlib). Under ``torchrun`` each process measures every WORLD_SIZE-th entry. The model is
    not modified.
    """
    console = console if console is not None else Console(stderr=True)
    name = model_name if model_name is not None else (getattr(model.config, "name_or_path", "") or type(model).__name__)
    rank, world = _distributed()
    text = calibration_text(text, config)
    if out is None:
        with tempfile.TemporaryDirectory(prefix="asaf_fx-calibrate-") as scratch:
            return _calibrate(model, tokenizer, quant, text, config, Path(scratch) / "table.safetensors", name,
                              plot_path, console, rank, world, keep=False)
    return _calibrate(model, tokenizer, quant, text, config, Path(out), name, plot_path, console, rank, world,
                      keep=True)


def _calibrate(model, tokenizer, quant: QuantConfig, text: Path, config: CalibrationConfig, out: Path, name: str,
               plot_path, console: Console, rank: int, world: int, keep: bool) -> SensitivityTable:
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    # ξ is measured on windows the model was not fitted on: in-sample, GPTQ and the channel choice
    # hide most of the damage (SmolLM2 W4A4KV4, layer 0 at 6 %: −0.1 % on its fitting windows,
    # +9.8 % on test text) and re-solving a layer's GPTQ looks like a gain of ~10 %.
    fit, held = fit_and_held(tokenizer, text, config)
    batches = calibration_batches(held, getattr(model.config, "max_position_embeddings", None))
    fp = fingerprint(name, model, text, config, quant)
    # Checked before the (slow) base model is built: progress of other settings is refused at once.
    earlier = {path: len(SavedProgress(path, fp).values) for path in progress_files(out)}
    if any(earlier.values()):
        console.print(f"resuming: {sum(earlier.values())} values measured earlier are read from "
                      f"{', '.join(str(p) for p in earlier)}")
    console.print(f"building the rotated-quantized model (W{quant.w_bits}A{quant.a_bits}KV{quant.kv_bits} "
                  f"{quant.w_method}) on {config.fit_windows} × {config.seq_len} tokens of {text.name}; ξ is measured "
                  f"on {config.windows} other windows ...")
    levels = len(config.sparsities)
    cal = build_calibration_model(model, quant, fit, config.sparsities, config.granularity,
                                  cache_size=(config.max_length or 1) * levels + levels, refit=config.refit)
    meter = DegradationMeter(cal, batches, config.metric)
    built = time.perf_counter() - started
    entries = planned_entries(cal.num_layers, levels, config.mode, config.max_length)
    distinct, same_as = distinct_variants(entries, cal.removed)
    groups = f" max_length {config.max_length}" if config.max_length else ""
    console.print(f"base model ready in {built:.0f} s; {len(entries)} entries, {len(distinct)} distinct prunings to "
                  f"measure ({config.mode}{groups}, {levels} levels, metric {config.metric})"
                  f"{f', rank {rank} of {world}' if world > 1 else ''}")
    measuring = time.perf_counter()
    columns = (TextColumn("[bold]calibrate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=rank != 0) as bar:
        task = bar.add_task("measure", total=None)

        def measure(entry):
            start, length, level = entry
            return meter.measure({layer: level for layer in range(start, start + length)})

        def advance(entry, value):
            bar.advance(task)

        values = measure_entries(distinct, measure, out, fp, rank=rank, world=world, on_measured=advance,
                                 on_todo=lambda todo: bar.update(task, total=todo))
    measured_s = time.perf_counter() - measuring
    values = {entry: values[same_as[entry]] for entry in entries}
    degradation, measured_mask, estimate = complete_table(cal.num_layers, levels,
                                                          {e: v for e, (v, _) in values.items()}, seed=config.seed)
    stderr = complete_stderr(cal.num_layers, levels, {e: se for e, (_, se) in values.items()})
    meta = {
        "model": name, "metric": config.metric, "mode": config.mode, "max_length": config.max_length,
        "text": str(text), "windows": config.windows, "fit_windows": config.fit_windows, "seq_len": config.seq_len,
        "seed": config.seed, "quant": quant.to_dict(), "granularity": config.granularity,
        "refit_ridge": RIDGE if config.refit else None, "estimate": estimate,
        "layer_forwards": meter.layer_forwards * world, "batches": len(batches),
        "time_s": {"build": round(built, 1), "measure": round(measured_s, 1)},
        "removed_channels": cal.removed, "health": health(degradation[:, 0, :]),
        "fingerprint": fp,
    }
    table = SensitivityTable(np.array(cal.layer_flops, dtype=np.float64), np.array(config.sparsities), degradation,
                             flops=group_flops(cal), meta=meta, measured=measured_mask, stderr=stderr)
    validation = None
    if config.validate and rank == 0:
        validation = validate(table, meter, config.validate, config.seed)
        table = SensitivityTable(table.layer_flops, table.sparsities, table.degradation, table.flops,
                                 {**meta, "validation": validation}, table.measured, table.stderr)
    if rank == 0:
        if keep:
            table.save(out)
        remove_progress(out)
        if plot_path is not None:
            plot(table, validation, Path(plot_path))
        summary(console, table, meter, built, measured_s, time.perf_counter() - started, validation)
        precision(console, table, meter.tokens, config.budget)
    return table


def precision(console: Console, table: SensitivityTable, tokens: int, budget: float) -> dict[str, Any]:
    """Report the measured entries whose standard error exceeds budget/4, and the held-out tokens
    that would bring the worst under it (the error falls as 1/√tokens)."""
    errors = table.stderr[table.measured & np.isfinite(table.stderr)]
    if not errors.size:
        return {}
    limit = budget / 4
    worst = float(errors.max())
    over = int((errors > limit).sum())
    needed = math.ceil(tokens * (worst / limit) ** 2)
    console.print(f"standard errors of the {errors.size} measured entries: median {np.median(errors):.3g}, max "
                  f"{worst:.3g}; {over} exceed δ/4 = {limit:.3g} (δ = {budget:g})"
                  + (f": measuring on about {needed} held-out tokens instead of {tokens} would bring all under it"
                     if over else ""))
    return {"median": float(np.median(errors)), "max": worst, "over": over, "tokens_needed": needed}


def summary(console: Console, table: SensitivityTable, meter: DegradationMeter, built: float, measured: float,
            total: float, validation: dict[str, Any] | None) -> None:
    estimate = table.meta["estimate"]
    singles = table.degradation[:, 0, :]
    console.print(
        f"[bold]table[/bold]: {table.num_layers} layers × {len(table.sparsities)} levels, metric "
        f"{table.meta['metric']}; "
        f"{estimate['measured_entries']} entries measured, {estimate['estimated_entries']} estimated "
        f"(model {estimate['model']!r}, fitted on {estimate['fitted_on']} measured groups)\n"
        f"single-layer ξ at the top level: min {np.nanmin(singles[:, -1]):.4g}, median "
        f"{np.nanmedian(singles[:, -1]):.4g}, "
        f"max {np.nanmax(singles[:, -1]):.4g} (layer {int(np.nanargmax(singles[:, -1]))})\n"
        f"cost: {meter.layer_forwards} decoder-layer forwards × batch this run ({len(meter.batches)} batches); "
        f"base build {built:.0f} s, measuring {measured:.0f} s, total {total:.0f} s")
    check = table.meta["health"]
    falls = check["falling_step_fraction"]
    console.print(f"{check['negative_fraction']:.0%} of single-layer ξ are negative (their summed size is "
                  f"{check['negative_mass']:.2f} × that of the positive ones)"
                  + ("" if math.isnan(falls) else f" and ξ falls in {falls:.0%} of steps to the next level")
                  + (": [bold red]the table looks noise-dominated[/bold red] and the solver would allocate on "
                     "noise (docs/results.md, 'Sensitivity tables')" if check["noisy"] else ""))
    if validation:
        console.print(f"validation on {validation['plans']} random plans: correlation {validation['correlation']:.3f}, "
                      f"mean |log(predicted/measured)| {validation['mean_abs_log_ratio']:.3f} "
                      f"(over {validation['log_ratio_plans']} plans with both positive)")
