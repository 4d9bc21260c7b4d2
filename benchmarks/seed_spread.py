"""A plan's measured degradation under several rotation seeds, against the spread of the base itself.

    python benchmarks/seed_spread.py PLAN_JSON [--seeds 0,1,2] [--w-bits 4 --a-bits 4 --kv-bits 4]

Is a pruning's cost on test text the pruning, or a new draw of the quantization error? For each
seed, the rotated-quantized SmolLM2 is compiled without and with the plan (GPTQ, a_clip 0.9,
calibrated as the pipeline does by default: 8 × 256 WikiText-2 validation tokens, seed 0) and
both are evaluated on the first 4 windows of 2048 test tokens. Prints one line per seed, with the
first 16 hex digits of the sha256 of the base's compiled tensors: runs that print the same digest
compiled the same bits.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import asaf_fx
from asaf_fx.data import calibration_windows, perplexity, read_joined, token_windows, wikitext2_test_path, wikitext2_valid_path
from asaf_fx.inspection import tensors_digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("plan", type=Path, help="plan.json, e.g. from `python -m asaf_fx run`")
    parser.add_argument("--seeds", default="0,1,2", help="rotation seeds, comma-separated (default 0,1,2)")
    parser.add_argument("--w-bits", type=int, default=4)
    parser.add_argument("--a-bits", type=int, default=4)
    parser.add_argument("--kv-bits", type=int, default=4)
    args = parser.parse_args()

    model, tokenizer = asaf_fx.load_model("smollm2")
    plan = asaf_fx.Plan.from_json(args.plan.read_text(), num_layers=model.config.num_hidden_layers)
    calibration = calibration_windows(tokenizer, wikitext2_valid_path(), 8, 256, seed=0)
    test = token_windows(tokenizer, read_joined(wikitext2_test_path()), 2048, 4)
    pruned_groups = [f"{g.start}–{g.stop - 1} at {g.sparsity:g}" for g in plan.groups if g.sparsity > 0]
    print(f"plan {args.plan}: layers {', '.join(pruned_groups) or 'none'}; W{args.w_bits}A{args.a_bits}KV{args.kv_bits}")
    for seed in (int(s) for s in args.seeds.split(",")):
        quant = asaf_fx.QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits, kv_bits=args.kv_bits, w_method="gptq",
                                    a_clip=0.9, seed=seed)
        ppl = []
        for chosen in (None, plan):
            compiled = asaf_fx.compile(model, chosen, quant=quant, calibration=calibration, decode=False)
            ppl.append(perplexity(lambda ids: compiled(ids).logits, test))
            if chosen is None:
                base_digest = tensors_digest(compiled)[:16]
            del compiled
        print(f"seed {seed}: base {ppl[0]:.3f} (weights {base_digest}), with the plan {ppl[1]:.3f}, "
              f"{ppl[1] / ppl[0] - 1:+.2%}", flush=True)


if __name__ == "__main__":
    main()
