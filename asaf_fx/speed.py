"""Speed measurements behind ``python -m asaf_fx bench``: random Llama models, prefill, decode, memory.

Weights are random (seeded): the time of a GEMM does not depend on the values it multiplies, so a
random model with a real model's shapes measures that model's speed without downloading it.
"""

from __future__ import annotations

import functools
import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Shape:
    """The sizes of a Llama-family decoder that decide its speed."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layers: int
    max_positions: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


PRESETS: dict[str, Shape] = {
    "llama2-7b": Shape(4096, 11008, 32, 32, 128, 32000, 32, 4096),
    "llama3-8b": Shape(4096, 14336, 32, 8, 128, 128256, 32, 8192),
    "smollm2-135m": Shape(576, 1536, 9, 3, 64, 49152, 30, 8192),
    # For tests: every pass runs, in well under a second per call.
    "tiny": Shape(64, 128, 2, 1, 32, 256, 2, 128),
}


def random_llama(shape: Shape, layers: int, *, dtype: torch.dtype, device: torch.device, seed: int,
                 positions: int) -> torch.nn.Module:
    """A seeded random ``LlamaForCausalLM`` of ``shape`` cut to ``layers`` decoder layers, in eval mode.

    ``positions`` raises ``max_position_embeddings`` where the benchmark needs more (only the RoPE
    table grows). Parameters are created on ``device`` directly: a 7B model never passes the CPU.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                         max_position_embeddings=max(shape.max_positions, positions), tie_word_embeddings=False)
    config._attn_implementation = "sdpa"  # the graph passes match SDPA
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


def linear_totals(model: torch.nn.Module) -> dict[str, float]:
    """FLOPs per token and weight bytes of every linear except the output head (as ``model_totals``)."""
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    flops = sum(2 * m.in_features * m.out_features for m in linears)
    size = sum(p.numel() * p.element_size() for m in linears for p in m.parameters(recurse=False))
    return {"flops": flops, "dense_flops": flops, "weight_bytes": size}


# ------------------------------------------------------------------------------------ memory


class PeakMemory:
    """Peak memory of one measurement: CUDA allocator peak, or the process's peak RSS on the CPU.

    On Linux the RSS peak (VmHWM) is reset through ``/proc/self/clear_refs`` so that each
    measurement has its own; where that fails the figure is the process's peak so far.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.per_measurement = True

    @property
    def kind(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated (tensors, weights included)"
        rss = "process peak RSS (VmHWM, reset before each measurement)"
        return rss if self.per_measurement else "process peak RSS since start (ru_maxrss; monotone)"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.per_measurement = False

    def read(self) -> int:
        """Bytes."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.per_measurement:
            try:
                with open("/proc/self/status") as f:
                    return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
            except (OSError, StopIteration):
                self.per_measurement = False
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ----------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int,
              host: list[float] | None = None) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (which absorb JIT compiles).

    ``host``, if given, receives the seconds until each call returned, before waiting for the
    device: when that is close to the whole time, the host's launches, not the GPU, set the pace.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if host is not None:
            host.append(time.perf_counter() - start)
        _sync(device)
        samples.append(time.perf_counter() - start)
    return samples


def _oom_errors() -> tuple[type[BaseException], ...]:
    return (torch.cuda.OutOfMemoryError, MemoryError) if torch.cuda.is_available() else (MemoryError,)


def measure_prefill(forward: Callable[[torch.Tensor], Any], *, batch: int, seq: int, vocab: int,
                    device: torch.device, warmup: int, repeats: int, memory: PeakMemory, seed: int) -> dict[str, Any]:
    """Median latency of one full-sequence forward over ``batch × seq`` random tokens, its peak memory,
    and (``host_ms``) the median time until the call returned, before the device finished."""
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)
    memory.reset()
    host: list[float] = []
    try:
        with torch.no_grad():
            samples = time_call(functools.partial(forward, ids), device, warmup, repeats, host)
    except _oom_errors() as exc:
        return {"seq": seq, "batch": batch, "error": f"out of memory: {str(exc).splitlines()[0]}"}
    finally:
        del ids  # the batch must not outlive the measurement (peak memory of the next one)
    median = statistics.median(samples)
    return {"seq": seq, "batch": batch, "latency_ms": median * 1e3, "samples_ms": [s * 1e3 for s in samples],
            "host_ms": statistics.median(host) * 1e3, "tokens_per_s": batch * seq / median,
            "peak_memory_bytes": memory.read()}


def measure_decode(step: Callable[[torch.Tensor, int], torch.Tensor], *, tokens: int, warmup: int,
                   device: torch.device, memory: PeakMemory, batch: int = 1) -> dict[str, Any]:
    """Greedy decoding of ``batch`` rows: ``warmup`` untimed steps at positions 0.., then ``tokens`` timed ones.

    ``step(token (batch, 1), position) -> logits (batch, 1, vocab)``; each next token is the argmax,
    as in real greedy decoding (so every step waits for the previous one on the device; the host
    never waits inside the timed loop).
    """
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    memory.reset()
    try:
        with torch.no_grad():
            for position in range(warmup):
                token = step(token, position)[:, -1:].argmax(dim=-1)
            _sync(device)
            start = time.perf_counter()
            for position in range(warmup, warmup + tokens):
                token = step(token, position)[:, -1:].argmax(dim=-1)
            _sync(device)
    except _oom_errors() as exc:
        return {"batch": batch, "tokens": tokens, "error": f"out of memory: {str(exc).splitlines()[0]}"}
    seconds = time.perf_counter() - start
    return {"batch": batch, "tokens": tokens, "seconds": seconds, "tokens_per_s": batch * tokens / seconds,
            "ms_per_step": 1e3 * seconds / max(tokens, 1), "peak_memory_bytes": memory.read()}


def hf_decode_step(model: torch.nn.Module, cache_len: int) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """A decode step of the transformers model on its own ``StaticCache`` of ``cache_len`` positions.

    The cache takes its batch size from the first step's tokens. The position is written into one
    device tensor in place: a fresh ``torch.tensor([position])`` per step would be a blocking
    host-to-device copy.
    """
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    pos = torch.zeros(1, dtype=torch.long, device=next(model.parameters()).device)

    def step(token: torch.Tensor, position: int) -> torch.Tensor:
        pos.fill_(position)
        return model(input_ids=token, past_key_values=cache, cache_position=pos, use_cache=True).logits

    return step


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one, else the platform's processor string."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"
