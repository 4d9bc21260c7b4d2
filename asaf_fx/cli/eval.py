"""python -m asaf_fx eval (MODEL_DIR | --model smollm2|PATH [--rotate]) [--text FILE] [--tasks a,b --include-path DIR]

Perplexity on a text file and lm-eval tasks for one model; prints the results as JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from asaf_fx.checkpoint import load_saved
from asaf_fx.cli.arguments import emit_report, int_at_least
from asaf_fx.data import wikitext2_test_path
from asaf_fx.evaluate import evaluate, read_text, seed_everything
from asaf_fx.models import load_model

SCHEMA = "asaf_fx.eval/1"


def _task_list(value: str) -> list[str]:
    tasks = [t.strip() for t in value.split(",") if t.strip()]
    if not tasks:
        raise argparse.ArgumentTypeError("give at least one task name, e.g. --tasks arc_easy,hellaswag")
    return tasks


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m asaf_fx eval", description=__doc__.strip().splitlines()[2])
    parser.add_argument("model_dir", nargs="?", type=Path, metavar="MODEL_DIR",
                        help="a compiled model saved by asaf_fx.save (with its tokenizer); instead of --model")
    parser.add_argument("--model", help="'smollm2', a transformers model directory or a .gguf file")
    parser.add_argument("--rotate", action="store_true",
                        help="evaluate asaf_fx.compile(model): QuaRot rotations only, 16-bit")
    parser.add_argument("--text", type=Path,
                        help="text file for perplexity; default: the WikiText-2 test file, unless --tasks is given")
    parser.add_argument("--seq-len", type=int_at_least(2), default=2048, help="tokens per window (default 2048)")
    parser.add_argument("--windows", type=int_at_least(0), default=8,
                        help="windows from the start of the text (default 8; 0 = every whole window)")
    parser.add_argument("--tasks", type=_task_list, help="comma-separated lm-eval task names")
    parser.add_argument("--include-path", type=Path, help="folder of lm-eval task YAML files (local tasks)")
    parser.add_argument("--limit", type=int_at_least(1), help="at most N documents per lm-eval task")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="seed for rotations and lm-eval (default 0)")
    parser.add_argument("--out", type=Path, help="also write the JSON here (atomically)")
    args = parser.parse_args(argv)
    if (args.model_dir is None) == (args.model is None):
        parser.error("give either MODEL_DIR (a directory written by asaf_fx.save) or --model, not both or neither")
    if args.model_dir is not None and args.rotate:
        parser.error("--rotate applies to --model; a saved MODEL_DIR is already compiled")
    if args.tasks is None and (args.include_path is not None or args.limit is not None):
        parser.error("--include-path and --limit apply to lm-eval tasks; add --tasks")
    return args


def _text_path(args: argparse.Namespace) -> Path | None:
    """The file to measure perplexity on: --text, else WikiText-2 test when no tasks were asked for."""
    if args.text is not None:
        return args.text
    if args.tasks:
        return None
    default = wikitext2_test_path()
    if not default.is_file():
        raise FileNotFoundError(f"no --text given and the WikiText-2 test file is not at {default}; "
                                "pass --text FILE or set ASAF_FX_DATA to a folder that holds it")
    return default


def render(report: dict[str, Any], console: Console) -> None:
    """One row per perplexity and per lm-eval metric (stderr beside its metric)."""
    title = f"asaf_fx.eval: {report['model']}" + (" (rotated)" if report["rotate"] else "")
    grid = Table(title=title)
    for column in ("what", "metric", "value", "stderr"):
        grid.add_column(column, justify="left" if column == "what" else "right")
    if "perplexity" in report:
        ppl = report["perplexity"]
        grid.add_row(
            Path(ppl["file"]).name, f"perplexity ({ppl['windows']}×{ppl['seq_len']})", f"{ppl['perplexity']:.4f}", ""
        )
    for task, metrics in report.get("lm_eval", {}).get("tasks", {}).items():
        for name, value in metrics.items():
            if name == "n" or "_stderr" in name or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(name.replace(",", "_stderr,", 1) if "," in name else f"{name}_stderr", "")
            grid.add_row(task, name, f"{value:.4f}", f"{stderr:.4f}" if isinstance(stderr, float) else str(stderr))
    console.print(grid)


def evaluate_cli(args: argparse.Namespace) -> dict[str, Any]:
    """Load (and with --rotate compile) the model, then :func:`asaf_fx.evaluate.evaluate` it."""
    seed_everything(args.seed)
    text = _text_path(args)
    if text is not None:
        read_text(text)  # fail on a missing or empty file before the model loads
    if args.include_path is not None and not args.include_path.is_dir():
        raise FileNotFoundError(f"--include-path {args.include_path} is not a directory of lm-eval task YAML files")
    name = args.model if args.model_dir is None else str(args.model_dir)
    report: dict[str, Any] = {"schema": SCHEMA, "model": name, "rotate": args.rotate, "seed": args.seed}
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    model, tokenizer = load_model(args.model) if args.model_dir is None else load_saved(args.model_dir)
    seconds["load"] = time.perf_counter() - start
    if args.rotate:
        import asaf_fx

        start = time.perf_counter()
        quant = asaf_fx.QuantConfig(w_bits=16, a_bits=16, kv_bits=16, rotate=True, seed=args.seed)
        model = asaf_fx.compile(model, quant=quant)
        seconds["compile"] = time.perf_counter() - start
    results = evaluate(model, tokenizer, text=text, seq_len=args.seq_len, windows=args.windows or None,
                       tasks=args.tasks, include_path=args.include_path, limit=args.limit, seed=args.seed)
    seconds.update(results.pop("seconds"))
    report.update(results)
    report["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    errors = Console(stderr=True, soft_wrap=True)
    try:
        report = evaluate_cli(args)
    except ConnectionError as exc:  # lm-eval's built-in tasks download their data from the hub
        errors.print(Text.assemble(("error: ", "bold red"), f"{exc}. Without the Hugging Face hub, point a task at "
                                   "local files: a task YAML under --include-path (see docs/cli.md)"))
        return 2
    except (OSError, ValueError, NotImplementedError) as exc:
        errors.print(Text.assemble(("error: ", "bold red"), str(exc)))
        return 2
    emit_report(report, args.out, render, errors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
