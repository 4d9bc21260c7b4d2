"""``python -m asaf_fx bench``: prefill latency, decode tokens/s and peak memory on random weights.

Variants of one seeded random Llama-shaped model: ``fp16-eager`` (the transformers model as it
is, in half precision on a GPU and float32 on the CPU), ``fp16-compiled`` (the same model captured
by ``asaf_fx.compile`` without rotation or quantization, so through the same inductor and
CUDA-graph decode as the compressed variants), ``w4a4kv4`` and ``w4a8kv4`` (``asaf_fx.compile``
with rotations, RTN INT4 weights, 4- or 8-bit activations and a 4-bit KV cache) and ``asaf``
(W4A4KV4 plus a sparsity plan: ``--plan FILE`` or a uniform ``--sparsity``). Speed does not depend
on weight values, so random weights (and RTN rather than GPTQ) measure a real model's speed;
accuracy is measured elsewhere (``benchmarks/compile_ppl.py``).
On the CPU the INT4 ops run their torch references: such figures are labelled as the CPU reference
path, never as GPU speed.
"""

from __future__ import annotations

import gc
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from asaf_fx.speed import (
    PRESETS,
    PeakMemory,
    Shape,
    device_name,
    hf_decode_step,
    linear_totals,
    measure_decode,
    measure_prefill,
    random_llama,
)

