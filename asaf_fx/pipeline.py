"""``asaf_fx.run``: the end-to-end pipeline behind ``python -m asaf_fx run``.

Optionally choose the decoder layers whose inputs get 8 instead of 4 bits (``a8_layers``, by each
layer's measured gain), calibrate a sensitivity table, then search for the plan that removes the
most FLOPs within the budget (``asaf_fx.budget_search``: each round solves at a budget δ — a layer
pruned at one of the table's levels or left dense — compiles the plan with rotation and
quantization and measures ppl / ppl_base − 1 on check windows of the calibration text that the
calibration never read). Only the kept plan is measured on the evaluation text, so no choice is made
on it. Writes OUT/table.safetensors, OUT/plan.json, OUT/model (asaf_fx.load), OUT/summary.json and,
with ``a8_layers``, OUT/activation_gains.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as ProgressBar
from rich.table import Table

from asaf_fx._atomic import write_text_atomic
from asaf_fx.budget_search import dense_plan, search
from asaf_fx.calibration.activation_gains import BITS, ActivationGains, measure_activation_gains
from asaf_fx.calibration.calibrate import CalibrationConfig, calibrate, fingerprint, fit_and_held
from asaf_fx.calibration.progress import Progress
from asaf_fx.checkpoint import save
from asaf_fx.compile import compile as compile_model
from asaf_fx.config import PruneConfig, QuantConfig
from asaf_fx.data import (
    check_windows,
    perplexity,
    token_windows,
    wikitext2_test_path,
    wikitext2_valid_path,
)
from asaf_fx.evaluate import read_text, seed_everything
from asaf_fx.inspection import model_totals
from asaf_fx.passes.quantize.reuse import reuse_quantized_weights
from asaf_fx.plan import Plan, uniform_plan
from asaf_fx.table import SensitivityTable

SCHEMA = "asaf_fx.pipeline/1"
# Three levels keep the default table at 90 entries (SmolLM2: 7.5 min on a 2-core CPU, the whole run
# ~12 min); calibrate's 15 levels would take 3.3× as long. At granularity 32 they prune 1, 3 and 6
# blocks of a 1536-wide SmolLM2 MLP: the small levels are where a 1 % budget is spent.
RUN_SPARSITIES = (0.02, 0.05, 0.1)
DEFAULT_EVAL_WINDOWS = 4


def default_quant() -> QuantConfig:
    """The main job's quantization: W4A8KV8, GPTQ weights, activations unclipped.

    On Hopper the 4-bit weights are read at the same speed whatever the activations' width (decode
    streams the packed weights), and 4-bit activations' float8 GEMMs were 1.1–1.6× faster than
    8-bit ones' int8 in prefill only (H200, BENCHMARKS.md); on SmolLM2 W4A4KV4 costs 2.46× FP
    perplexity, W4A8KV8 1.13× (first 4 test windows, docs/results.md). 8-bit activations also
    make a table entry's standard error 9× smaller.
    """
    return QuantConfig(w_bits=4, a_bits=8, kv_bits=8, w_method="gptq", a_clip=1.0)


@dataclass(frozen=True)
class RunConfig:
    """Settings of :func:`run`.

    ``max_degradation``: the budget, a relative perplexity rise over the rotated-quantized model.
    ``rounds``: solve-compile-measure rounds at most (``asaf_fx.budget_search``). ``text``/``eval_text``:
    calibration and evaluation text files (default: the WikiText-2 validation and test splits);
    ``eval_windows`` windows of ``seq_len`` tokens from the start of ``eval_text`` (0: every whole
    window); the rounds measure as many windows of ``text`` that the calibration did not read (0:
    all of them).
    ``a8_layers``: raise the inputs of the K decoder layers that gain most from it to 8 bits.
    ``z``: standard errors charged per table entry above its ξ (see ``asaf_fx.solve``).
    ``calibration.seed`` is the run's seed (windows, rotations) and must equal ``quant.seed``;
    the table is measured with metric ``ppl``, the budget's unit.
    """

    max_degradation: float = 0.01
    rounds: int = 3
    text: str | os.PathLike | None = None
    eval_text: str | os.PathLike | None = None
    eval_windows: int = DEFAULT_EVAL_WINDOWS
    seq_len: int = 2048
    a8_layers: int = 0
    z: float = 1.0
    quant: QuantConfig = field(default_factory=default_quant)
    calibration: CalibrationConfig = field(default_factory=lambda: CalibrationConfig(sparsities=RUN_SPARSITIES))

    def __post_init__(self) -> None:
        if not math.isfinite(self.max_degradation) or self.max_degradation <= 0:
            raise ValueError(f"max_degradation must be a positive number, got {self.max_degradation}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {self.rounds}")
        if self.eval_windows < 0 or self.seq_len < 1 or self.a8_layers < 0:
            raise ValueError(f"eval_windows ({self.eval_windows}) and a8_layers ({self.a8_layers}) must be >= 0 "
                             f"and seq_len ({self.seq_len}) >= 1")
        if not math.isfinite(self.z) or self.z < 0:
            raise ValueError(f"z (standard errors charged per entry) must be a number >= 0, got {self.z}")
        if self.calibration.metric != "ppl":
            raise ValueError(f"the budget is a relative perplexity rise: calibrate with metric 'ppl', "
                             f"not {self.calibration.metric!r}")
        if self.quant.seed != self.calibration.seed:
            raise ValueError(f"quant.seed {self.quant.seed} differs from calibration.seed {self.calibration.seed}; "
                             "the run has one seed: set both to the same value")

    @property
    def seed(self) -> int:
        return self.calibration.seed


def _existing(path: str | os.PathLike | None, default: Path, what: str) -> Path:
    """``path`` (or ``default``), checked before the model loads: it exists, is UTF-8 and not empty."""
    chosen = Path(path) if path is not None else default
    if not chosen.is_file():
        hint = f" (the default {what}; pass a file or set ASAF_FX_DATA)" if path is None else ""
        raise FileNotFoundError(f"{what} {chosen} does not exist{hint}")
    read_text(chosen)
    return chosen


def texts(config: RunConfig) -> tuple[Path, Path]:
    """The calibration and evaluation texts: the given files, else WikiText-2 validation and test."""
    text = _existing(config.text, wikitext2_valid_path(), "calibration text")
    eval_text = _existing(config.eval_text, wikitext2_test_path(), "evaluation text")
    if text.resolve() == eval_text.resolve():
        raise ValueError(f"{text} is both the calibration and the evaluation text; the measured degradation "
                         "would be optimistic: evaluate on held-out text")
    return text, eval_text


def _stderr_summary(table: SensitivityTable) -> dict[str, float] | None:
    """Median and largest standard error of the measured entries (None for a table without them)."""
    errors = table.stderr[table.measured & np.isfinite(table.stderr)]
    return {"median": float(np.median(errors)), "max": float(errors.max())} if errors.size else None


def table_for(model_name: str, out: Path, config: RunConfig, loaded, text: Path, console: Console) -> SensitivityTable:
    """OUT/table.safetensors if it was measured with these settings, else calibrate (or resume) it."""
    path = out / "table.safetensors"
    if path.is_file():
        table = SensitivityTable.load(path)
        wanted = fingerprint(model_name, loaded[0], text, config.calibration, config.quant)
        same = (table.meta.get("fingerprint") == wanted and table.meta.get("mode") == config.calibration.mode
                and table.meta.get("max_length") == config.calibration.max_length)
        if not same:
            raise ValueError(f"{path} was measured with other settings (model, text, windows, quantization, levels "
                             "or mode); delete it or choose another output directory")
        console.print(f"reusing the finished table {path}")
        return table
    calibration = dataclasses.replace(config.calibration, budget=config.max_degradation)  # what precision to report
    return calibrate(loaded[0], config.quant, text, tokenizer=loaded[1], config=calibration, out=path,
                     model_name=model_name, console=console)


def activation_bits_for(model_name: str, out: Path, config: RunConfig, loaded, text: Path,
                        console: Console) -> tuple[QuantConfig, dict[str, Any]]:
    """``config.quant`` with the ``a8_layers`` layers that gain most at 8 bits; and what to report.

    The gains are measured like the table's ξ (fitted on the table's fitting windows, measured on
    its held-out ones) and kept in OUT/activation_gains.json, which a rerun with the same settings
    reuses; an interrupted measurement resumes from its progress file.
    """
    cal = config.calibration
    num_layers = loaded[0].config.num_hidden_layers
    if config.a8_layers > num_layers:
        raise ValueError(f"a8_layers {config.a8_layers}: the model has only {num_layers} decoder layers")
    path = out / "activation_gains.json"
    wanted = {k: v for k, v in fingerprint(model_name, loaded[0], text, cal, config.quant).items()
              if k not in ("sparsities", "granularity")}
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("fingerprint") != wanted:
            raise ValueError(f"{path} was measured with other settings (model, text, windows or quantization); "
                             "delete it or choose another output directory")
        gains = ActivationGains.from_dict(saved)
        console.print(f"reusing the measured activation gains {path}")
    else:
        model, tokenizer = loaded
        fit, held = fit_and_held(tokenizer, text, cal)
        progress = Progress(path.with_name(path.name + ".progress.json"), wanted)  # entries (layer, 1, BITS)
        known = {layer: value for (layer, _, _), (value, _) in progress.values.items()}
        with ProgressBar(TextColumn("[bold]8-bit gain per layer"), BarColumn(), MofNCompleteColumn(),
                         TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task("measure", total=num_layers, completed=len(known))

            def record(layer: int, value: float) -> None:
                progress.record((layer, 1, BITS), value)
                bar.advance(task)

            gains = measure_activation_gains(model, config.quant, fit, held, known=known, on_layer=record)
        write_text_atomic(path, json.dumps({**gains.to_dict(), "fingerprint": wanted}, indent=2) + "\n")
        progress.path.unlink()
    layers, quant = gains.choose(config.quant, config.a8_layers)
    console.print(f"8-bit inputs in {len(layers)} of {len(gains.gains)} layers "
                  f"({', '.join(map(str, layers)) or 'none'}): "
                  f"the {config.a8_layers} with the largest measured gain"
                  + (f"; only {len(layers)} help at all" if len(layers) < config.a8_layers else ""))
    return quant, {"bits": BITS, "asked": config.a8_layers, "layers": layers, "gains": gains.gains,
                   "file": path.name}


def fp16_bytes(totals: dict[str, float]) -> int:
    """Bytes of the decoder linears' weights in 16 bits: 2 per weight, and dense FLOPs are 2 per weight."""
    return int(totals["dense_flops"])


