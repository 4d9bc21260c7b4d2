"""Solve time and achieved FLOPs of the exact, two-phase and greedy solvers.

    python benchmarks/solver.py [--layers 32 80 126] [--budget-levels 3 100 1000] [--repeats 3] \
        [--charge noise-aware|raw]

Tables are synthetic (asaf_fx.synthetic) with 29 levels, 1% .. 15% in steps of 0.5%, budget δ = 1%.
"Budget levels" L sets the resolution r = δ / (L − 1), so L = 3 is the paper's Δ = 0.5% at δ = 1%.
Times are the best of --repeats runs on this machine; they are not a test and assert nothing.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
from rich.console import Console
from rich.table import Table

import asaf_fx
from asaf_fx.solvers import CHARGES, METHODS
from asaf_fx.synthetic import synthetic_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[32, 80, 126])
    parser.add_argument("--budget-levels", type=int, nargs="+", default=[3, 100, 1000])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--max-degradation", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--charge", choices=CHARGES, default="noise-aware", help="how ξ is charged (solve's charge=)")
    args = parser.parse_args()

    sparsities = np.round(np.arange(2, 31) * 0.005, 4)  # 29 levels: 1% .. 15%
    console = Console()
    out = Table(title=f"solver benchmark · δ = {args.max_degradation} · 29 levels · {args.charge} · "
                      f"{platform.processor() or platform.machine()}")
    for column in ("layers", "budget levels", "method", "time (s)", "FLOPs saved", "predicted ξ", "groups"):
        out.add_column(column, justify="right")
    for layers in args.layers:
        table = synthetic_table(layers, sparsities, seed=0)
        for levels in args.budget_levels:
            resolution = args.max_degradation / (levels - 1)
            for method in args.methods:
                times, plan = [], None
                try:
                    for _ in range(args.repeats):
                        started = time.perf_counter()
                        plan = asaf_fx.solve(table, args.max_degradation, resolution=resolution, method=method,
                                             charge=args.charge)
                        times.append(time.perf_counter() - started)
                except asaf_fx.InfeasibleError:
                    # Coarse budgets round every group up to at least one level: few groups fit.
                    out.add_row(str(layers), str(levels), method, "—", "no plan", "—", "—")
                    continue
                out.add_row(
                    str(layers),
                    str(levels),
                    method,
                    f"{min(times):.3f}",
                    f"{1 - plan.flops_ratio:.3%}",
                    f"{plan.predicted_degradation:.5f}",
                    str(len(plan.groups)),
                )
            out.add_section()
    console.print(out)


if __name__ == "__main__":
    main()
