"""Where a pruning's measured damage comes from: the calibration meter against test text.

    python benchmarks/text_gap.py [--sparsity 0.1] [--w-bits 16] [--fit-windows 8] [--seq-len 256]
        [--test-windows 4] [--stride 9] [--singles]

The sensitivity table measures ξ with ``DegradationMeter`` on held-out windows of the calibration
text (WikiText-2 validation); the pipeline judges a plan by perplexity on WikiText-2 test. This
measures one uniform plan both ways, and in between, so each difference has one cause:

1. the meter on the held-out calibration windows (what a table entry is);
2. ``asaf_fx.compile(plan)`` on the same windows (the meter and compile should agree);
3. compile on the first windows of the validation file, cut contiguously, also with its blank lines
   dropped (the test file has none), then its ``<unk>`` markers removed or replaced by a word;
4. compile on the first test windows, at the same short length and at 2048;
5. compile on 2048-token test windows spread over the whole split (every ``--stride``-th).

``--singles`` also measures every layer alone through the meter (Σ of single-layer ξ against the
whole plan: how additive the damage is). Calibration as in ``python -m asaf_fx.calibrate``: 2 ×
``--fit-windows`` windows of ``--seq-len`` drawn with seed 0, the first half fits, the second half
measures. Weights at ``--w-bits`` (GPTQ for 4), activations and KV cache 16-bit. Prints plain lines.
"""

from __future__ import annotations

import argparse
import time

import torch

import asaf_fx
from asaf_fx.calibration.measure import DegradationMeter
from asaf_fx.calibration.variants import build_calibration_model
from asaf_fx.compile import calibration_batches
from asaf_fx.data import calibration_windows, perplexity, read_joined, token_windows, wikitext2_test_path, wikitext2_valid_path
from asaf_fx.sparsity_plan import uniform_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.1, help="every layer's sparsity (default 0.1)")
    parser.add_argument("--w-bits", type=int, choices=(4, 8, 16), default=16)
    parser.add_argument("--fit-windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--test-windows", type=int, default=4, help="first test windows of 2048 (default 4)")
    parser.add_argument("--stride", type=int, default=9, help="every n-th 2048-token test window (default 9)")
    parser.add_argument("--singles", action="store_true", help="also Σ of single-layer ξ through the meter")
    args = parser.parse_args()
    started = time.perf_counter()

    model, tokenizer = asaf_fx.load_model("smollm2")
    layers = model.config.num_hidden_layers
    quant = asaf_fx.QuantConfig(w_bits=args.w_bits, a_bits=16, kv_bits=16, rotate=True, seed=0)
    torch.manual_seed(0)
    drawn = calibration_windows(tokenizer, wikitext2_valid_path(), 2 * args.fit_windows, args.seq_len, seed=0)
    fit, held = drawn[: args.fit_windows], drawn[args.fit_windows:]
    plan = uniform_plan(layers, args.sparsity)
    print(f"SmolLM2-135M rotated W{args.w_bits}A16KV16, uniform sparsity {args.sparsity:g}, fitted on "
          f"{args.fit_windows} × {args.seq_len} validation tokens")

    calibration_model = build_calibration_model(model, quant, fit, [args.sparsity], cache_size=layers + 1)
    meter = DegradationMeter(calibration_model, calibration_batches(held, None), "ppl")
    print(f"1. meter, held-out validation windows ({held.shape[0]} × {args.seq_len}): "
          f"{meter({i: 0 for i in range(layers)}):+.2%}", flush=True)
    if args.singles:
        singles = [meter({i: 0}) for i in range(layers)]
        print(f"   Σ single-layer ξ: {sum(singles):+.2%} (min {min(singles):+.2%}, max {max(singles):+.2%})", flush=True)

    base = asaf_fx.compile(model, None, quant=quant, calibration=fit, decode=False)
    pruned = asaf_fx.compile(model, plan, quant=quant, calibration=fit, decode=False)

    def rise(label: str, windows: torch.Tensor) -> None:
        b, p = (perplexity(lambda ids: m(ids).logits, windows) for m in (base, pruned))
        print(f"{label} ({windows.shape[0]} × {windows.shape[1]}): base PPL {b:.3f}, {p / b - 1:+.2%}", flush=True)

    rise("2. compile, the same held-out windows", held)
    short = 2048 * args.test_windows // args.seq_len
    valid = read_joined(wikitext2_valid_path())
    rise("3. compile, first validation windows", token_windows(tokenizer, valid, args.seq_len, short))
    no_blank = "\n\n".join(line for line in valid.split("\n\n") if line.strip())
    for label, text in (("blank lines dropped", no_blank), ("and <unk> removed", no_blank.replace(" <unk>", "")),
                        ("and <unk> -> 'thing'", no_blank.replace("<unk>", "thing"))):
        rise(f"   {label}", token_windows(tokenizer, text, args.seq_len, short))
    test = token_windows(tokenizer, read_joined(wikitext2_test_path()), 2048, None)
    rise("4. compile, first test windows", test[: args.test_windows].reshape(-1, args.seq_len))
    rise("   compile, first test windows", test[: args.test_windows])
    rise(f"5. compile, every {args.stride}th test window", test[:: args.stride])
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