def _ppl(model, windows: torch.Tensor) -> float:
    return perplexity(lambda batch: model(batch).logits, windows)


@dataclass
class RunResult:
    summary: dict[str, Any]
    model: Any  # the saved CompiledModel
    plan: Plan
    table: SensitivityTable


@dataclass
class Prepared:
    """What :func:`run` and ``asaf_fx.tradeoff_curve`` measure with: the loaded model, the texts and
    their windows, the sensitivity table, and ``config`` with the ``a8_layers`` already applied to
    its ``quant`` (the table is measured on that model)."""

    model_name: str
    config: RunConfig
    model: Any  # the 16-bit transformers model
    tokenizer: Any
    text: Path
    eval_text: Path
    eval_ids: torch.Tensor
    cal_ids: torch.Tensor
    check_ids: torch.Tensor | None  # windows of the calibration text held out from it (run's rounds)
    table: SensitivityTable
    activation_bits: dict[str, Any] | None

    @property
    def prune(self) -> PruneConfig:
        return PruneConfig(granularity=self.config.calibration.granularity, refit=self.config.calibration.refit)

    def build(self, plan: Plan | None):
        """``plan`` compiled (None: the unpruned rotated-quantized base) with the run's quantization,
        calibration windows and pruning."""
        return compile_model(self.model, plan, quant=self.config.quant, calibration=self.cal_ids, prune=self.prune)

    def perplexity(self, model) -> float:
        """Perplexity of ``model`` (compiled or not) on the evaluation windows."""
        return _ppl(model, self.eval_ids)


