"""Where the 4-bit activation loss sits: SmolLM2-135M with one decoder layer's linear inputs at 8 bits.

    python benchmarks/activation_bits_by_layer.py [--split valid|test] [--a-clip 0.9] [--windows 4] [--layers 0,1,...]

Rotated, 16-bit weights and KV cache, every decoder linear's input at 4 bits (clip ``--a-clip``)
except those of one layer, which get 8 (``QuantConfig.overrides`` on ``model.layers.{i}.*``); the
first line is the model with no layer at 8 bits. Evaluation: the first ``--windows`` windows of
2048 tokens of a WikiText-2 split — *validation* by default, since ranking layers to choose which
get 8 bits is calibration and must not look at the test text. No calibration data is needed
(nothing is fitted), so each line takes about 40 s on a 2-core CPU. A layer whose line is far below the first carries
much of the loss. The last lines rank the layers and print the ``--overrides`` that put the
``--top`` best at 8 bits, for ``benchmarks/compile_ppl.py`` to measure them together.
"""

from __future__ import annotations

import argparse
import json
import time

import asaf_fx
from asaf_fx.data import perplexity, read_joined, token_windows, wikitext2_test_path, wikitext2_valid_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--split", choices=("valid", "test"), default="valid")
    parser.add_argument("--a-clip", type=float, default=0.9)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--layers", type=lambda s: [int(i) for i in s.split(",")], default=None,
                        help="comma-separated layer indices (default: every layer)")
    parser.add_argument("--top", type=int, default=8, help="how many of the best layers the printed overrides name")
    args = parser.parse_args()
    started = time.perf_counter()
    model, tokenizer = asaf_fx.load_model("smollm2")
    path = wikitext2_valid_path() if args.split == "valid" else wikitext2_test_path()
    text = token_windows(tokenizer, read_joined(path), 2048, args.windows)
    layers = range(model.config.num_hidden_layers) if args.layers is None else args.layers
    ppl_with: dict[int, float] = {}
    for layer in [None, *layers]:
        overrides = {} if layer is None else {f"model.layers.{layer}.*": {"a_bits": 8}}
        quant = asaf_fx.QuantConfig(w_bits=16, a_bits=4, kv_bits=16, a_clip=args.a_clip, overrides=overrides)
        cm = asaf_fx.compile(model, quant=quant, decode=False)
        ppl = perplexity(lambda ids: cm(ids).logits, text)
        print(f"{args.split}: 8-bit inputs in layer {'none' if layer is None else layer}: PPL {ppl:.3f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
        if layer is not None:
            ppl_with[layer] = ppl
    ranked = sorted(ppl_with, key=ppl_with.get)
    print(f"layers, most helped by 8 bits first: {', '.join(map(str, ranked))}")
    print("--overrides '" + json.dumps({f"model.layers.{i}.*": {"a_bits": 8} for i in ranked[:args.top]}) + "'")


if __name__ == "__main__":
    main()
