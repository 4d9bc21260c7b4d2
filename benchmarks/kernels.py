"""Benchmark the INT4 kernels against torch fp16 matmul on a CUDA GPU.

    python benchmarks/kernels.py [--m 1 16 512 2048 8192] [--shapes 4096x4096 4096x11008 ...]

For every linear shape K→N (Llama-2-7B / Llama-3-8B widths and a pruned MLP width) and every token
count M it prints time, TFLOPS (2·M·N·K / time) and speedup over ``x @ w.T`` in fp16 for the W4A4,
W4A8 and W4A16 GEMMs (per-channel scales, fp16 output), plus the fused rotation + per-token
quantization of the (M, K) input as a share of the W4A4 GEMM that follows it. Without a CUDA GPU
it says that it measured nothing and exits 0: interpreter timings would be meaningless.
"""

from __future__ import annotations

import argparse
import sys

import torch

DEFAULT_SHAPES = ["4096x4096", "4096x11008", "11008x4096", "4096x14336", "11008x9408"]
DEFAULT_M = [1, 16, 512, 2048, 8192]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="linear shapes as KxN (in x out)")
    p.add_argument("--m", nargs="+", type=int, default=DEFAULT_M, help="token counts M")
    p.add_argument("--rep", type=int, default=100, help="milliseconds per measurement (triton do_bench)")
    return p.parse_args(argv)


def _bench(fn, rep: int) -> float:
    """Median milliseconds of fn() on the GPU."""
    import triton.testing

    return triton.testing.do_bench(fn, rep=rep, return_mode="median")


def run(args: argparse.Namespace) -> list[dict]:
    import triton

    from asaf_fx.triton_kernels import gemm, hadamard, int4, quantize

    dev = "cuda"
    print(f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    header = (f"{'K->N':>12} {'M':>5} | {'fp16 ms':>8} {'TFLOPS':>7} | {'W4A4 ms':>8} {'TFLOPS':>7} {'x':>5} | "
              f"{'W4A8 x':>6} | {'W4A16 ms':>8} {'x':>5} | {'rot+q ms':>8} {'% of W4A4':>9}")
    print(header)
    print("-" * len(header))
    rows = []
    for shape in args.shapes:
        k, n = (int(v) for v in shape.lower().split("x"))
        w = torch.randn(n, k, device=dev, dtype=torch.float16)
        w_packed, w_scale = int4.quantize_weight_int4(w)
        _, m_odd = hadamard.split_width(k)
        right = torch.linalg.qr(torch.randn(m_odd, m_odd, dtype=torch.float64))[0].to(dev)
        for m in args.m:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            q4, s4 = quantize.quantize_per_token_triton(x, 4, 1.0)
            q8, s8 = quantize.quantize_per_token_triton(x, 8, 1.0)
            flops = 2.0 * m * n * k
            half = torch.float16
            t = {
                "fp16": _bench(lambda: x @ w.T, args.rep),
                "w4a4": _bench(lambda: gemm.w4a_int_linear_triton(q4, s4, w_packed, w_scale, None, k, half), args.rep),
                "w4a8": _bench(lambda: gemm.w4a_int_linear_triton(q8, s8, w_packed, w_scale, None, k, half), args.rep),
                "w4a16": _bench(lambda: gemm.w4a16_linear_triton(x, w_packed, w_scale, None, k, half), args.rep),
                "rotq": _bench(lambda: hadamard.rotate_quantize_triton(x, right, 4, 1.0), args.rep),
            }
            tf = {key: flops / (ms * 1e-3) / 1e12 for key, ms in t.items()}
            print(f"{shape:>12} {m:>5} | {t['fp16']:8.4f} {tf['fp16']:7.1f} | {t['w4a4']:8.4f} {tf['w4a4']:7.1f} "
                  f"{t['fp16'] / t['w4a4']:5.2f} | {t['fp16'] / t['w4a8']:6.2f} | {t['w4a16']:8.4f} "
                  f"{t['fp16'] / t['w4a16']:5.2f} | {t['rotq']:8.4f} {100 * t['rotq'] / t['w4a4']:8.1f}%")
            rows.append({"shape": shape, "m": m, **{f"{key}_ms": v for key, v in t.items()}})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if not torch.cuda.is_available():
        print("No CUDA GPU available: measured nothing (the Triton interpreter's timings say nothing "
              "about GPU speed). Run this on a CUDA GPU and record the table in BENCHMARKS.md.")
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
