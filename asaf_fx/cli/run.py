"""python -m asaf_fx run --model smollm2|PATH --out DIR [--max-degradation 0.01]

calibrate → solve → compile → measure (``asaf_fx.run``), solving again with a tighter budget while
the measured degradation exceeds it.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from asaf_fx.cli.arguments import add_model_arguments, add_pipeline_arguments, int_at_least, run_cli, run_config
from asaf_fx.pipeline import run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m asaf_fx run", description=__doc__.strip().splitlines()[2])
    add_model_arguments(parser)
    parser.add_argument("--max-degradation", type=float, default=0.01,
                        help="budget: relative perplexity rise over the rotated-quantized model (default 0.01)")
    parser.add_argument("--rounds", type=int_at_least(1), default=3,
                        help="solve-compile-measure rounds at most (default 3)")
    add_pipeline_arguments(parser)
    args = parser.parse_args(argv)
    args.config = run_config(parser, args, max_degradation=args.max_degradation, rounds=args.rounds)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)
    return run_cli(lambda: run(args.model, args.out, args.config, console), console,
                   f"calibration progress is saved in {args.out}; rerun the same command to continue")


if __name__ == "__main__":
    sys.exit(main())
