"""python -m asaf_fx curve --model smollm2|PATH --out DIR [--budgets 0.005,0.01,0.02,0.04,0.08]

ASAF against uniform sparsity at the same FLOPs, at several budgets from one table (``asaf_fx.tradeoff_curve``).
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from asaf_fx.cli.arguments import add_model_arguments, add_pipeline_arguments, run_cli, run_config
from asaf_fx.tradeoff import DEFAULT_BUDGETS, budget_list, tradeoff_curve


def budgets(value: str) -> tuple[float, ...]:
    """argparse type of --budgets: comma-separated positive numbers (sorted, repeats dropped)."""
    try:
        return budget_list([v for v in value.split(",") if v.strip()])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m asaf_fx curve", description=__doc__.strip().splitlines()[2])
    add_model_arguments(parser)
    parser.add_argument("--budgets", type=budgets, default=DEFAULT_BUDGETS,
                        help="budgets δ, relative perplexity rises over the rotated-quantized model, comma-separated "
                             f"(default {','.join(map(str, DEFAULT_BUDGETS))}); one plan each, solved once")
    add_pipeline_arguments(parser)
    args = parser.parse_args(argv)
    args.config = run_config(parser, args, max_degradation=args.budgets[0])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)
    return run_cli(lambda: tradeoff_curve(args.model, args.out, args.budgets, args.config, console), console,
                   f"progress is saved in {args.out}; rerun the same command to continue")


if __name__ == "__main__":
    sys.exit(main())
