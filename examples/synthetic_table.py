"""Write a synthetic SmolLM2-shaped sensitivity table, solve it, and print the plan.

    python examples/synthetic_table.py --out runs/example_table.safetensors

This is the project's main job until calibration measures real tables: the table has the shape and
character of a measured one (sensitive first/last layers, super-linear growth in sparsity,
super-additive groups, measurement noise) but its values are made up.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

import asaf_fx
from asaf_fx.plan import render_plan
from asaf_fx.synthetic import synthetic_table


def main() -> None:
    parser = argparse.ArgumentParser(description="synthetic table → plan")
    parser.add_argument("--out", default="runs/example_table.safetensors", help="where to save the table")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-degradation", type=float, default=0.01)
    args = parser.parse_args()

    table = synthetic_table(args.layers, seed=args.seed)
    table.save(args.out)
    console = Console()
    console.print(f"synthetic table ({args.layers} layers, {len(table.sparsities)} levels) saved to {args.out}")
    for method in asaf_fx.solvers.METHODS:
        plan = asaf_fx.solve(table, args.max_degradation, method=method)
        render_plan(plan, table, console)
    plan_path = Path(args.out).with_suffix(".plan.json")
    plan = asaf_fx.solve(table, args.max_degradation)
    plan_path.write_text(plan.to_json())
    console.print(f"exact plan written to {plan_path}; re-solve with: python -m asaf_fx plan {args.out}")


if __name__ == "__main__":
    main()
