"""python -m asaf_fx run --model smollm2|PATH --out DIR [--max-degradation 0.01]

End to end: optionally choose the decoder layers whose inputs get 8 instead of 4 bits
(``--a8-layers``, by each layer's measured gain), calibrate a sensitivity table, solve a plan
within the budget (a layer is pruned at one of the table's levels or left dense), compile the
plan with rotation and quantization, and measure it on held-out text. When the measured degradation
(ppl_asaf / ppl_base − 1 on the evaluation windows) exceeds the budget, the solver's budget is
tightened to δ · budget / measured · 0.9 and the plan solved and compiled again, at most --rounds
times. Writes DIR/table.safetensors, DIR/plan.json, DIR/model (asaf_fx.load), DIR/summary.json and,
with --a8-layers, DIR/activation_gains.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as ProgressBar
from rich.table import Table

from asaf_fx import calibrate
from asaf_fx._atomic import write_text_atomic
from asaf_fx._cli import int_at_least
from asaf_fx.calibration.activation_bits import BITS, ActivationGains, measure_activation_gains
from asaf_fx.calibration.entries import MODES
from asaf_fx.calibration.progress import Progress
from asaf_fx.checkpoint import save
from asaf_fx.compile import compile as compile_model
from asaf_fx.config import PruneConfig, QuantConfig
from asaf_fx.data import (DATA_ENV, calibration_windows, data_dir, perplexity, token_windows, wikitext2_test_path,
                          wikitext2_valid_path)
from asaf_fx.evaluate import read_text, seed_everything
from asaf_fx.inspection import model_totals
from asaf_fx.offline_text import offline_texts
from asaf_fx.solvers import InfeasibleError, solve
from asaf_fx.solvers.problem import charged_degradation
from asaf_fx.sparsity_plan import Plan, uniform_plan
from asaf_fx.table import SensitivityTable

SCHEMA = "asaf_fx.pipeline/1"
# Three levels keep the default table at 90 entries (SmolLM2: 7.5 min on a 2-core CPU, the whole run
# ~12 min); calibrate's 15 levels would take 3.3× as long. At granularity 32 they prune 1, 3 and 6
# blocks of a 1536-wide SmolLM2 MLP: the small levels are where a 1 % budget is spent.
DEFAULT_SPARSITIES = (0.02, 0.05, 0.1)
DEFAULT_EVAL_WINDOWS = 4
TIGHTEN = 0.9  # aim this far below the budget when a round's measurement overshoots it


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m asaf_fx run", description="calibrate → solve → compile → measure, solving again "
                                     "with a tighter budget while the measured degradation exceeds it")
    parser.add_argument("--model", required=True, help="'smollm2', a transformers model directory or a .gguf file")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--max-degradation", type=float, default=0.01,
                        help="budget: relative perplexity rise over the rotated-quantized model (default 0.01)")
    parser.add_argument("--rounds", type=int_at_least(1), default=3,
                        help="solve-compile-measure rounds at most (default 3)")
    parser.add_argument("--text", type=Path, help="calibration text; default: the WikiText-2 validation split")
    parser.add_argument("--eval-text", type=Path, help="evaluation text; default: the WikiText-2 test split")
    parser.add_argument("--eval-windows", type=int_at_least(0), default=DEFAULT_EVAL_WINDOWS,
                        help=f"evaluation windows from the start of --eval-text; 0: every whole window, which "
                        f"takes longer (default {DEFAULT_EVAL_WINDOWS})")
    parser.add_argument("--seq-len", type=int_at_least(1), default=2048, help="evaluation window tokens (default 2048)")
    parser.add_argument("--windows", type=int_at_least(1), default=8, help="calibration windows (default 8)")
    parser.add_argument("--cal-seq-len", type=int_at_least(1), default=256,
                        help="calibration window tokens (default 256)")
    parser.add_argument("--sparsities", type=calibrate._sparsities, default=DEFAULT_SPARSITIES,
                        help=f"table levels, comma-separated, increasing (default {','.join(map(str, DEFAULT_SPARSITIES))})")
    parser.add_argument("--mode", choices=MODES, default="per-layer", help="calibration mode (default per-layer)")
    parser.add_argument("--max-length", type=int_at_least(1), help="longest measured group in --mode groups")
    calibrate.add_quant_arguments(parser)
    parser.add_argument("--a8-layers", type=int_at_least(0), default=0, metavar="K",
                        help="raise the inputs of the K decoder layers that gain most from it (each layer measured "
                             "on calibration text) from 4 to 8 bits; 0: none (default)")
    parser.add_argument("--granularity", type=int_at_least(1), default=32, help="channels removed per block (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="window choice and rotations (default 0)")
    args = parser.parse_args(argv)
    if not math.isfinite(args.max_degradation) or args.max_degradation <= 0:
        parser.error(f"--max-degradation must be a positive number, got {args.max_degradation}")
    if (args.mode == "groups") != (args.max_length is not None):
        parser.error("--max-length k goes with --mode groups, and --mode groups needs it")
    try:
        args.quant = calibrate.quant_config(args)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    return args


def calibration_args(args: argparse.Namespace, text: Path) -> argparse.Namespace:
    """The ``python -m asaf_fx.calibrate`` arguments this run's table is measured with (metric ppl)."""
    argv = ["--model", str(args.model), "--text", str(text), "--out", str(args.out / "table.safetensors"),
            "--mode", args.mode, "--sparsities", ",".join(repr(s) for s in args.sparsities),
            "--windows", str(args.windows), "--seq-len", str(args.cal_seq_len), "--seed", str(args.seed),
            "--metric", "ppl", "--w-bits", str(args.w_bits), "--a-bits", str(args.a_bits),
            "--kv-bits", str(args.kv_bits), "--w-method", args.w_method, "--a-clip", str(args.a_clip),
            "--granularity", str(args.granularity)]
    argv += ["--max-length", str(args.max_length)] if args.max_length is not None else []
    argv += ["--group-size", str(args.group_size)] if args.group_size is not None else []
    argv += ["--overrides", json.dumps(args.overrides)] if args.overrides else []
    return calibrate.parse_args(argv)


