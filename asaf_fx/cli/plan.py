"""python -m asaf_fx plan TABLE --max-degradation 0.01 --out plan.json

Solve a sparsity plan from a sensitivity table (``asaf_fx.solve``) and print its groups.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from asaf_fx._atomic import write_text_atomic
from asaf_fx.plan import render_plan
from asaf_fx.solvers import CHARGES, METHODS, InfeasibleError, solve
from asaf_fx.table import SensitivityTable


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m asaf_fx plan", description=__doc__.strip().splitlines()[2])
    parser.add_argument("table", help="sensitivity table (.safetensors) from python -m asaf_fx calibrate")
    parser.add_argument("--max-degradation", type=float, default=0.01, help="budget δ in the table's metric")
    parser.add_argument("--min-sparsity", type=float, default=0.01)
    parser.add_argument("--max-sparsity", type=float, default=0.15)
    parser.add_argument("--resolution", type=float, default=None, help="budget quantum (default δ/1000)")
    parser.add_argument("--method", choices=METHODS, default="exact")
    parser.add_argument("--allow-dense", action="store_true",
                        help="a group may also stay unpruned, as in `python -m asaf_fx run`; without it every "
                             "layer is pruned at --min-sparsity or more")
    parser.add_argument("--charge", choices=CHARGES, default="noise-aware",
                        help="noise-aware (default): each level charged the running max of ξ over the levels up to "
                             "it plus --z standard errors; raw: ξ as measured, the paper's Ξ (negatives as 0)")
    parser.add_argument("--z", type=float, default=None,
                        help="standard errors charged on top of each ξ under --charge noise-aware (default 1; "
                             "0: the running max alone); refused with --charge raw")
    parser.add_argument("--out", help="write the plan as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    try:
        table = SensitivityTable.load(args.table)
        plan = solve(
            table,
            args.max_degradation,
            min_sparsity=args.min_sparsity,
            max_sparsity=args.max_sparsity,
            resolution=args.resolution,
            method=args.method,
            allow_dense=args.allow_dense,
            z=args.z,
            charge=args.charge,
        )
    except (InfeasibleError, ValueError, FileNotFoundError) as exc:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {exc}")
        return 2
    render_plan(plan, table, console)
    if args.out:
        write_text_atomic(args.out, plan.to_json())
        console.print(f"plan written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
