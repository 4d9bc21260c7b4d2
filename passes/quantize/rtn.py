"""Symmetric weight quantization grids and round-to-nearest (RTN) with an MSE clip search.

A weight row (or a group of ``group_size`` consecutive input columns of it) is quantized as
``codes * scale`` with integer ``codes`` in ``[-2^(b-1), 2^(b-1) - 1]`` and one positive scale per
row/group. The scale is ``clip · max|w| / (2^(b-1) - 1)`` with the clip factor chosen per row/group
to minimise the quantization error (``|w - q(w)|^2.4`` summed, as in GPTQ's reference code):
shrinking the range a little trades a few clipped outliers for finer steps everywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from asaf_fx.triton_kernels.int4 import pack_int4

SUPPORTED_BITS = (4, 8)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"weight bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


@dataclass(frozen=True)
class QuantizedWeight:
    """``codes`` (N, K) int8 and ``scales`` (N, ceil(K / group_size)) float32; group_size K = per channel."""

    codes: torch.Tensor
    scales: torch.Tensor
    bits: int
    group_size: int

    def packed(self) -> torch.Tensor:
        """4-bit codes two per byte, as the INT4 kernels read them (``int4.pack_int4``)."""
        if self.bits != 4:
            raise ValueError(f"only 4-bit codes are packed, these are {self.bits}-bit")
        return pack_int4(self.codes)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scales = self.scales.repeat_interleave(self.group_size, dim=1)[:, : self.codes.shape[1]]
        return (self.codes.to(torch.float32) * scales).to(dtype)


def _groups(columns: int, group_size: int | None) -> int:
    if group_size is None:
        return columns
    if group_size <= 0:
        raise ValueError(f"group_size must be positive or None (per channel), got {group_size}")
    return group_size


def search_scales(
    weight: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    *,
    clip_search: bool = True,
    grid: int = 40,
    min_clip: float = 0.6,
) -> torch.Tensor:
    """Per row (and group) scales, shape (N, ceil(K / group_size)), by MSE clip search.

    ``clip_search=False`` uses the full range (clip 1.0). Rows that are all zero get scale 1.
    """
    check_bits(bits)
    rows, columns = weight.shape
    size = _groups(columns, group_size)
    count = -(-columns // size)
    padded = torch.nn.functional.pad(weight.to(torch.float32), (0, count * size - columns))
    blocks = padded.reshape(rows, count, size)
    peak = blocks.abs().amax(dim=-1).clamp_min(1e-12)  # (N, G)
    top = qmax(bits)
    if not clip_search:
        return torch.where(blocks.abs().amax(dim=-1) > 0, peak / top, torch.ones_like(peak))
    best_scale = peak / top
    best_error = torch.full_like(peak, float("inf"))
    work = torch.empty_like(blocks)  # one buffer rewritten in place: the search is memory-bound
    for clip in torch.linspace(1.0, min_clip, grid).tolist():
        scale = peak * clip / top
        torch.div(blocks, scale[..., None], out=work)
        work.round_().clamp_(-top - 1, top).mul_(scale[..., None]).sub_(blocks).abs_().pow_(2.4)
        error = work.sum(dim=-1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
    return torch.where(blocks.abs().amax(dim=-1) > 0, best_scale, torch.ones_like(best_scale))


def quantize_with_scales(weight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Integer codes (int8) of ``weight`` on the grid given by ``scales``."""
    top = qmax(bits)
    expanded = scales.repeat_interleave(group_size, dim=1)[:, : weight.shape[1]]
    return torch.clamp(torch.round(weight.to(torch.float32) / expanded), -top - 1, top).to(torch.int8)


def quantize_rtn(
    weight: torch.Tensor, bits: int, group_size: int | None = None, *, clip_search: bool = True
) -> QuantizedWeight:
    """Round-to-nearest quantization of an (out_features, in_features) weight."""
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight (out_features, in_features), got shape {tuple(weight.shape)}")
    size = _groups(weight.shape[1], group_size)
    scales = search_scales(weight, bits, group_size, clip_search=clip_search)
    codes = quantize_with_scales(weight, scales, bits, size)
    return QuantizedWeight(codes=codes, scales=scales, bits=bits, group_size=size)