def prepare(model_name: str, out: Path, config: RunConfig, console: Console, models: str = "≥ 4",
            check: bool = False) -> Prepared:
    """Seed, check the texts, load the model, cut the evaluation windows (and with ``check``, as many
    check windows of the calibration text), choose the 8-bit layers (``a8_layers``) and calibrate
    or reuse OUT/table.safetensors. ``models``: how many models the caller evaluates, for the note
    on the cost of ``eval_windows=0``."""
    from asaf_fx.models import load_model

    seed_everything(config.seed)
    text, eval_text = texts(config)
    model, tokenizer = load_model(model_name)
    try:
        eval_ids = token_windows(tokenizer, read_text(eval_text), config.seq_len, config.eval_windows or None)
        if eval_ids.shape[0] == 0:
            raise ValueError(f"text is shorter than one window of {config.seq_len} tokens")
    except ValueError as exc:
        raise ValueError(f"{eval_text}: {exc}; use fewer evaluation windows or a shorter sequence length") from exc
    every = (f" (every whole window: each of the {models} models evaluated takes "
             f"{eval_ids.shape[0] / DEFAULT_EVAL_WINDOWS:.0f}× "
             f"as long as with the default {DEFAULT_EVAL_WINDOWS})" if not config.eval_windows else "")
    console.print(f"evaluating on {eval_ids.shape[0]} windows × {config.seq_len} tokens of {eval_text}{every}")
    activation_bits = None
    if config.a8_layers:
        quant, activation_bits = activation_bits_for(model_name, out, config, (model, tokenizer), text, console)
        config = dataclasses.replace(config, quant=quant)  # the table is measured on the mixed-precision model
    cal = config.calibration
    table = table_for(model_name, out, config, (model, tokenizer), text, console)
    cal_ids, _ = fit_and_held(tokenizer, text, cal)  # compiled on the windows the table was fitted on
    check_ids = None
    if check:
        # Every window calibration draws (the table's fitting and held-out ones) is avoided.
        check_ids = check_windows(tokenizer, text, config.eval_windows or None, config.seq_len,
                                  avoid=(cal.drawn, cal.seq_len, cal.seed))
        console.print(f"the rounds measure on {check_ids.shape[0]} windows × {config.seq_len} tokens of {text} "
                      "that the calibration did not read")
    return Prepared(model_name, config, model, tokenizer, text, eval_text, eval_ids, cal_ids, check_ids, table,
                    activation_bits)


