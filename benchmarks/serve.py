"""Time to first token and generate time against the forward and decode-step times they are made of.

    python benchmarks/serve.py [--model tiny|smollm2|llama2-7b] [--quant w4a4kv4|w4a8kv8|rotate]
                               [--prompts 512 2048] [--new 16] [--repeats 3] [--device cpu|cuda] [--json F]

For each prompt length P (batch 1), medians over ``--repeats`` after one warm-up:

* ``forward(P)``: one call of the compiled model on the prompt (scoring, no generation);
* ``TTFT``: ``generate(prompt, max_new_tokens=1)``, the prefill call plus choosing the token;
* ``decode step``: one step of ``decode_steps`` at positions P..P+N−1 (attention over that many slots);
* ``generate(P+N)``: ``generate(prompt, max_new_tokens=N)``, no EOS;

and the two ratios the serving targets are stated in: TTFT ÷ forward(P), and generate ÷
(forward(P) + N × decode step). ``tiny`` is a random 4-layer Llama, ``llama2-7b`` random weights of
Llama-2-7B's shapes (all 32 layers), ``smollm2`` the real SmolLM2-135M-Instruct. On the CPU the INT4
ops run their torch references, so times say how the calls compose, not how fast INT4 is.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import asaf_fx
from asaf_fx.speed import PRESETS, Shape, device_name, random_llama

QUANTS = {
    "w4a4kv4": asaf_fx.QuantConfig(w_bits=4, a_bits=4, kv_bits=4, w_method="rtn", w_clip_search=False, a_clip=0.9),
    "w4a8kv8": asaf_fx.QuantConfig(w_bits=4, a_bits=8, kv_bits=8, w_method="rtn", w_clip_search=False),
    "rotate": asaf_fx.QuantConfig(),
}
TINY = Shape(hidden=256, intermediate=704, heads=4, kv_heads=2, head_dim=64, vocab=2048, layers=4, max_positions=4096)


def _model(name: str, device: torch.device, positions: int) -> torch.nn.Module:
    if name == "smollm2":
        return asaf_fx.load_model("smollm2")[0].to(device)
    shape = TINY if name == "tiny" else PRESETS[name]
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return random_llama(shape, shape.layers, dtype=dtype, device=device, seed=0, positions=positions)


def _median(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    times = []
    for i in range(repeats + 1):  # the first call warms up (and on CUDA compiles / captures)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(cm, prompt: int, new: int, repeats: int, device: torch.device, vocab: int) -> dict[str, float]:
    ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(prompt)).to(device)
    forward = _median(lambda: cm(ids), repeats, device)
    ttft = _median(lambda: cm.generate(ids, max_new_tokens=1, eos_token_id=[]), repeats, device)

    def decode() -> None:
        step = cm.decode_steps(1, prompt + new)
        token = ids[:, -1:]
        for position in range(prompt, prompt + new):
            token = step(token, position)[:, -1:].argmax(-1)

    step = _median(decode, repeats, device) / new
    generate = _median(lambda: cm.generate(ids, max_new_tokens=new, eos_token_id=[]), repeats, device)
    return {"prompt": prompt, "new_tokens": new, "forward_s": forward, "ttft_s": ttft, "decode_step_s": step,
            "generate_s": generate, "ttft_over_forward": ttft / forward,
            "generate_over_parts": generate / (forward + new * step)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=["tiny", "smollm2", *PRESETS])
    parser.add_argument("--quant", default="w4a4kv4", choices=sorted(QUANTS))
    parser.add_argument("--prompts", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    slots = max(args.prompts) + args.new
    model = _model(args.model, device, slots)
    started = time.perf_counter()
    cm = asaf_fx.compile(model, quant=QUANTS[args.quant], max_cache_len=slots)
    compile_s = time.perf_counter() - started
    vocab = model.config.vocab_size
    del model
    rows = [measure(cm, p, args.new, args.repeats, device, vocab) for p in args.prompts]
    title = f"serving: {args.model} {args.quant}, batch 1, {device_name(device)}; compile {compile_s:.1f} s"
    table = Table(title=title)
    for column in ("prompt", "forward(P) s", "TTFT s", "TTFT ÷ forward", "decode step ms", f"generate(P+{args.new}) s",
                   "generate ÷ (forward + N·step)"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["prompt"]), f"{r['forward_s']:.3f}", f"{r['ttft_s']:.3f}", f"{r['ttft_over_forward']:.3f}",
                      f"{1e3 * r['decode_step_s']:.1f}", f"{r['generate_s']:.3f}", f"{r['generate_over_parts']:.3f}")
    Console(width=140).print(table)
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "quant": args.quant, "device": device_name(device),
                                         "torch": torch.__version__, "compile_s": compile_s, "rows": rows},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
