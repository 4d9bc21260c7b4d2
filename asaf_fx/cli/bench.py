"""python -m asaf_fx bench [--preset llama2-7b|llama3-8b|smollm2-135m] [--layers N] [--seq ...] [--batch ...]

Prefill latency, decode tokens/s and peak memory of FP16 vs rotated INT4 vs ASAF on random weights
(``asaf_fx.benchmark``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from rich.console import Console
from rich.text import Text

from asaf_fx.benchmark import DTYPES, VARIANTS, BenchConfig, benchmark, render, resolve
from asaf_fx.cli.arguments import emit_report, int_at_least
from asaf_fx.speed import PRESETS


def _variant_list(value: str) -> tuple[str, ...]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}, "
                                         "comma-separated (e.g. fp16-compiled,w4a4kv4)")
    return tuple(dict.fromkeys(names))


def _sparsity(value: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0.0 <= rate < 1.0:
        raise argparse.ArgumentTypeError(f"{rate} is outside [0, 1); e.g. 0.1 prunes 10 % of each layer's linear FLOPs")
    return rate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m asaf_fx bench", description=__doc__.strip().splitlines()[2])
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="model shapes (default: llama2-7b on CUDA, smollm2-135m on the CPU)")
    parser.add_argument("--layers", type=int_at_least(1),
                        help="run only the first N decoder layers (default: all on CUDA, 4 on the CPU); the output "
                             "states N")
    parser.add_argument("--seq", type=int_at_least(1), nargs="+",
                        help="prefill lengths in tokens (default: 512 2048 4096 on CUDA, 512 on the CPU)")
    parser.add_argument("--batch", type=int_at_least(1), nargs="+",
                        help="prefill batch sizes (default: 1 4 16 on CUDA, 1 on the CPU)")
    parser.add_argument("--decode-tokens", type=int_at_least(0),
                        help="timed greedy decode steps (default: 64 on CUDA, 4 on the CPU; 0 = no decode)")
    parser.add_argument("--decode-batch", type=int_at_least(1), nargs="+",
                        help="decode batch sizes, one compiled decode graph each (default: 1 16 on CUDA, 1 on the CPU)")
    parser.add_argument("--cache-len", type=int_at_least(1),
                        help="static KV-cache positions for decode (default: longest --seq + warm-up + decode tokens)")
    parser.add_argument("--variants", type=_variant_list, default=VARIANTS,
                        help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)")
    sparsity = parser.add_mutually_exclusive_group()
    sparsity.add_argument("--plan", type=Path, help="plan JSON from python -m asaf_fx plan for the asaf variant")
    sparsity.add_argument("--sparsity", type=_sparsity, default=0.1,
                          help="uniform plan for the asaf variant (default 0.1)")
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda when available"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="model dtype (default: float16 on CUDA, float32 on the CPU)")
    parser.add_argument("--backend", default="auto",
                        help="torch.compile backend of the compiled variants: auto (inductor on CUDA, eager on the "
                             "CPU), eager, or a name")
    parser.add_argument("--warmup", type=int_at_least(0), default=1,
                        help="untimed calls before each measurement (default 1)")
    parser.add_argument("--repeats", type=int_at_least(1),
                        help="timed prefill calls; the median is reported (default: 5 on CUDA, 3 on the CPU)")
    parser.add_argument("--seed", type=int_at_least(0), default=0,
                        help="seed of weights, tokens and rotations (default 0)")
    parser.add_argument("--out", type=Path, help="also write the JSON here (atomically)")
    args = parser.parse_args(argv)
    given = list(sys.argv[1:] if argv is None else argv)
    args.config = BenchConfig(
        preset=args.preset, layers=args.layers, seq=args.seq, batch=args.batch, decode_tokens=args.decode_tokens,
        decode_batch=args.decode_batch, cache_len=args.cache_len, variants=args.variants, plan=args.plan,
        sparsity=args.sparsity, device=args.device, dtype=args.dtype, backend=args.backend, warmup=args.warmup,
        repeats=args.repeats, seed=args.seed, command=shlex.join(["python", "-m", "asaf_fx", "bench", *given]))
    try:
        resolve(args.config)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    errors = Console(stderr=True, soft_wrap=True)
    try:
        report = benchmark(args.config, errors)
    except (OSError, ValueError) as exc:
        errors.print(Text.assemble(("error: ", "bold red"), str(exc)))
        return 2
    emit_report(report, args.out, render, errors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