@dataclass
class BaseMeasures:
    """Perplexity of the 16-bit model and of the unpruned rotated-quantized base on the evaluation
    windows, the base's on the check windows (None without them), and the base's
    :func:`model_totals` (its FLOPs are the dense FLOPs)."""

    ppl_fp: float
    ppl_base: float
    totals: dict[str, float]
    ppl_check: float | None


def measure_base(prepared: Prepared, console: Console) -> BaseMeasures:
    ppl_fp = prepared.perplexity(prepared.model)
    base = prepared.build(None)
    ppl_base, totals = prepared.perplexity(base), model_totals(base)
    ppl_check = None if prepared.check_ids is None else _ppl(base, prepared.check_ids)
    console.print(f"perplexity: 16-bit {ppl_fp:.4f}, rotated-quantized {ppl_base:.4f}"
                  + ("" if ppl_check is None else f" (check windows: {ppl_check:.4f})"))
    return BaseMeasures(ppl_fp, ppl_base, totals, ppl_check)


def run(model: str | os.PathLike, out: str | os.PathLike, config: RunConfig = RunConfig(),
        console: Console | None = None) -> RunResult:
    """Calibrate, solve, compile and measure ``model`` ('smollm2', a transformers directory or a .gguf
    file) as ``config`` asks, writing every artefact into ``out``; a rerun reuses what is finished.

    The calibration base and every compile quantize the same weights from the same inputs up to the
    first pruned layer: each such weight is quantized once (``reuse_quantized_weights``)."""
    with reuse_quantized_weights():
        return _run(model, out, config, console)


