"""python -m asaf_fx.plan TABLE --max-degradation 0.01 --out plan.json

Solve a sparsity plan from a sensitivity table and print its groups.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from asaf_fx._atomic import write_text_atomic
from asaf_fx.solvers import METHODS, InfeasibleError, solve
from asaf_fx.sparsity_plan import Plan
from asaf_fx.table import SensitivityTable


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m asaf_fx.plan", description=__doc__.strip().splitlines()[2])
    parser.add_argument("table", help="sensitivity table (.safetensors) from python -m asaf_fx.calibrate")
    parser.add_argument("--max-degradation", type=float, default=0.01, help="budget δ in the table's metric")
    parser.add_argument("--min-sparsity", type=float, default=0.01)
    parser.add_argument("--max-sparsity", type=float, default=0.15)
    parser.add_argument("--resolution", type=float, default=None, help="budget quantum (default δ/1000)")
    parser.add_argument("--method", choices=METHODS, default="exact")
    parser.add_argument("--allow-dense", action="store_true",
                        help="a group may also stay unpruned, as in `python -m asaf_fx run`; without it every "
                             "layer is pruned at --min-sparsity or more")
    parser.add_argument("--out", help="write the plan as JSON here")
    return parser.parse_args(argv)


def render(plan: Plan, table: SensitivityTable, console: Console) -> None:
    """Print one row per group and a one-line summary."""
    level = {float(s): k for k, s in enumerate(table.sparsities)}
    grid = Table(title=f"ASAF plan ({plan.method})")
    for column in ("layers", "n", "sparsity", "FLOPs/token", "saved", "degradation"):
        grid.add_column(column, justify="right")
    for g in plan.groups:
        dense = table.layer_flops[g.start : g.stop].sum()
        k = level.get(g.sparsity)  # None: an unpruned group (solve(..., allow_dense=True))
        flops = dense if k is None else table.flops[g.start, g.length - 1, k]
        xi = 0.0 if k is None else table.degradation[g.start, g.length - 1, k]
        grid.add_row(f"{g.start}–{g.stop - 1}", str(g.length), f"{g.sparsity:.1%}", f"{flops:.4g}",
                     f"{1 - flops / dense:.1%}", f"{xi:.3e}")
    console.print(grid)
    console.print(
        f"{len(plan.groups)} groups over {plan.num_layers} layers · FLOPs saved {1 - plan.flops_ratio:.2%} · "
        f"predicted degradation {plan.predicted_degradation:.4g} of {plan.max_degradation:.4g} · "
        f"solved in {plan.stats.get('time_s', float('nan')) * 1e3:.1f} ms"
    )


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
        )
    except (InfeasibleError, ValueError, FileNotFoundError) as exc:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {exc}")
        return 2
    render(plan, table, console)
    if args.out:
        write_text_atomic(args.out, plan.to_json())
        console.print(f"plan written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
