"""INT4 packing layout, and packed RTN weights read back."""

from __future__ import annotations

import pytest
import torch

import asaf_fx.triton_kernels.ops  # noqa: F401  (registers torch.ops.asaf_fx)
from asaf_fx.passes.quantize.rtn import quantize_rtn
from asaf_fx.triton_kernels import int4


def test_layout_low_nibble_is_even_element():
    q = torch.tensor([[1, -1, -8, 7, 3]], dtype=torch.int8)
    packed = int4.pack_int4(q)
    # 1 | (-1 & 0xF) << 4 = 0xF1; -8 → 0x8, 7 → 0x7: 0x78; odd K pads a zero high nibble: 0x03.
    assert packed.tolist() == [[0xF1, 0x78, 0x03]]


@pytest.mark.parametrize("k", [1, 2, 7, 64, 129])
def test_pack_unpack_round_trip(k):
    q = torch.randint(-8, 8, (3, k), dtype=torch.int8)
    q[0] = -8  # extremes of the range
    q[1] = 7
    packed = int4.pack_int4(q)
    assert packed.shape == (3, (k + 1) // 2) and packed.dtype == torch.uint8
    assert torch.equal(int4.unpack_int4(packed, k), q)
    assert torch.equal(torch.ops.asaf_fx.unpack_int4(torch.ops.asaf_fx.pack_int4(q), k), q)


def test_pack_rejects_out_of_range_and_wrong_dtype():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        int4.pack_int4(torch.tensor([8], dtype=torch.int8))
    with pytest.raises(TypeError, match="int8"):
        int4.pack_int4(torch.tensor([1], dtype=torch.int32))
    with pytest.raises(ValueError, match="bytes"):
        int4.unpack_int4(torch.zeros(2, 3, dtype=torch.uint8), 8)


@pytest.mark.parametrize("k,group_size", [(37, None), (200, 64), (256, 128)])
def test_packed_rtn_weights_dequantize_within_half_a_step(k, group_size):
    w = torch.randn(5, k, dtype=torch.float64)
    w[2] = 0.0  # an all-zero channel must dequantize to 0
    q = quantize_rtn(w, 4, group_size, clip_search=False)
    packed, scale = q.packed(), q.scales
    gs = k if group_size is None else group_size
    deq = int4.dequantize_weight_int4(packed, scale, k, gs).double()
    step = scale.double()[:, torch.arange(k) // gs]
    assert torch.all((deq - w).abs() <= step / 2 + 1e-6)
    assert torch.equal(deq[2], torch.zeros(k, dtype=torch.float64))


def test_group_size_must_be_k_or_multiple_of_64():
    int4.check_group_size(100, 100)
    int4.check_group_size(200, 64)
    with pytest.raises(ValueError, match="multiple of 64"):
        int4.check_group_size(100, 32)


def test_opcheck_pack_unpack():
    q = torch.randint(-8, 8, (2, 5), dtype=torch.int8)
    torch.library.opcheck(torch.ops.asaf_fx.pack_int4.default, (q,))
    torch.library.opcheck(torch.ops.asaf_fx.unpack_int4.default, (int4.pack_int4(q), 5))