def _run(model: str | os.PathLike, out: str | os.PathLike, config: RunConfig, console: Console | None) -> RunResult:
    console = console if console is not None else Console(stderr=True, soft_wrap=True)
    model_name, out = str(model), Path(out)
    started = time.perf_counter()
    prepared = prepare(model_name, out, config, console, check=True)
    config, table, build = prepared.config, prepared.table, prepared.build
    tokenizer, text, eval_text, eval_ids = prepared.tokenizer, prepared.text, prepared.eval_text, prepared.eval_ids
    activation_bits, cal = prepared.activation_bits, config.calibration
    base = measure_base(prepared, console)
    budget = config.max_degradation

    def measure(plan: Plan) -> tuple[float, Any]:
        compiled = build(plan)
        return _ppl(compiled, prepared.check_ids) / base.ppl_check - 1, compiled

    rounds, kept = search(table, budget, config.z, config.rounds, measure, console.print)
    if kept is None:
        plan = dense_plan(table, budget)
        console.print("no pruned plan measured within the budget on the check windows: the model stays dense")
        compiled, checked = build(plan), 0.0
    else:
        plan, compiled, checked = kept.plan, kept.result, kept.degradation
    ppl_asaf = _ppl(compiled, eval_ids)
    measured = ppl_asaf / base.ppl_base - 1
    console.print(f"the kept plan on the evaluation text: perplexity {ppl_asaf:.4f}, degradation {measured:.4g}")

    asaf_totals = model_totals(compiled)
    uniform_s = 1.0 - asaf_totals["flops"] / asaf_totals["dense_flops"]
    if uniform_s > 0:  # channels_to_remove rounds each layer's share to the granularity
        uniform = build(uniform_plan(table.num_layers, uniform_s, table.dense_flops))
        ppl_uniform, uniform_totals = _ppl(uniform, eval_ids), model_totals(uniform)
        del uniform
    else:
        ppl_uniform, uniform_totals = base.ppl_base, base.totals

    save(compiled, out / "model", tokenizer=tokenizer, overwrite=True)  # a rerun replaces its own model
    write_text_atomic(out / "plan.json", plan.to_json() + "\n")
    summary = {
        "schema": SCHEMA, "model": model_name, "budget": budget, "budget_met": measured <= budget,
        "predicted_degradation": plan.predicted_degradation, "measured_degradation": measured,
        "check_degradation": checked, "budget_met_on_check": checked <= budget,
        "flops_ratio": asaf_totals["flops"] / asaf_totals["dense_flops"], "plan_flops_ratio": plan.flops_ratio,
        "uniform_sparsity": uniform_s,
        "uniform_flops_ratio": uniform_totals["flops"] / uniform_totals["dense_flops"],
        "ppl_fp": base.ppl_fp, "ppl_base": base.ppl_base, "ppl_asaf": ppl_asaf, "ppl_uniform": ppl_uniform,
        "ppl_check_base": base.ppl_check,
        "bytes_of": "decoder linear weights (+ their scales)", "fp16_bytes": fp16_bytes(base.totals),
        "base_bytes": int(base.totals["weight_bytes"]), "asaf_bytes": int(asaf_totals["weight_bytes"]),
        "eval_text": str(eval_text), "eval_windows": int(eval_ids.shape[0]), "seq_len": config.seq_len,
        "check_windows": int(prepared.check_ids.shape[0]),
        "calibration_text": str(text), "calibration_windows": cal.windows,
        "calibration_fit_windows": cal.fit_windows, "calibration_seq_len": cal.seq_len,
        "quant": config.quant.to_dict(), "activation_bits": activation_bits, "granularity": cal.granularity,
        "table_health": table.meta.get("health"), "z": config.z, "table_stderr": _stderr_summary(table),
        "rounds": rounds,
        "files": {"table": "table.safetensors", "plan": "plan.json", "model": "model"},
        "time_s": round(time.perf_counter() - started, 1),
    }
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    render(summary, console)
    return RunResult(summary, compiled, plan, table)


def render(summary: dict[str, Any], console: Console) -> None:
    grid = Table(title=f"asaf_fx run: {summary['model']} ({summary['eval_windows']}×{summary['seq_len']} eval tokens)")
    for column in ("model", "perplexity", "FLOPs ×", "weight bytes"):
        grid.add_column(column, justify="left" if column == "model" else "right")
    grid.add_row("16-bit", f"{summary['ppl_fp']:.4f}", "1", f"{summary['fp16_bytes']:,}")
    raised = (summary.get("activation_bits") or {}).get("layers")
    base = "rotated-quantized" + (f" (8-bit inputs in {len(raised)} layers)" if raised else "")
    grid.add_row(base, f"{summary['ppl_base']:.4f}", "1", f"{summary['base_bytes']:,}")
    grid.add_row("+ uniform sparsity", f"{summary['ppl_uniform']:.4f}", f"{summary['uniform_flops_ratio']:.4f}", "")
    grid.add_row("+ ASAF plan", f"{summary['ppl_asaf']:.4f}", f"{summary['flops_ratio']:.4f}",
                 f"{summary['asaf_bytes']:,}")
    console.print(grid)
    if summary["uniform_flops_ratio"] >= 1.0 > summary["flops_ratio"]:
        console.print(f"uniform sparsity {summary['uniform_sparsity']:.2%} removes no channel: each layer's share "
                      f"rounds to zero blocks of {summary['granularity']}, so the uniform row is the unpruned base")
    verdict = ("within" if summary["budget_met"] else "[bold red]BUDGET NOT MET[/bold red]: above")
    console.print(f"degradation: predicted {summary['predicted_degradation']:.4g}, on the check windows "
                  f"{summary['check_degradation']:.4g} after {len(summary['rounds'])} round(s), on the evaluation "
                  f"text {summary['measured_degradation']:.4g}: {verdict} the budget {summary['budget']:g}")


