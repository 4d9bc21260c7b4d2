"""Does a ridge-regularised down_proj refit make uniform MLP pruning cheaper on SmolLM2-135M?

    python benchmarks/ridge_refit.py [--sparsity 0.1] [--ridges 1e-3,1e-2,1e-1,1,10]
        [--w-bits 16 --a-bits 16 --kv-bits 16] [--calibration 32 --cal-len 512] [--test-windows 4]

Every row compiles the rotated model (16 bits = not quantized; GPTQ weights otherwise) with a
uniform plan, its channels chosen and its down_proj refitted on ``--calibration`` × ``--cal-len``
validation tokens (seed 0; compile_ppl.py's 32 × 512 by default, the main job's is 32 × 256) with
``refit_down_proj(..., ridge=r)``; "none" keeps the kept columns as they are. The ridge is to be
chosen on ``held``: 4 validation windows of 2048 tokens that share no token with the calibration
draw; ``test`` is the first ``--test-windows`` windows of the test split, reported beside it, not
used for the choice.
"""

from __future__ import annotations

import argparse
import functools
import time

from rich.console import Console
from rich.table import Table

import asaf_fx
from asaf_fx.data import (
    calibration_windows,
    check_windows,
    perplexity,
    read_joined,
    token_windows,
    wikitext2_test_path,
    wikitext2_valid_path,
)
from asaf_fx.passes.prune import channel_selection, prune_mlp
from asaf_fx.plan import uniform_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.1)
    parser.add_argument("--ridges", default="1e-3,1e-2,1e-1,1,10")
    parser.add_argument("--w-bits", type=int, default=16)
    parser.add_argument("--a-bits", type=int, default=16)
    parser.add_argument("--kv-bits", type=int, default=16)
    parser.add_argument("--calibration", type=int, default=32, help="calibration windows")
    parser.add_argument("--cal-len", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--test-windows", type=int, default=4)
    args = parser.parse_args()
    console = Console()

    model, tokenizer = asaf_fx.load_model("smollm2")
    calibration = calibration_windows(tokenizer, wikitext2_valid_path(), args.calibration, args.cal_len, seed=0)
    held = check_windows(tokenizer, wikitext2_valid_path(), 4, 2048, avoid=(args.calibration, args.cal_len, 0))
    test = token_windows(tokenizer, read_joined(wikitext2_test_path()), 2048, args.test_windows or None)
    quant = asaf_fx.QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits, kv_bits=args.kv_bits, w_method="gptq")
    plan = uniform_plan(model.config.num_hidden_layers, args.sparsity)

    def measure(plan, ridge: float | None) -> tuple[float, float, float]:
        if ridge is not None:  # select_mlp_channels calls the refit with its default ridge
            prune_mlp.refit_down_proj = functools.partial(channel_selection.refit_down_proj, ridge=ridge)
        started = time.perf_counter()
        cm = asaf_fx.compile(model, plan, quant=quant, calibration=calibration,
                             prune=asaf_fx.PruneConfig(refit=ridge is not None))
        spent = time.perf_counter() - started
        return perplexity(lambda ids: cm(ids).logits, held), perplexity(lambda ids: cm(ids).logits, test), spent

    base_held, base_test, _ = measure(None, None)
    setting = f"W{args.w_bits}A{args.a_bits}KV{args.kv_bits}"
    table = Table(title=f"SmolLM2-135M, rotated {setting}, uniform {args.sparsity:g}: "
                        f"base held {base_held:.3f}, test {base_test:.3f}")
    for column in ("ridge", "held PPL", "held Δ", "test PPL", "test Δ", "compile s"):
        table.add_column(column, justify="right")
    rows = []
    for ridge in [None, *(float(r) for r in args.ridges.split(","))]:
        held_ppl, test_ppl, spent = measure(plan, ridge)
        rows.append((ridge, held_ppl))
        table.add_row("none" if ridge is None else f"{ridge:g}", f"{held_ppl:.3f}", f"{held_ppl / base_held - 1:+.2%}",
                      f"{test_ppl:.3f}", f"{test_ppl / base_test - 1:+.2%}", f"{spent:.0f}")
        console.print(f"ridge {ridge}: held {held_ppl:.3f}, test {test_ppl:.3f} ({spent:.0f} s)")
    console.print(table)
    best = min(rows, key=lambda row: row[1])[0]
    console.print(f"chosen on held-out validation text: ridge {'none' if best is None else f'{best:g}'}")


if __name__ == "__main__":
    main()