def _existing(path: Path | None, default: Path, what: str) -> Path:
    """``path`` (or ``default``), checked before the model loads: it exists, is UTF-8 and not empty."""
    chosen = path if path is not None else default
    if not chosen.is_file():
        hint = f" (the default {what}; pass a file or set ASAF_FX_DATA)" if path is None else ""
        raise FileNotFoundError(f"{what} {chosen} does not exist{hint}")
    read_text(chosen)
    return chosen


def texts(args: argparse.Namespace, console: Console) -> tuple[Path, Path]:
    """The calibration and evaluation texts: ``--text``/``--eval-text``, else WikiText-2 validation/test,
    else (a machine without the shared data) the offline texts written into ``--out``."""
    defaults = (wikitext2_valid_path(), wikitext2_test_path())
    if any(given is None and not default.is_file() for given, default in zip((args.text, args.eval_text), defaults)):
        offline = offline_texts(args.out)
        console.print(f"WikiText-2 is not in {data_dir()} (set {DATA_ENV} to its folder): the missing texts default to "
                      f"Python standard-library docstrings written to {offline[0]} (calibration) and {offline[1]} "
                      "(evaluation); their perplexities are not WikiText-2 perplexities")
        defaults = tuple(d if d.is_file() else o for d, o in zip(defaults, offline))
    text = _existing(args.text, defaults[0], "calibration text")
    eval_text = _existing(args.eval_text, defaults[1], "evaluation text")
    if text.resolve() == eval_text.resolve():
        raise ValueError(f"{text} is both the calibration and the evaluation text; the measured degradation "
                         "would be optimistic: evaluate on held-out text (--eval-text)")
    return text, eval_text


def table_for(args: argparse.Namespace, cal_args: argparse.Namespace, loaded, text: Path,
              console: Console) -> SensitivityTable:
    """DIR/table.safetensors if it was measured with these settings, else calibrate (or resume) it."""
    path = cal_args.out
    if path.is_file():
        table = SensitivityTable.load(path)
        wanted = calibrate.fingerprint(cal_args, loaded[0], text)
        same = (table.meta.get("fingerprint") == wanted and table.meta.get("mode") == args.mode
                and table.meta.get("max_length") == args.max_length)
        if not same:
            raise ValueError(f"{path} was measured with other settings (model, text, windows, quantization, levels "
                             "or mode); delete it or choose another --out")
        console.print(f"reusing the finished table {path}")
        return table
    return calibrate.run(cal_args, console, loaded=loaded)


