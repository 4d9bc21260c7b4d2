"""Where the time of one bench variant goes: torch.profiler's kernel table for a prefill and decode steps.

    python benchmarks/kernel_profile.py --preset llama2-7b --layers 4 --variant w4a4kv4 [--seq 2048 --batch 4]

Builds the variant exactly as ``python -m asaf_fx bench`` does, runs one warm-up prefill and a few
decode steps, then profiles one prefill and 8 decode steps and prints the kernels by total device
time (the top ``--top``), so a reader sees which launches dominate: GEMMs, rotations,
quantization, attention, elementwise. Without a CUDA GPU the table shows CPU operator times.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from asaf_fx import benchmark as bench


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama2-7b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--variant", default="w4a4kv4", choices=bench.VARIANTS)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--decode-batch", type=int, default=1)
    p.add_argument("--top", type=int, default=25)
    opts = p.parse_args(argv)
    args = bench.resolve(
        bench.BenchConfig(
            preset=opts.preset,
            layers=opts.layers,
            seq=(opts.seq,),
            batch=(opts.batch,),
            decode_tokens=8,
            decode_batch=(opts.decode_batch,),
            variants=(opts.variant,),
        )
    )
    plan = bench.load_plan(args) if opts.variant == "asaf" else None
    forward, steps, _ = bench.build_variant(opts.variant, args, plan)
    step = steps[opts.decode_batch]
    ids = torch.randint(0, bench.PRESETS[opts.preset].vocab, (opts.batch, opts.seq), device=args.device)
    token = torch.zeros(opts.decode_batch, 1, dtype=torch.long, device=args.device)
    cuda = args.device.type == "cuda"
    with torch.no_grad():
        forward(ids)
        for position in range(3):
            token = step(token, position)[:, -1:].argmax(-1)
        if cuda:
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        sort = "cuda_time_total" if cuda else "cpu_time_total"
        with profile(activities=activities) as prof:
            forward(ids)
            if cuda:
                torch.cuda.synchronize()
        print(f"prefill {opts.batch} x {opts.seq}, {opts.variant}, {opts.preset}, {opts.layers} layers")
        print(prof.key_averages().table(sort_by=sort, row_limit=opts.top, max_name_column_width=60))
        with profile(activities=activities) as prof:
            for position in range(3, 11):
                token = step(token, position)[:, -1:].argmax(-1)
            if cuda:
                torch.cuda.synchronize()
        print(f"decode batch {opts.decode_batch}, 8 steps")
        print(prof.key_averages().table(sort_by=sort, row_limit=opts.top, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
