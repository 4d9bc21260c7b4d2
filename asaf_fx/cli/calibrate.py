"""python -m asaf_fx calibrate --model smollm2|PATH --out TABLE.safetensors [--mode per-layer|groups|full]

Measure the sensitivity table the solver reads (``asaf_fx.calibrate``). Resumable: progress is saved
after every measurement, and rerunning the same command continues where it stopped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from asaf_fx.calibration.calibrate import (
    DEFAULT_SPARSITIES,
    FIT_WINDOWS,
    CalibrationConfig,
    calibrate,
    calibration_text,
)
from asaf_fx.calibration.entries import MODES
from asaf_fx.calibration.measure import METRICS
from asaf_fx.cli.arguments import (
    NO_REFIT_HELP,
    add_quant_arguments,
    int_at_least,
    quant_config,
    run_cli,
    sparsity_list,
)
from asaf_fx.models import load_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m asaf_fx calibrate", description=__doc__.strip().splitlines()[2])
    parser.add_argument("--model", required=True, help="'smollm2', a transformers model directory or a .gguf file")
    parser.add_argument("--text", type=Path, help="calibration text; default: the WikiText-2 validation split")
    parser.add_argument("--mode", choices=MODES, default="per-layer",
                        help="per-layer: p×S measured, groups estimated; groups: every group up to --max-length; full")
    parser.add_argument("--max-length", type=int_at_least(1), help="longest measured group in --mode groups")
    parser.add_argument("--sparsities", type=sparsity_list, default=DEFAULT_SPARSITIES,
                        help="comma-separated levels in (0, 1), increasing (default 0.01,...,0.15)")
    parser.add_argument("--windows", type=int_at_least(1), default=8,
                        help="held-out windows each entry is measured on (default 8)")
    parser.add_argument("--fit-windows", type=int_at_least(1), default=FIT_WINDOWS,
                        help=f"other windows that fit GPTQ, the channel choice and the refit (default {FIT_WINDOWS})")
    parser.add_argument("--seq-len", type=int_at_least(1), default=256, help="tokens per window (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="window choice and rotations (default 0)")
    parser.add_argument("--metric", choices=METRICS, default="ppl",
                        help="ppl: relative perplexity rise (default); kl: mean KL to the unpruned model")
    add_quant_arguments(parser)
    parser.add_argument("--no-rotate", action="store_true", help="calibrate the unrotated model")
    parser.add_argument("--granularity", type=int_at_least(1), default=32, help="channels removed per block "
                                                                                "(default 32)")
    parser.add_argument("--no-refit", action="store_true", help=NO_REFIT_HELP)
    parser.add_argument("--validate", type=int, default=0, metavar="N",
                        help="also measure N random plans and compare with the table's prediction")
    parser.add_argument("--budget", type=float, default=0.01,
                        help="the δ the table is for: entries whose standard error exceeds δ/4 are reported with "
                             "the held-out tokens that would fix them (default 0.01)")
    parser.add_argument("--out", type=Path, required=True, help="table file to write (.safetensors)")
    parser.add_argument("--plot", type=Path, help="PNG: heatmap of single-layer ξ (+ validation scatter); needs "
                                                  "matplotlib")
    args = parser.parse_args(argv)
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'asaf-fx[plot]'")
    try:
        args.quant = quant_config(args, rotate=not args.no_rotate)
        args.config = CalibrationConfig(mode=args.mode, max_length=args.max_length, sparsities=args.sparsities,
                                        windows=args.windows, fit_windows=args.fit_windows, seq_len=args.seq_len,
                                        seed=args.seed, metric=args.metric, granularity=args.granularity,
                                        refit=not args.no_refit, validate=args.validate, budget=args.budget)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True)

    def run() -> None:
        calibration_text(args.text, args.config)  # a missing text fails before the model loads
        model, tokenizer = load_model(args.model)
        calibrate(model, args.quant, args.text, tokenizer=tokenizer, config=args.config, out=args.out,
                  model_name=args.model, plot_path=args.plot, console=console)

    return run_cli(run, console, f"measured values are saved next to {args.out}; rerun the same command to continue")


if __name__ == "__main__":
    sys.exit(main())
