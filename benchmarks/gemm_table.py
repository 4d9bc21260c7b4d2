"""Every INT4 GEMM path against torch fp16 matmul on a CUDA GPU: exactness, time, TFLOP/s, × fp16.

    python benchmarks/gemm_table.py [--m 1 16 512 2048 8192] [--shapes 4096x11008 11008x4096] [--out FILE.json]

For each linear shape K→N and token count M, each path computes y = x @ W.T on the same packed
INT4 weight (per-channel scales, fp16 output):

* ``fp16``: ``x @ w.T`` in float16 (cuBLAS), the baseline;
* ``triton-a4`` / ``triton-a8``: the portable Triton GEMM (``gemm.w4a_int_linear_triton``; M > 16);
* ``fp8-a4``: widen + ``torch._scaled_mm`` float8 (``cublas.w4a4_fp8_linear``);
* ``int8-a4`` / ``int8-a8``: widen + ``torch._int_mm`` + epilogue (``cublas.w4a8_int8_linear``);
* ``gemv-a4`` / ``gemv-a16``: the weight-streaming decode kernel (M ≤ 16 only), and
  ``gemv-split-a4`` / ``-a8`` its form with K split over programs (M = 1 only; no route takes it yet);
* ``op-a4`` / ``op-a8`` / ``op-a16``: the ``torch.ops.asaf_fx`` op, i.e. whatever ``routes.py`` picks;
* ``unpack``: the widening pass alone (int8), and ``rot+q``: the fused online Hadamard + 4-bit
  quantization of the (M, K) input;
* ``tinygemm-a16``: torch's ``_weight_int4pack_mm`` on the same codes (bfloat16 activations,
  scales repeated per 128-group), the peer weight-streaming kernel (M ≤ 16 only).

Exactness: with unit scales every integer path must reproduce ``x_q @ w_q.T`` exactly; the table's
``exact`` column says whether all did (a path that is not exact is named). Time: median of
``triton.testing.do_bench_cudagraph`` (replays of a captured graph, so the host's per-call Python
stays out, as in the compiled model's CUDA-graph decode). Without a CUDA GPU it says so and
measures nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

DEFAULT_SHAPES = ["4096x11008", "11008x4096"]
DEFAULT_M = [1, 16, 512, 2048, 8192]  # gpu_check.sh runs 1 16 2048


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="linear shapes as KxN (in x out)")
    p.add_argument("--m", nargs="+", type=int, default=DEFAULT_M, help="token counts M")
    p.add_argument("--rep", type=int, default=50, help="milliseconds per measurement (triton do_bench)")
    p.add_argument("--triton-gemm", action="store_true",
                   help="also time the portable Triton GEMM at M > 16 (no route takes it; autotuning takes minutes)")
    p.add_argument("--out", help="also write the rows as JSON here")
    return p.parse_args(argv)


def _tinygemm(w_packed: torch.Tensor, w_scale: torch.Tensor, k: int, group: int = 128):
    """The same codes in ``_weight_int4pack_mm``'s layout: (packed, scales_and_zeros).

    Its dequantization is ``(u - 8) · scale + zero`` for unsigned nibbles u, so u = code + 8 and
    zero 0 give code · scale; a per-channel scale is repeated for every group of ``group`` columns.
    """
    from asaf_fx.triton_kernels import int4

    u = int4.unpack_int4(w_packed, k).to(torch.int32) + 8
    packed = (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8)
    n = u.shape[0]
    scale = w_scale.reshape(n, 1).float().expand(n, k // group).T
    sz = torch.stack((scale, torch.zeros_like(scale)), dim=-1).to(torch.bfloat16).contiguous()
    return torch._convert_weight_to_int4pack(packed, 8), sz


def _paths(m: int, k: int, x, q4, s4, q8, s8, w_packed, w_scale, w16, right, triton_gemm, tiny):
    from asaf_fx.triton_kernels import cublas, gemm, gemv, hadamard, int4

    ops = torch.ops.asaf_fx
    half = torch.float16
    paths = {
        "fp16": lambda: x @ w16.T,
        "fp8-a4": lambda: cublas.w4a4_fp8_linear(q4, s4, w_packed, w_scale, None, half),
        "op-a4": lambda: ops.w4a_int_linear(q4, s4, w_packed, w_scale, None, k, half, 4),
        "op-a8": lambda: ops.w4a_int_linear(q8, s8, w_packed, w_scale, None, k, half, 8),
        "op-a16": lambda: ops.w4a16_linear(x, w_packed, w_scale, None, k, half),
        "unpack": lambda: int4.unpack_int4_to(w_packed, k, torch.int8),
        "rot+q": lambda: hadamard.rotate_quantize_triton(x, right, 4, 1.0),
    }
    if m > gemv.MAX_M and triton_gemm:  # no route takes it for fewer tokens, and autotuning it takes minutes
        paths["triton-a4"] = lambda: gemm.w4a_int_linear_triton(q4, s4, w_packed, w_scale, None, k, half)
        paths["triton-a8"] = lambda: gemm.w4a_int_linear_triton(q8, s8, w_packed, w_scale, None, k, half)
    if cublas.int_mm_shape_ok(m, k, w_packed.shape[0]):
        paths["int8-a4"] = lambda: cublas.w4a8_int8_linear(q4, s4, w_packed, w_scale, None, half)
        paths["int8-a8"] = lambda: cublas.w4a8_int8_linear(q8, s8, w_packed, w_scale, None, half)
    if m <= gemv.MAX_M:
        paths["gemv-a4"] = lambda: gemv.w4_gemv(q4, s4, w_packed, w_scale, None, k, half)
        paths["gemv-a16"] = lambda: gemv.w4_gemv(x, None, w_packed, w_scale, None, k, half)
        if m == 1:
            paths["gemv-split-a4"] = lambda: gemv.w4_gemv_split(q4, s4, w_packed, w_scale, None, half)
            paths["gemv-split-a8"] = lambda: gemv.w4_gemv_split(q8, s8, w_packed, w_scale, None, half)
        if tiny is not None:
            xb = x.to(torch.bfloat16)
            paths["tinygemm-a16"] = lambda: torch._weight_int4pack_mm(xb, tiny[0], 128, tiny[1])
    return paths


def _exactness(m: int, k: int, n: int, dev: str) -> list[str]:
    """Integer paths that do not reproduce x_q @ w_q.T exactly with unit scales (float32 output)."""
    from asaf_fx.triton_kernels import cublas, gemm, gemv, int4

    g = torch.Generator(device=dev).manual_seed(m + k)
    wrong = []
    w_q = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=dev, generator=g)
    packed = int4.pack_int4(w_q)
    ones_w = torch.ones(n, 1, device=dev)
    for bits in (4, 8):
        lim = 2 ** (bits - 1)
        x_q = torch.randint(-lim, lim, (m, k), dtype=torch.int8, device=dev, generator=g)
        ones_x = torch.ones(m, device=dev)
        ref = (x_q.double() @ w_q.double().T).float()
        cand = {f"triton-a{bits}": lambda: gemm.w4a_int_linear_triton(x_q, ones_x, packed, ones_w, None, k,
                                                                      torch.float32),
                f"op-a{bits}": lambda: torch.ops.asaf_fx.w4a_int_linear(x_q, ones_x, packed, ones_w, None, k,
                                                                        torch.float32, bits)}
        if bits == 4:
            cand["fp8-a4"] = lambda: cublas.w4a4_fp8_linear(x_q, ones_x, packed, ones_w, None, torch.float32)
        if cublas.int_mm_shape_ok(m, k, n):
            cand[f"int8-a{bits}"] = lambda: cublas.w4a8_int8_linear(x_q, ones_x, packed, ones_w, None, torch.float32)
        if m <= gemv.MAX_M:
            cand[f"gemv-a{bits}"] = lambda: gemv.w4_gemv(x_q, ones_x, packed, ones_w, None, k, torch.float32)
        if m == 1:
            cand[f"gemv-split-a{bits}"] = lambda: gemv.w4_gemv_split(x_q, ones_x, packed, ones_w, None, torch.float32)
        for name, fn in cand.items():
            try:
                ok = torch.equal(fn(), ref)
            except Exception as exc:  # noqa: BLE001  reported in the table, the check goes on
                print(f"  exactness {name} M={m} K={k}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
                ok = False
            if not ok:
                wrong.append(name)
    return wrong


def run(args: argparse.Namespace) -> list[dict]:
    import triton
    import triton.testing

    import asaf_fx.triton_kernels.ops  # noqa: F401  registers torch.ops.asaf_fx
    from asaf_fx.passes.quantize.rtn import quantize_rtn
    from asaf_fx.triton_kernels import hadamard, quantize

    dev = "cuda"
    torch.manual_seed(0)
    print(f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    print(f"command: {' '.join(['python', *sys.argv])}")
    rows = []
    for shape in args.shapes:
        k, n = (int(v) for v in shape.lower().split("x"))
        w16 = torch.randn(n, k, device=dev, dtype=torch.float16)
        q = quantize_rtn(w16, 4, clip_search=False)
        w_packed, w_scale = q.packed(), q.scales
        _, m_odd = hadamard.split_width(k)
        right = torch.linalg.qr(torch.randn(m_odd, m_odd, dtype=torch.float64))[0].to(dev)
        try:
            tiny = _tinygemm(w_packed, w_scale, k)
        except Exception as exc:  # noqa: BLE001  a torch without it (or refusing the shape) loses one column
            tiny = None
            print(f"  {shape}: _weight_int4pack_mm unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        for m in args.m:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            q4, s4 = quantize.quantize_per_token_triton(x, 4, 1.0)
            q8, s8 = quantize.quantize_per_token_triton(x, 8, 1.0)
            wrong = _exactness(min(m, 64), k, n, dev)
            times = {}
            paths = _paths(m, k, x, q4, s4, q8, s8, w_packed, w_scale, w16, right, args.triton_gemm, tiny)
            if "tinygemm-a16" in paths:  # bfloat16 math: report its error against the fp16 GEMV, not exactness
                try:
                    ref = paths["gemv-a16"]().float()
                    err = (paths["tinygemm-a16"]().float() - ref).abs().max().item() / ref.abs().max().item()
                    print(f"  {shape} M={m} tinygemm-a16 vs gemv-a16: max error {err:.2e} of the largest output")
                except Exception as exc:  # noqa: BLE001  timed below, where a failure is reported too
                    print(f"  {shape} M={m} tinygemm-a16: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            for name, fn in paths.items():
                try:
                    fn()  # autotuning and first-call choices happen here, outside the graph
                    torch.cuda.synchronize()
                    # Replayed as a CUDA graph, as in the compiled model: host launch costs (the
                    # autotuner's Python, argument checks) stay out of the kernel's time.
                    times[name] = triton.testing.do_bench_cudagraph(fn, rep=args.rep, return_mode="median")
                except Exception as exc:  # a path that fails on this shape is reported, the table goes on
                    times[name] = None
                    print(f"  {shape} M={m} {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            flops = 2.0 * m * n * k
            gemms = {p: t for p, t in times.items() if t and p not in ("unpack", "rot+q")}
            row = {"shape": shape, "m": m, "ms": times, "exact": not wrong, "not_exact": wrong,
                   "tflops": {p: flops / (t * 1e-3) / 1e12 for p, t in gemms.items()},
                   "x_fp16": {p: times["fp16"] / t for p, t in gemms.items()}}
            rows.append(row)
            _print_row(row)
            if args.out:  # after every row: a run stopped by a time limit keeps what it measured
                _write(args.out, rows)
    from asaf_fx.triton_kernels import cublas

    print(f"_scaled_mm row-wise output dtypes (wanted -> used): {cublas._ROWWISE_OUT}")
    return rows


def _write(path: str, rows: list[dict]) -> None:
    import triton

    from asaf_fx.triton_kernels import cublas

    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "command": " ".join(["python", *sys.argv]), "timing": "triton.testing.do_bench_cudagraph, median",
              "scaled_mm_rowwise_out": {str(k): str(v) for k, v in cublas._ROWWISE_OUT.items()}, "rows": rows}
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def _print_row(row: dict) -> None:
    t = row["ms"]
    cells = " ".join(f"{p}={t[p]:.4f}ms({row['x_fp16'][p]:.2f}x)" if t[p] and p in row["x_fp16"]
                     else f"{p}={t[p]:.4f}ms" if t[p] else f"{p}=FAIL" for p in t)
    flag = "exact" if row["exact"] else f"NOT EXACT: {','.join(row['not_exact'])}"
    print(f"{row['shape']:>11} M={row['m']:<5} fp16 {row['tflops']['fp16']:6.1f} TFLOP/s | {flag} | {cells}")


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
