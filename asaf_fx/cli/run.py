"""python -m asaf_fx run --model smollm2|PATH --out DIR [--max-degradation 0.01]

calibrate → solve → compile → measure (``asaf_fx.run``), solving again with a tighter budget while
the measured degradation exceeds it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from asaf_fx.calibration.calibrate import CalibrationConfig
from asaf_fx.calibration.entries import MODES
from asaf_fx.cli.arguments import add_quant_arguments, int_at_least, quant_config, run_cli, sparsity_list
from asaf_fx.pipeline import DEFAULT_EVAL_WINDOWS, DEFAULT_SPARSITIES, RunConfig, run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m asaf_fx run", description=__doc__.strip().splitlines()[2])
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
    parser.add_argument("--sparsities", type=sparsity_list, default=DEFAULT_SPARSITIES,
                        help=f"table levels, comma-separated, increasing (default "
                             f"{','.join(map(str, DEFAULT_SPARSITIES))})")
    parser.add_argument("--mode", choices=MODES, default="per-layer", help="calibration mode (default per-layer)")
    parser.add_argument("--max-length", type=int_at_least(1), help="longest measured group in --mode groups")
    add_quant_arguments(parser)
    parser.add_argument("--a8-layers", type=int_at_least(0), default=0, metavar="K",
                        help="raise the inputs of the K decoder layers that gain most from it (each layer measured "
                             "on calibration text) from 4 to 8 bits; 0: none (default)")
    parser.add_argument("--granularity", type=int_at_least(1), default=32, help="channels removed per block "
                                                                                "(default 32)")
    parser.add_argument("--seed", type=int, default=0, help="window choice and rotations (default 0)")
    parser.add_argument("--z", type=float, default=1.0,
                        help="standard errors charged on top of each table entry's ξ (default 1)")
    args = parser.parse_args(argv)
    if (args.mode == "groups") != (args.max_length is not None):
        parser.error("--max-length k goes with --mode groups, and --mode groups needs it")
    try:
        calibration = CalibrationConfig(mode=args.mode, max_length=args.max_length, sparsities=args.sparsities,
                                        windows=args.windows, seq_len=args.cal_seq_len, seed=args.seed, metric="ppl",
                                        granularity=args.granularity)
        args.config = RunConfig(max_degradation=args.max_degradation, rounds=args.rounds, text=args.text,
                                eval_text=args.eval_text, eval_windows=args.eval_windows, seq_len=args.seq_len,
                                a8_layers=args.a8_layers, z=args.z, quant=quant_config(args),
                                calibration=calibration)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc).replace("max_degradation", "--max-degradation"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)
    return run_cli(lambda: run(args.model, args.out, args.config, console), console,
                   f"calibration progress is saved in {args.out}; rerun the same command to continue")


if __name__ == "__main__":
    sys.exit(main())