def activation_bits_for(args: argparse.Namespace, loaded, text: Path, console: Console) -> tuple[QuantConfig, dict[str, Any]]:
    """``args.quant`` with the ``--a8-layers`` layers that gain most at 8 bits; and what to report.

    The gains are measured like the table's ξ (fitted on the first ``--windows`` calibration
    windows, measured on as many others) and kept in DIR/activation_gains.json, which a rerun with
    the same settings reuses; an interrupted measurement resumes from its progress file.
    """
    num_layers = loaded[0].config.num_hidden_layers
    if args.a8_layers > num_layers:
        raise ValueError(f"--a8-layers {args.a8_layers}: the model has only {num_layers} decoder layers")
    path = args.out / "activation_gains.json"
    wanted = {k: v for k, v in calibrate.fingerprint(calibration_args(args, text), loaded[0], text).items()
              if k not in ("sparsities", "granularity")}
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("fingerprint") != wanted:
            raise ValueError(f"{path} was measured with other settings (model, text, windows or quantization); "
                             "delete it or choose another --out")
        gains = ActivationGains.from_dict(saved)
        console.print(f"reusing the measured activation gains {path}")
    else:
        model, tokenizer = loaded
        windows = calibration_windows(tokenizer, text, 2 * args.windows, args.cal_seq_len, seed=args.seed)
        progress = Progress(path.with_name(path.name + ".progress.json"), wanted)  # entries (layer, 1, BITS)
        known = {layer: value for (layer, _, _), value in progress.values.items()}
        with ProgressBar(TextColumn("[bold]8-bit gain per layer"), BarColumn(), MofNCompleteColumn(),
                         TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task("measure", total=num_layers, completed=len(known))

            def record(layer: int, value: float) -> None:
                progress.record((layer, 1, BITS), value)
                bar.advance(task)

            gains = measure_activation_gains(model, args.quant, windows[: args.windows], windows[args.windows:],
                                             known=known, on_layer=record)
        write_text_atomic(path, json.dumps({**gains.to_dict(), "fingerprint": wanted}, indent=2) + "\n")
        progress.path.unlink()
    layers, quant = gains.choose(args.quant, args.a8_layers)
    console.print(f"8-bit inputs in {len(layers)} of {len(gains.gains)} layers ({', '.join(map(str, layers)) or 'none'}): "
                  f"the {args.a8_layers} with the largest measured gain"
                  + (f"; only {len(layers)} help at all" if len(layers) < args.a8_layers else ""))
    return quant, {"bits": BITS, "asked": args.a8_layers, "layers": layers, "gains": gains.gains,
                   "file": path.name}


def fp16_bytes(totals: dict[str, float]) -> int:
    """Bytes of the decoder linears' weights in 16 bits: 2 per weight, and dense FLOPs are 2 per weight."""
    return int(totals["dense_flops"])


def _groups(plan: Plan) -> list[list]:
    return [[g.start, g.stop, g.sparsity] for g in plan.groups]


def _ppl(model, windows: torch.Tensor) -> float:
    return perplexity(lambda batch: model(batch).logits, windows)


@dataclass
class Result:
    summary: dict[str, Any]
    model: Any  # the saved CompiledModel
    plan: Plan
    table: SensitivityTable


def run(args: argparse.Namespace, console: Console) -> Result:
    from asaf_fx.models import load_model

    started = time.perf_counter()
    seed_everything(args.seed)
    text, eval_text = texts(args, console)
    model, tokenizer = load_model(args.model)
    try:
        eval_ids = token_windows(tokenizer, read_text(eval_text), args.seq_len, args.eval_windows or None)
        if eval_ids.shape[0] == 0:
            raise ValueError(f"text is shorter than one window of {args.seq_len} tokens")
    except ValueError as exc:
        raise ValueError(f"{eval_text}: {exc}; use fewer --eval-windows or a shorter --seq-len") from exc
    every = (f" (every whole window: each of the ≥ 4 models evaluated takes {eval_ids.shape[0] / DEFAULT_EVAL_WINDOWS:.0f}× "
             f"as long as with the default {DEFAULT_EVAL_WINDOWS})" if not args.eval_windows else "")
    console.print(f"evaluating on {eval_ids.shape[0]} windows × {args.seq_len} tokens of {eval_text}{every}")
    activation_bits = None
    if args.a8_layers:
        args.quant, activation_bits = activation_bits_for(args, (model, tokenizer), text, console)
        args.overrides = args.quant.overrides  # the table is measured on the mixed-precision model
    cal_args = calibration_args(args, text)
    table = table_for(args, cal_args, (model, tokenizer), text, console)
    cal_ids = calibration_windows(tokenizer, text, args.windows, args.cal_seq_len, seed=args.seed)
    prune = PruneConfig(granularity=args.granularity)

    def build(plan: Plan | None, decode: bool = False):
        return compile_model(model, plan, quant=args.quant, calibration=cal_ids, prune=prune, decode=decode)

    ppl_fp = _ppl(model, eval_ids)
    base = build(None)
    ppl_base, base_totals = _ppl(base, eval_ids), model_totals(base)
    console.print(f"perplexity: 16-bit {ppl_fp:.4f}, rotated-quantized {ppl_base:.4f}")
    del base

    budget, delta = args.max_degradation, args.max_degradation
    levels = (float(table.sparsities[0]), float(table.sparsities[-1]))
    cheapest = float(np.nanmin(charged_degradation(table)[:, :, table.sparsities > 0]))
    rounds: list[dict[str, Any]] = []
    best = None  # (measured, plan, compiled, ppl)
    for number in range(1, args.rounds + 1):
        try:
            plan = solve(table, delta, min_sparsity=levels[0], max_sparsity=levels[1], allow_dense=True)
            if plan.flops_ratio >= 1.0 and rounds and cheapest < rounds[-1]["max_degradation"]:
                # Dense measures 0 by construction, so it teaches nothing: the smallest plan worth
                # measuring after an overshoot is the cheapest single choice.
                delta = cheapest * (1 + 1e-9)
                plan = solve(table, delta, min_sparsity=levels[0], max_sparsity=levels[1], allow_dense=True)
        except InfeasibleError as exc:
            rounds.append({"round": number, "max_degradation": delta, "infeasible": str(exc)})
            console.print(f"round {number}: δ={delta:.4g}: {exc}")
            break
        seen = [r["round"] for r in rounds if r.get("groups") == _groups(plan)]
        if seen:  # a smaller δ gave the same plan: its measurement would not change either
            rounds.append({"round": number, "max_degradation": delta, "same_plan_as_round": seen[0]})
            console.print(f"round {number}: δ={delta:.4g} gives round {seen[0]}'s plan again; stopping")
            break
        compiled = build(plan, decode=True)
        ppl = _ppl(compiled, eval_ids)
        measured = ppl / ppl_base - 1
        rounds.append({"round": number, "max_degradation": delta, "predicted_degradation": plan.predicted_degradation,
                       "measured_degradation": measured, "ppl": ppl, "flops_ratio": plan.flops_ratio,
                       "groups": _groups(plan)})
        console.print(f"round {number}: δ={delta:.4g}, {len(plan.groups)} groups, FLOPs ×{plan.flops_ratio:.4f}, "
                      f"predicted {plan.predicted_degradation:.4g}, measured {measured:.4g} (budget {budget:g})")
        if best is None or measured < best[0]:
            best = (measured, plan, compiled, ppl)
        if measured <= budget:
            break
        delta = delta * budget / measured * TIGHTEN
    if best is None:
        raise InfeasibleError(f"no plan fits --max-degradation {budget:g} in this table: {rounds[-1]['infeasible']}")
    measured, plan, compiled, ppl_asaf = best
    budget_met = measured <= budget

    asaf_totals = model_totals(compiled)
    uniform_s = 1.0 - asaf_totals["flops"] / asaf_totals["dense_flops"]
    if uniform_s > 0:  # channels_to_remove rounds each layer's share to the granularity
        uniform = build(uniform_plan(table.num_layers, uniform_s, table.dense_flops))
        ppl_uniform, uniform_totals = _ppl(uniform, eval_ids), model_totals(uniform)
        del uniform
    else:
        ppl_uniform, uniform_totals = ppl_base, base_totals

    save(compiled, args.out / "model", tokenizer=tokenizer)
    write_text_atomic(args.out / "plan.json", plan.to_json() + "\n")
    summary = {
        "schema": SCHEMA, "model": str(args.model), "budget": budget, "budget_met": budget_met,
        "predicted_degradation": plan.predicted_degradation, "measured_degradation": measured,
        "flops_ratio": asaf_totals["flops"] / asaf_totals["dense_flops"], "plan_flops_ratio": plan.flops_ratio,
        "uniform_sparsity": uniform_s,
        "uniform_flops_ratio": uniform_totals["flops"] / uniform_totals["dense_flops"],
        "ppl_fp": ppl_fp, "ppl_base": ppl_base, "ppl_asaf": ppl_asaf, "ppl_uniform": ppl_uniform,
        "bytes_of": "decoder linear weights (+ their scales)", "fp16_bytes": fp16_bytes(base_totals),
        "base_bytes": int(base_totals["weight_bytes"]), "asaf_bytes": int(asaf_totals["weight_bytes"]),
        "eval_text": str(eval_text), "eval_windows": int(eval_ids.shape[0]), "seq_len": args.seq_len,
        "calibration_text": str(text), "calibration_windows": args.windows, "calibration_seq_len": args.cal_seq_len,
        "quant": args.quant.to_dict(), "activation_bits": activation_bits, "granularity": args.granularity,
        "table_health": table.meta.get("health"),
        "rounds": rounds,
        "files": {"table": "table.safetensors", "plan": "plan.json", "model": "model"},
        "time_s": round(time.perf_counter() - started, 1),
    }
    write_text_atomic(args.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    render(summary, console)
    return Result(summary, compiled, plan, table)


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
    console.print(f"degradation: predicted {summary['predicted_degradation']:.4g}, measured "
                  f"{summary['measured_degradation']:.4g}, {verdict} the budget {summary['budget']:g} "
                  f"after {len(summary['rounds'])} round(s)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)
    try:
        run(args, console)
    except KeyboardInterrupt:
        console.print(f"interrupted: calibration progress is saved in {args.out}; rerun the same command to continue")
        return 130
    except (FileNotFoundError, ValueError) as exc:  # InfeasibleError is a ValueError
        console.print(f"error: {exc}", markup=False, highlight=False)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
