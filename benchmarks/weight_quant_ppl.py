"""WikiText-2 perplexity of SmolLM2-135M with quantized decoder-layer weights (and activations).

    python benchmarks/weight_quant_ppl.py [--no-rotate] [--method gptq|rtn] [--bits 4] [--group-size G]
                                          [--a-bits 16|8|4] [--a-clip 1.0] [--windows 4] [--calibration 32]

Calibration: `--calibration` windows of 512 tokens drawn (seed 0) from the WikiText-2 *validation*
split; evaluation: the first `--windows` windows of 2048 tokens of the *test* split, joined as
shared/data/README.md says. Weights are quantized layer by layer (asaf_fx.passes.quantize_weights)
and kept dequantized in float32; activations, with --a-bits below 16, are quantized per token before
every decoder linear (lm_head stays 16-bit). This measures accuracy, not speed; no KV-cache
quantization yet. Slow on a CPU: GPTQ takes
several minutes per run on 2 cores.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console

from asaf_fx.compile import rotation_passes
from asaf_fx.config import QuantConfig
from asaf_fx.data import data_dir, perplexity, read_joined, token_windows
from asaf_fx.models import load_model
from asaf_fx.passes.capture import capture_forward
from asaf_fx.passes.infra import PassManager
from asaf_fx.passes.layerwise import LayerwiseRunner
from asaf_fx.passes.quantize_activations import QuantizeActivations
from asaf_fx.passes.quantize_weights import WeightQuantSpec, quantize_layer_weights
from asaf_fx.passes.split_layers import split_decoder_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--no-rotate", action="store_true")
    parser.add_argument("--method", choices=("gptq", "rtn"), default="gptq")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--a-bits", type=int, choices=(4, 8, 16), default=16)
    parser.add_argument("--a-clip", type=float, default=1.0)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--calibration", type=int, default=32)
    args = parser.parse_args()
    console = Console()

    model, tokenizer = load_model("smollm2")
    root = data_dir()
    test = token_windows(tokenizer, read_joined(root / "wikitext-2-raw" / "wiki.test.raw"), 2048, args.windows)
    pool = token_windows(tokenizer, read_joined(root / "wikitext-2" / "wiki.valid.tokens"), 512)
    calibration = pool[torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(0))[: args.calibration]]

    gm = capture_forward(model)
    passes = [] if args.no_rotate else rotation_passes(QuantConfig(seed=0))
    if args.a_bits < 16:
        passes.append(QuantizeActivations(args.a_bits, args.a_clip))
    PassManager(passes)(gm)
    runner = LayerwiseRunner(split_decoder_layers(gm))
    fp = perplexity(lambda ids: model(ids).logits, test)
    started = time.perf_counter()
    states = [runner.start(calibration[i : i + 4], False) for i in range(0, calibration.shape[0], 4)]
    spec = WeightQuantSpec(bits=args.bits, method=args.method, group_size=args.group_size)
    quantize_layer_weights(runner, states, spec)
    spent = time.perf_counter() - started
    quantized = perplexity(lambda ids: runner.run(ids, False)[0], test)
    console.print(
        f"SmolLM2-135M · {'rotated' if not args.no_rotate else 'unrotated'} · W{args.bits}A{args.a_bits} {args.method} "
        f"group {args.group_size or 'per-channel'} · {args.windows} test windows × 2048 · "
        f"FP {fp:.3f} · quantized {quantized:.3f} ({quantized / fp:.3f}×) · quantization {spent:.0f} s"
    )


if __name__ == "__main__":
    main()
