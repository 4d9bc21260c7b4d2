"""GPTQ's objective at 4-bit activations: fit the float inputs (the library) or the quantized ones?

    python benchmarks/gptq_objective.py --objective float|quantized-inputs [--a-clip 0.9]
        [--w-bits 4] [--a-bits 4] [--kv-bits 4] [--windows 4] [--calibration 32]

The compiled linear computes ``Ŵ · Q_a(x)``, with ``Q_a`` the per-token activation quantizer, while
the library's GPTQ minimises ``‖W X − Ŵ X‖`` on float inputs X. ``quantized-inputs`` fits what the
kernel really sees (the asymmetric objective of GPTAQ-style methods, within one linear):
``‖W X − Ŵ Q_a(X)‖² = ‖(W* − Ŵ) Q_a(X)‖² + const`` with the least-squares target
``W* = W Xᵀ Q_a(X) (Q_a(X)ᵀ Q_a(X))⁻¹``, so GPTQ runs on ``W*`` with the Hessian of ``Q_a(X)``.
Every decoder linear's input is quantized at ``--a-bits`` with the fixed ``--a-clip``, as the
lowered graph does. Calibration: ``--calibration`` windows of 512 tokens of WikiText-2
*validation* (seed 0); evaluation: the first ``--windows`` windows of 2048 tokens of the test split.

This is an experiment, not a library path: ``quantized-inputs`` patches the statistics and the
GPTQ call of ``asaf_fx.passes.quantize_weights`` for the duration of the run.
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager

import torch
from torch.fx import GraphModule

import asaf_fx
from asaf_fx.data import calibration_windows, perplexity, read_joined, token_windows, wikitext2_test_path, wikitext2_valid_path
from asaf_fx.passes import quantize_weights
from asaf_fx.passes.layerwise import LayerwiseRunner, State
from asaf_fx.passes.linear_stats import LinearStats, _Recorder
from asaf_fx.triton_kernels.quantize import quantize_rows_torch

OBJECTIVES = ("float", "quantized-inputs")


class _QuantizedInputRecorder(_Recorder):
    """Accumulates ``Q(x)ᵀQ(x)`` (as the stats' hessian) and ``xᵀQ(x)`` per linear input."""

    def __init__(self, module: GraphModule, targets: dict[str, str], stats: dict[str, LinearStats],
                 cross: dict[int, torch.Tensor], bits: int, clip: float) -> None:
        super().__init__(module, targets, stats)
        self.cross, self.bits, self.clip = cross, bits, clip

    def add(self, target: str, rows: torch.Tensor) -> LinearStats:
        codes, scale = quantize_rows_torch(rows.to(torch.float32), self.bits, self.clip)
        quantized = codes.to(torch.float32) * scale[:, None]
        entry = super().add(target, quantized)
        cross = self.cross.setdefault(id(entry.hessian), torch.zeros_like(entry.hessian))
        cross += rows.to(torch.float64).T @ quantized.to(torch.float64)
        return entry


@contextmanager
def quantized_input_objective(bits: int, clip: float):
    """Make ``quantize_layer_weights`` fit ``Ŵ Q(X)`` to ``W X`` (see the module docstring)."""
    cross: dict[int, torch.Tensor] = {}
    collect, gptq = quantize_weights.collect_linear_stats, quantize_weights.quantize_gptq

    def collect_quantized(runner: LayerwiseRunner, layer: int, states: list[State]) -> dict[str, LinearStats]:
        cross.clear()
        targets, stats = runner.parameter_targets(layer), {}
        for state in states:
            runner.run_layer(layer, state, call=lambda module, args: _QuantizedInputRecorder(
                module, targets, stats, cross, bits, clip).run(*args))
        return stats

    def gptq_on_target(weight: torch.Tensor, hessian: torch.Tensor, *args, damp: float = 0.01, **kwargs):
        damped = hessian.clone()
        damped.diagonal().add_(damp * damped.diagonal().mean())
        # W* = W C H⁻¹ with H symmetric: solve H W*ᵀ = (W C)ᵀ.
        target = torch.linalg.solve(damped, (weight.to(torch.float64) @ cross[id(hessian)]).T).T
        return gptq(target.to(weight.dtype), hessian, *args, damp=damp, **kwargs)

    quantize_weights.collect_linear_stats, quantize_weights.quantize_gptq = collect_quantized, gptq_on_target
    try:
        yield
    finally:
        quantize_weights.collect_linear_stats, quantize_weights.quantize_gptq = collect, gptq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--objective", choices=OBJECTIVES, required=True)
    parser.add_argument("--w-bits", type=int, default=4)
    parser.add_argument("--a-bits", type=int, default=4)
    parser.add_argument("--kv-bits", type=int, default=4)
    parser.add_argument("--a-clip", type=float, default=0.9)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--calibration", type=int, default=32)
    args = parser.parse_args()

    model, tokenizer = asaf_fx.load_model("smollm2")
    test = token_windows(tokenizer, read_joined(wikitext2_test_path()), 2048, args.windows or None)
    calibration = calibration_windows(tokenizer, wikitext2_valid_path(), args.calibration, 512, seed=0)
    quant = asaf_fx.QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits, kv_bits=args.kv_bits, w_method="gptq",
                                a_clip=args.a_clip)
    started = time.perf_counter()
    if args.objective == "float":
        cm = asaf_fx.compile(model, quant=quant, calibration=calibration, decode=False)
    else:
        with quantized_input_objective(args.a_bits, args.a_clip):
            cm = asaf_fx.compile(model, quant=quant, calibration=calibration, decode=False)
    spent = time.perf_counter() - started
    ppl = perplexity(lambda ids: cm(ids).logits, test)
    print(f"SmolLM2-135M · rotated W{args.w_bits}A{args.a_bits}KV{args.kv_bits} GPTQ a_clip {args.a_clip} · objective "
          f"{args.objective} · {test.shape[0]} test windows × 2048 · PPL {ppl:.3f} · compile {spent:.0f} s")


if __name__ == "__main__":
    main()
