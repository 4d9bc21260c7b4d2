"""Compile each Triton kernel to a CUDA binary for sm80 and sm90 without a GPU.

Run as a script with TRITON_INTERPRET unset (the kernels must be JIT functions, not interpreted
ones). Prints one line per kernel and exits 1 if any failed. The interpreter tests check what the
kernels compute; this checks that the GPU compiler accepts them (int8 dot shapes, layouts,
register and shared-memory use) at the configurations and widths the library will launch.
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from asaf_fx.triton_kernels import cublas, gemm, gemv, hadamard, int4, kv_quant, quantize
from asaf_fx.triton_kernels._runtime import next_pow2

FLOAT_ARGS = {"inv_sqrt", "clip_ratio"}


def compile_kernel(fn, pointers: dict[str, str], constexprs: dict, arch: int, **options) -> None:
    signature = {name: "fp32" if name in FLOAT_ARGS else "i32" for name in fn.arg_names}
    signature.update(pointers)
    signature.update({name: "constexpr" for name in constexprs})
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def cases():
    gemm_ptrs = dict(a_ptr="*i8", w_ptr="*u8", w_scale_ptr="*fp16", a_scale_ptr="*fp32", bias_ptr="*fp16",
                     c_ptr="*fp16")
    configs = gemm._gpu_configs()
    decode, prefill = configs[0], next(c for c in configs if c.kwargs["BLOCK_M"] > 16)
    for arch in (80, 90):
        for cfg, group, act in [(decode, 0, "i8"), (prefill, 128, "i8"), (decode, 128, "bf16"), (prefill, 0, "fp16")]:
            meta = dict(GROUP_K=group, INT_ACT=act == "i8", HAS_BIAS=True, FP32_DOT=False, **cfg.kwargs)
            yield (f"gemm sm{arch} {act} group={group} {cfg.kwargs}", gemm._w4_gemm_kernel.fn,
                   {**gemm_ptrs, "a_ptr": f"*{act}"}, meta, arch,
                   dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    # Llama widths: 4096 = 2^12, 14336 = 2^11·7, 11008 = 2^8·43, and a tiny odd one.
    # Attention heads: 128 = 2^7 (several rows per program, rotation alone).
    for power, m, quantize_ in [(4096, 1, True), (2048, 7, True), (256, 43, True), (2, 7, True), (128, 1, False)]:
        mp = next_pow2(m)
        br = max(1, min(64, 2048 // (power * mp)))
        meta = dict(M_ODD=m, POWER=power, LOG2P=power.bit_length() - 1, MP=mp, BR=br, QUANTIZE=quantize_, QMAX=7,
                    DENSE_DOT=br == 1 and m > 1 and mp >= 16 and power >= 16, EXACT_DOT=False)
        ptrs = dict(x_ptr="*fp16", right_ptr="*fp32", out_ptr="*i8" if quantize_ else "*fp16", scale_ptr="*fp32")
        for cfg in hadamard._WARPS:  # the autotuner's choices
            yield (f"rotate{'+quantize' if quantize_ else ''} sm90 n={power}·{m} warps={cfg.num_warps}",
                   hadamard._rotate_kernel.fn, ptrs, meta, 90, dict(num_warps=cfg.num_warps))
    gemv_ptrs = dict(a_ptr="*i8", w_ptr="*u8", w_scale_ptr="*fp16", a_scale_ptr="*fp32", bias_ptr="*fp16",
                     c_ptr="*fp16")
    for cfg in gemv._configs():
        for group, act in [(0, "i8"), (0, "bf16")] + ([(256, "i8")] if 256 % (2 * cfg.kwargs["BLOCK_KB"]) == 0 else []):
            meta = dict(GROUP_K=group, INT_ACT=act == "i8", HAS_BIAS=False, DOT_BF16=act == "bf16", EVEN_K=True,
                        **cfg.kwargs)
            yield (f"gemv sm90 {act} group={group} {cfg.kwargs}", gemv._w4_gemv_kernel.fn.fn,
                   {**gemv_ptrs, "a_ptr": f"*{act}"}, meta, 90,
                   dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    for cfg in gemv._split_configs():
        yield (f"gemv split sm90 {cfg.kwargs}", gemv._w4_gemv_split_kernel.fn.fn,
               dict(a_ptr="*i8", w_ptr="*u8", acc_ptr="*fp32"), dict(EVEN_K=True, **cfg.kwargs), 90,
               dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    for out in ("*i8", "*fp8e4nv"):
        yield (f"unpack_int4 sm90 -> {out}", int4._unpack_int4_kernel, dict(p_ptr="*u8", out_ptr=out),
               dict(BLOCK_N=32, BLOCK_KB=64), 90, {})
    yield ("codes_to_fp8 sm90", cublas._codes_to_fp8_kernel, dict(x_ptr="*i8", out_ptr="*fp8e4nv"), dict(BLOCK=4096),
           90, {})
    yield ("scale_epilogue sm90", cublas._scale_epilogue_kernel,
           dict(acc_ptr="*i32", a_scale_ptr="*fp32", w_scale_ptr="*fp16", bias_ptr="*fp16", out_ptr="*fp16"),
           dict(HAS_BIAS=True, BLOCK_M=32, BLOCK_N=128), 90, {})
    yield ("quantize_per_token sm90", quantize._quantize_per_token_kernel,
           dict(x_ptr="*bf16", q_ptr="*i8", scale_ptr="*fp32"), dict(QMAX=7, BLOCK_K=1024), 90, {})
    for bits in (4, 8):
        grid, meta = kv_quant._grid_args(1, 128)
        yield (f"kv_quantize sm90 bits={bits}", kv_quant._kv_quant_kernel,
               dict(x_ptr="*fp16", q_ptr="*u8", scale_ptr="*fp32", zero_ptr="*fp32"), dict(BITS=bits, **meta), 90, {})
        yield (f"kv_dequantize sm90 bits={bits}", kv_quant._kv_dequant_kernel,
               dict(q_ptr="*u8", scale_ptr="*fp32", zero_ptr="*fp32", out_ptr="*bf16"), dict(BITS=bits, **meta), 90, {})


def main() -> int:
    failed = 0
    for name, fn, ptrs, meta, arch, options in cases():
        try:
            compile_kernel(fn, ptrs, meta, arch, **options)
            print(f"ok   {name}")
        except Exception as exc:  # report every kernel, not just the first failure
            failed += 1
            lines = [line for line in str(exc).splitlines() if line.strip()]
            print(f"FAIL {name}: {lines[-1][:300] if lines else type(exc).__name__}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
