"""Reuse quantized weights within a scope, found again by the content of what they were computed from.

Quantizing a weight (GPTQ above all: most of a CPU compile) is a deterministic function of the
weight, its input Hessian and the settings. A pipeline compiles one model many times — the
calibration base, the unpruned base, a plan per round, a uniform plan — and in each of them every
weight whose inputs are unchanged (all layers before the first pruned one, every attention block up
to it) is quantized from bit-identical tensors. Inside ``with reuse_quantized_weights():`` such a
weight is quantized once: results are keyed on SHA-256 digests of the tensors' bytes plus their
shapes, dtypes, device and the settings, so a hit returns exactly what the quantizer computes.

Outside the scope nothing is kept (a plain ``compile`` holds no hidden memory); inside, at most
``max_bytes`` of codes and scales, least recently used first out.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from asaf_fx.passes.quantize.rtn import QuantizedWeight

DEFAULT_MAX_BYTES = 512 * 2**20


def content_key(tensor: torch.Tensor | None) -> Hashable:
    """(shape, dtype, device type, SHA-256 of the bytes) of ``tensor``; None for None."""
    if tensor is None:
        return None
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    digest = hashlib.sha256(flat.view(torch.uint8).numpy()).digest()
    return tuple(tensor.shape), str(tensor.dtype), tensor.device.type, digest


def _nbytes(q: QuantizedWeight) -> int:
    return q.codes.numel() * q.codes.element_size() + q.scales.numel() * q.scales.element_size()


def _copy(q: QuantizedWeight) -> QuantizedWeight:
    # Callers own what they get: a caller editing its codes in place must not edit the stored ones.
    return QuantizedWeight(q.codes.clone(), q.scales.clone(), q.bits, q.group_size)


@dataclass
class ReuseStats:
    hits: int = 0
    misses: int = 0


class _Store:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[Hashable, QuantizedWeight] = OrderedDict()
        self.bytes = 0
        self.stats = ReuseStats()

    def get_or_compute(self, key: Hashable, compute: Callable[[], QuantizedWeight]) -> QuantizedWeight:
        if key in self.entries:
            self.entries.move_to_end(key)
            self.stats.hits += 1
            return _copy(self.entries[key])
        self.stats.misses += 1
        result = compute()
        size = _nbytes(result)
        if size <= self.max_bytes:
            self.entries[key] = _copy(result)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, dropped = self.entries.popitem(last=False)
                self.bytes -= _nbytes(dropped)
        return result


_active: list[_Store] = []


@contextmanager
def reuse_quantized_weights(max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[ReuseStats]:
    """Within the block, a weight quantized again from identical inputs and settings is reused.

    Yields the hit and miss counts. Nested scopes share the outermost one's store.
    """
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    store = _active[0] if _active else _Store(max_bytes)
    _active.append(store)
    try:
        yield store.stats
    finally:
        _active.pop()


def quantize_reusing(settings: Hashable, weight: torch.Tensor, hessian: torch.Tensor | None,
                     compute: Callable[[], QuantizedWeight]) -> QuantizedWeight:
    """``compute()``, or inside :func:`reuse_quantized_weights` the result an earlier call with equal
    ``settings``, ``weight`` and ``hessian`` (by content) got."""
    if not _active:
        return compute()
    key = (settings, content_key(weight), content_key(hessian))
    return _active[0].get_or_compute(key, compute)