SCHEMA = "asaf_fx.bench/2"
VARIANTS = ("fp16-eager", "fp16-compiled", "w4a4kv4", "w4a8kv4", "asaf")
ACT_BITS = {"w4a4kv4": 4, "w4a8kv4": 8, "asaf": 4}
CPU_LABEL = "CPU reference path — not a GPU speed figure"
CALIBRATION_SAMPLES, CALIBRATION_LEN = 4, 128
# Defaults per device: the full grid on a GPU; on the CPU a grid that ends in minutes on 2 cores.
DEFAULTS = {
    "cuda": {"preset": "llama2-7b", "layers": None, "seq": [512, 2048, 4096], "batch": [1, 4, 16],
             "decode_tokens": 64, "decode_batch": [1, 16], "repeats": 5},
    # All 30 SmolLM2 layers took 16 min here (2 busy cores): compiling and the reference INT4 ops.
    "cpu": {"preset": "smollm2-135m", "layers": 4, "seq": [512], "batch": [1], "decode_tokens": 4, "decode_batch": [1],
            "repeats": 3},
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class BenchConfig:
    """What :func:`benchmark` measures; ``None`` takes the device's default (``DEFAULTS``).

    ``layers``: run only the first N decoder layers of ``preset``. ``seq``/``batch``: prefill grid.
    ``decode_batch``: one compiled decode graph per batch size. ``cache_len``: static KV-cache
    positions (default: longest seq + warm-up + decode tokens). ``plan``: a plan JSON for the
    ``asaf`` variant, else a uniform ``sparsity``. ``backend``: the torch.compile backend of the
    compiled variants (``auto``: inductor on CUDA, eager on the CPU). ``command``: what the report
    says produced it.
    """

    preset: str | None = None
    layers: int | None = None
    seq: tuple[int, ...] | None = None
    batch: tuple[int, ...] | None = None
    decode_tokens: int | None = None
    decode_batch: tuple[int, ...] | None = None
    cache_len: int | None = None
    variants: tuple[str, ...] = VARIANTS
    plan: Path | None = None
    sparsity: float = 0.1
    device: str = "auto"
    dtype: str | None = None
    backend: str = "auto"
    warmup: int = 1
    repeats: int | None = None
    seed: int = 0
    command: str = "asaf_fx.benchmark"


def resolve(config: BenchConfig) -> SimpleNamespace:
    """``config`` with every default filled in for the device, checked; ValueError names what is wrong."""
    unknown = [v for v in config.variants if v not in VARIANTS]
    if unknown or not config.variants:
        raise ValueError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if config.preset is not None and config.preset not in PRESETS:
        raise ValueError(f"unknown preset {config.preset!r}; choose from {', '.join(sorted(PRESETS))}")
    if not 0.0 <= config.sparsity < 1.0:
        raise ValueError(f"sparsity {config.sparsity} is outside [0, 1); e.g. 0.1 prunes 10 % of each layer's "
                         f"linear FLOPs")
    if config.dtype is not None and config.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {config.dtype!r}; choose from {', '.join(sorted(DTYPES))}")
    args = SimpleNamespace(**{f.name: getattr(config, f.name) for f in fields(config)})
    args.variants = list(dict.fromkeys(config.variants))
    args.plan = Path(config.plan) if config.plan is not None else None
    args.device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                               "cpu" if config.device == "auto" else config.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: no CUDA GPU is available; use the CPU (the reference path)")
    args.layers_given = config.layers is not None
    for key, value in DEFAULTS[args.device.type].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    shape = PRESETS[args.preset]
    if args.layers_given and args.layers > shape.layers:
        raise ValueError(f"layers {args.layers}: {args.preset} has only {shape.layers} decoder layers")
    args.layers = min(args.layers or shape.layers, shape.layers)  # a device default never exceeds the preset
    if args.dtype is None:
        args.dtype = "float16" if args.device.type == "cuda" else "float32"
    args.seq, args.batch, args.decode_batch = list(args.seq), list(args.batch), list(args.decode_batch)
    args.cache_len = args.cache_len or max(args.seq) + args.warmup + args.decode_tokens
    if args.decode_tokens and args.cache_len < args.warmup + args.decode_tokens:
        raise ValueError(f"cache length {args.cache_len} holds fewer positions than warm-up + decode tokens "
                         f"({args.warmup + args.decode_tokens}); raise it")
    return args


def load_plan(args: SimpleNamespace):
    """The asaf variant's plan, checked against the number of layers that will run."""
    from asaf_fx.plan import Plan, uniform_plan

    if args.plan is None:
        return uniform_plan(args.layers, args.sparsity)
    try:
        text = args.plan.read_text(encoding="utf-8")  # OSError (missing file) is reported by the caller
        plan = Plan.from_json(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"plan {args.plan} is not a plan JSON file ({exc.__class__.__name__}: {str(exc)[:80]}); "
                         "solve a sensitivity table into one with: python -m asaf_fx plan TABLE --out plan.json"
                         ) from exc
    if plan.num_layers != args.layers:
        full = PRESETS[args.preset].layers
        fix = f"run {plan.num_layers} layers (--layers) or " if plan.num_layers <= full else ""
        raise ValueError(f"plan {args.plan} covers {plan.num_layers} decoder layers but the benchmark runs "
                         f"{args.layers} of {args.preset}'s {full}; {fix}pass a plan solved for {args.layers} layers")
    return plan


def environment(args: SimpleNamespace) -> dict[str, Any]:
    """Device, kernels and versions: what a reader needs to judge the figures."""
    import transformers

    import asaf_fx
    from asaf_fx.triton_kernels.ops import kernel_backend

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    kernels = kernel_backend(torch.empty(0, device=args.device))
    return {"device": args.device.type, "device_name": device_name(args.device), "kernels": kernels,
            "label": CPU_LABEL if args.device.type == "cpu" else f"GPU, {kernels} kernels",
            "versions": {"asaf_fx": asaf_fx.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "triton": triton_version,
                         "python": platform.python_version()},
            "command": args.command}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _build_model(args: SimpleNamespace) -> torch.nn.Module:
    positions = max(max(args.seq), args.cache_len)
    return random_llama(PRESETS[args.preset], args.layers, dtype=DTYPES[args.dtype], device=args.device,
                        seed=args.seed, positions=positions)


def _compile(name: str, model: torch.nn.Module, args: SimpleNamespace, plan, max_batch: int):
    import asaf_fx

    shape: Shape = PRESETS[args.preset]
    if name == "fp16-compiled":
        quant = asaf_fx.QuantConfig(rotate=False)
    else:
        # RTN without its clip search: values (hence the search) do not change speed, and the search
        # dominated the CPU compile time (40 passes over every weight).
        quant = asaf_fx.QuantConfig(w_bits=4, a_bits=ACT_BITS[name], kv_bits=4, w_method="rtn", w_clip_search=False,
                                    seed=args.seed)
    calibration = None
    if name == "asaf":  # channel selection reads activations; random tokens suffice for speed
        positions = max(max(args.seq), args.cache_len)
        calibration = torch.randint(0, shape.vocab, (CALIBRATION_SAMPLES, min(CALIBRATION_LEN, positions)),
                                    generator=torch.Generator().manual_seed(args.seed + 1)).to(args.device)
    return asaf_fx.compile(model, plan if name == "asaf" else None, quant=quant, calibration=calibration,
                           max_batch=max_batch, max_cache_len=args.cache_len,
                           backend=None if args.backend == "eager" else args.backend)


def _eager_forward(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda ids: model(ids, use_cache=False).logits


def build_variant(name: str, args: SimpleNamespace, plan) -> tuple[Any, dict[int, Any], dict[str, Any]]:
    """(forward, {decode batch: step}, facts) of one variant; facts hold compile time, FLOPs and bytes.

    A compiled variant is compiled once, for the largest decode batch; each batch decodes on a cache of its own.
    """
    from asaf_fx.inspection import model_totals

    model = _build_model(args)
    batches = args.decode_batch if args.decode_tokens else []
    if name == "fp16-eager":
        steps = {b: hf_decode_step(model, args.cache_len) for b in batches}  # one cache each
        return _eager_forward(model), steps, {"compile_s": None, **linear_totals(model)}
    start = time.perf_counter()
    compiled = _compile(name, model, args, plan, max(batches, default=1))
    compile_s = time.perf_counter() - start
    del model  # the compiled graphs hold their own tensors
    _free(args.device)
    facts = {"compile_s": compile_s, **model_totals(compiled), "quant": compiled.quant.to_dict()}
    if name == "asaf":
        facts["plan"] = {"layer_sparsity": list(plan.layer_sparsity), "method": plan.method}
    steps = {b: compiled.decode_steps(b, args.cache_len) for b in batches}
    return (lambda ids: compiled(ids).logits), steps, facts


def _cell_line(cell: dict[str, Any]) -> str:
    return (f"{cell['latency_ms']:.1f} ms (host returned after {cell['host_ms']:.1f} ms), "
            f"peak {_mib(cell['peak_memory_bytes'])} MiB")


def _decode_line(cell: dict[str, Any]) -> str:
    return (f"{cell['tokens_per_s']:,.1f} tok/s ({cell['ms_per_step']:.2f} ms/step), "
            f"peak {_mib(cell['peak_memory_bytes'])} MiB")


def run_variant(name: str, args: SimpleNamespace, plan, memory: PeakMemory, console: Console) -> dict[str, Any]:
    console.print(f"[dim]{name}: building the model{'' if name == 'fp16-eager' else ' and compiling it'}…[/dim]")
    start = time.perf_counter()
    forward, steps, facts = build_variant(name, args, plan)
    console.print(f"[dim]{name}: built in {time.perf_counter() - start:.1f} s (asaf_fx.compile "
                  f"{facts['compile_s'] or 0:.1f} s; torch.compile runs inside the first calls); measuring…[/dim]")
    vocab = PRESETS[args.preset].vocab
    prefill = []
    for seq in args.seq:  # one line per cell, so a run stopped part-way still shows what it measured
        for batch in args.batch:
            prefill.append(measure_prefill(forward, batch=batch, seq=seq, vocab=vocab, device=args.device,
                                           warmup=args.warmup, repeats=args.repeats, memory=memory, seed=args.seed + 2))
            cell = prefill[-1]
            console.print(f"[dim]{name}: seq {seq} × batch {batch}: {cell.get('error') or _cell_line(cell)}[/dim]")
    decode = []
    for batch, step in steps.items():
        decode.append(measure_decode(step, batch=batch, tokens=args.decode_tokens, warmup=max(args.warmup, 2),
                                     device=args.device, memory=memory))
        cell = decode[-1]
        console.print(f"[dim]{name}: decode batch {batch}: {cell.get('error') or _decode_line(cell)}[/dim]")
    del forward, steps
    _free(args.device)
    precision = args.dtype if name.startswith("fp16") else f"W4A{ACT_BITS[name]}KV4, {args.dtype} elsewhere"
    return {"precision": precision, **facts, "prefill": prefill, "decode": decode}


def notes(args: SimpleNamespace, memory: PeakMemory) -> list[str]:
    """What each figure is, printed under the table and stored in the JSON."""
    shape = PRESETS[args.preset]
    how = "--layers" if args.layers_given else "the CPU default; --layers N changes it"
    depth = (f"{args.layers} of {shape.layers} decoder layers ({how}): figures are for this depth, not "
             "extrapolated to the full model") if args.layers < shape.layers else f"all {shape.layers} decoder layers"
    engine = "inductor" if args.backend == "auto" and args.device.type == "cuda" else (
        "eager" if args.backend in ("auto", "eager") else args.backend)
    return [
        f"model: random weights (seed {args.seed}) with {args.preset} shapes, {depth}; weight values do not change "
        f"speed",
        f"fp16-eager: the transformers model as it is ({args.dtype}"
        f"{', the CPU has no fast fp16' if args.device.type == 'cpu' else ''}), eager; decode through its StaticCache",
        f"fp16-compiled and the INT4 variants: asaf_fx.compile graphs ({engine}"
        f"{'; decode steps replayed as CUDA graphs' if args.device.type == 'cuda' else ''}); fp16-compiled without "
        "rotation or quantization; w4a4kv4/w4a8kv4 rotated, weights by RTN without clip search (GPTQ and the search "
        "change values, not speed)"
        f"; asaf is w4a4kv4 plus {'plan ' + str(args.plan) if args.plan else f'a uniform {args.sparsity:g} plan'}, "
        f"channels chosen on {CALIBRATION_SAMPLES} random sequences",
        f"prefill: one forward of batch × seq tokens, no KV cache, logits for every position; median of {args.repeats} "
        f"after {args.warmup} warm-up (JIT compilation falls in the warm-up)",
        f"decode: batch {' and '.join(map(str, args.decode_batch))}, greedy, {args.decode_tokens} tokens after "
        f"{max(args.warmup, 2)} warm-up steps, in a static cache of {args.cache_len} positions (each step attends over "
        "all of them); peak memory includes the cache",
        f"peak memory: {memory.kind}",
        "weight bytes and GFLOPs/token: decoder-layer linears only (embedding and lm_head excluded)",
    ]


def benchmark(config: BenchConfig, console: Console | None = None) -> dict[str, Any]:
    """Measure every variant in turn (one model in memory at a time); progress lines go to ``console``.
    Returns the report that :func:`render` prints and ``python -m asaf_fx bench`` writes as JSON."""
    args = resolve(config)
    console = console if console is not None else Console(stderr=True, soft_wrap=True)
    plan = load_plan(args) if "asaf" in args.variants else None  # fail before any model is built
    report: dict[str, Any] = {"schema": SCHEMA, **environment(args), "preset": args.preset,
                              "shape": PRESETS[args.preset].to_dict(), "layers_run": args.layers,
                              "settings": {"seq": args.seq, "batch": args.batch, "decode_tokens": args.decode_tokens,
                                           "decode_batch": args.decode_batch,
                                           "cache_len": args.cache_len, "warmup": args.warmup, "repeats": args.repeats,
                                           "dtype": args.dtype, "seed": args.seed, "backend": args.backend}}
    memory = PeakMemory(args.device)
    report["variants"] = {name: run_variant(name, args, plan, memory, console) for name in args.variants}
    report["notes"] = notes(args, memory)
    return report


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.1f}"


def _prefill_table(report: dict[str, Any]) -> Table:
    grid = Table(title=f"prefill: {report['preset']}, {report['layers_run']} of {report['shape']['layers']} layers")
    for column in ("variant", "seq", "batch", "latency ms", "tokens/s", "peak MiB"):
        grid.add_column(column, justify="left" if column == "variant" else "right")
    for name, result in report["variants"].items():
        for i, cell in enumerate(result["prefill"]):
            figures = ([cell["error"], "", ""] if "error" in cell else
                       [f"{cell['latency_ms']:,.1f}", f"{cell['tokens_per_s']:,.0f}", _mib(cell["peak_memory_bytes"])])
            grid.add_row(name if i == 0 else "", str(cell["seq"]), str(cell["batch"]), *figures)
    return grid


def _variant_table(report: dict[str, Any]) -> Table:
    grid = Table(title="per variant: decode, weights, compile")
    for column in ("variant", "precision", "decode batch", "decode tok/s", "ms/step", "decode peak MiB", "weight MiB",
                   "GFLOP/tok", "compile s"):
        grid.add_column(column, justify="left" if column in ("variant", "precision") else "right")
    for name, result in report["variants"].items():
        facts = [_mib(result["weight_bytes"]), f"{result['flops'] / 1e9:.4g}",
                 "-" if result["compile_s"] is None else f"{result['compile_s']:.1f}"]
        for i, cell in enumerate(result["decode"] or [{}]):
            if "error" in cell:
                figures = [str(cell["batch"]), cell["error"], "", ""]
            elif cell:
                figures = [str(cell["batch"]), f"{cell['tokens_per_s']:,.1f}", f"{cell['ms_per_step']:.2f}",
                           _mib(cell["peak_memory_bytes"])]
            else:
                figures = ["-", "-", "-", "-"]
            grid.add_row(name if i == 0 else "", result["precision"].split(",")[0] if i == 0 else "", *figures,
                         *(facts if i == 0 else ["", "", ""]))
    return grid


def render(report: dict[str, Any], console: Console) -> None:
    """A header naming device, kernels and versions; the prefill table; the per-variant table; the notes."""
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v)
    console.print(Text(report["label"], style="bold red" if report["device"] == "cpu" else "bold"))
    console.print(f"device: {report['device']} ({report['device_name']}) · INT4 kernels: {report['kernels']} · "
                  f"{versions}")
    console.print(f"command: {report['command']}")
    console.print(_prefill_table(report))
    console.print(_variant_table(report))
    for line in report["notes"]:
        console.print(f"• {line}")
