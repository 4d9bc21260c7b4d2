"""WikiText-2 perplexity of SmolLM2-135M compiled by ``asaf_fx.compile`` at any setting.

    python benchmarks/compile_ppl.py [--w-bits 4] [--a-bits 4] [--kv-bits 4] [--w-method gptq|rtn]
        [--group-size G] [--a-clip 0.9|mse] [--no-rotate] [--sparsity 0.1 [--no-refit]] [--windows 8]
        [--calibration 32] [--overrides JSON] [--a8-layers K [--a8-gains FILE]] [--fp]

Calibration: ``--calibration`` windows of 512 tokens drawn (seed 0) from the WikiText-2 *validation*
split; evaluation: the first ``--windows`` windows of 2048 tokens of the *test* split (``--windows 0``:
all). ``--sparsity`` applies a uniform plan (every layer at that sparsity). ``--a8-layers K`` raises
the inputs of the K layers with the largest measured 8-bit gain to 8 bits
(``asaf_fx.calibration.activation_gains``: fitted on the calibration windows, measured on the next
16 windows of the same draw, also validation text); ``--a8-gains FILE`` keeps the gains for the
next run (read if the file exists). Prints one line with the
perplexity, the ratio to FP (``--fp`` evaluates the FP model in the same run) and the compiled
model's linear FLOPs and weight bytes from ``asaf_fx.inspection``. The reference kernels run on
the CPU; this measures accuracy, not speed.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from rich.console import Console

import asaf_fx
from asaf_fx.calibration.activation_gains import ActivationGains, measure_activation_gains
from asaf_fx.cli.arguments import clip_ratio
from asaf_fx.config import CLIP_SEARCH
from asaf_fx.data import (
    calibration_windows,
    perplexity,
    read_joined,
    token_windows,
    wikitext2_test_path,
    wikitext2_valid_path,
)
from asaf_fx.inspection import model_totals
from asaf_fx.plan import uniform_plan

A8_WINDOWS = 16  # validation windows of 512 tokens the 8-bit gains are measured on


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--w-bits", type=int, default=4)
    parser.add_argument("--a-bits", type=int, default=4)
    parser.add_argument("--kv-bits", type=int, default=4)
    parser.add_argument("--w-method", choices=("gptq", "rtn"), default="gptq")
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--a-clip", type=clip_ratio, default=1.0, help="a ratio in (0, 1], or 'mse' (per linear)")
    parser.add_argument("--no-rotate", action="store_true")
    parser.add_argument("--sparsity", type=float, default=0.0)
    parser.add_argument("--no-refit", action="store_true", help="no ridge refit of down_proj when pruning")
    parser.add_argument("--overrides", type=json.loads, default={})
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--calibration", type=int, default=32)
    parser.add_argument("--a8-layers", type=int, default=0, help="layers whose inputs are raised to 8 bits by gain")
    parser.add_argument("--a8-gains", type=Path, help="JSON file of measured gains: read if present, else written")
    parser.add_argument("--fp", action="store_true", help="also evaluate the FP model")
    args = parser.parse_args()
    console = Console()

    model, tokenizer = asaf_fx.load_model("smollm2")
    test = token_windows(tokenizer, read_joined(wikitext2_test_path()), 2048, args.windows or None)
    windows = calibration_windows(tokenizer, wikitext2_valid_path(), args.calibration + A8_WINDOWS, 512, seed=0)
    calibration = windows[: args.calibration]  # the same windows as a draw of args.calibration alone
    quant = asaf_fx.QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits, kv_bits=args.kv_bits, w_method=args.w_method,
                                w_group_size=args.group_size, a_clip=args.a_clip, rotate=not args.no_rotate,
                                overrides=args.overrides)
    started = time.perf_counter()
    if args.a8_layers:
        if args.a8_gains is not None and args.a8_gains.is_file():
            gains = ActivationGains.from_dict(json.loads(args.a8_gains.read_text()))
        else:
            gains = measure_activation_gains(model, quant, calibration, windows[args.calibration:])
            if args.a8_gains is not None:
                args.a8_gains.write_text(json.dumps(gains.to_dict(), indent=2) + "\n")
        layers, quant = gains.choose(quant, args.a8_layers)
        ranked = sorted(range(len(gains.gains)), key=lambda i: gains.gains[i])
        console.print("8-bit gain by layer, best first: " + ", ".join(f"{i} ({gains.gains[i]:+.3f})" for i in ranked)
                      + f"\n8-bit inputs in layers {layers} ({time.perf_counter() - started:.0f} s)")
    plan = uniform_plan(model.config.num_hidden_layers, args.sparsity) if args.sparsity else None
    started = time.perf_counter()
    cm = asaf_fx.compile(model, plan, quant=quant, calibration=calibration,
                         prune=asaf_fx.PruneConfig(refit=not args.no_refit))
    spent = time.perf_counter() - started
    ppl = perplexity(lambda ids: cm(ids).logits, test)
    totals = model_totals(cm)
    refit = " no refit" if args.no_refit else " refit"
    line = (f"SmolLM2-135M · {'rotated' if quant.rotate else 'unrotated'} "
            f"W{quant.w_bits}A{quant.a_bits}KV{quant.kv_bits} "
            f"{quant.w_method} group {quant.w_group_size or 'channel'} a_clip {quant.a_clip}"
            f"{f' · uniform sparsity {args.sparsity:g}' + refit if args.sparsity else ''}"
            f"{f' · overrides {json.dumps(args.overrides)}' if args.overrides else ''}"
            f"{f' · 8-bit inputs in layers {layers}' if args.a8_layers else ''} · "
            f"{test.shape[0]} test windows × 2048 · PPL {ppl:.3f}")
    if args.fp:
        fp = perplexity(lambda ids: model(ids).logits, test)
        line += f" · FP {fp:.3f} · ratio {ppl / fp:.3f}"
    line += (f" · linear FLOPs/token {totals['flops']:.4g} · decoder weight bytes {totals['weight_bytes']:.4g} · "
             f"compile {spent:.0f} s")
    console.print(line)
    if args.a_clip == CLIP_SEARCH:  # compile pinned each chosen ratio as an override: how they spread, by linear kind
        chosen: dict[str, Counter] = {}
        for name, settings in ((n, s) for n, s in cm.quant.overrides.items() if n not in args.overrides):
            chosen.setdefault(name.split(".")[-2], Counter())[settings["a_clip"]] += 1
        print(
            "chosen clip ratios (ratio: linears): "
            + "; ".join(
                f"{kind} " + ", ".join(f"{c:g}: {n}" for c, n in sorted(counts.items()))
                for kind, counts in chosen.items()
            )
        )


if __name__ == "__main__":
    main()
