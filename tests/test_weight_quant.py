"""RTN and GPTQ weight quantization: grids, error properties and argument checks."""

from __future__ import annotations

import pytest
import torch

from asaf_fx.passes.quantize.gptq import quantize_gptq
from asaf_fx.passes.quantize.rtn import quantize_rtn, search_scales


def correlated_inputs(samples: int, features: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator) / features**0.5
    scale = torch.logspace(0, 1, features)  # uneven input magnitudes, as real activations have
    return (torch.randn(samples, features, generator=generator) @ mixing) * scale


def output_error(x: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> float:
    return float(((x @ weight.T - x @ approx.T) ** 2).sum() / (x @ weight.T).pow(2).sum())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [None, 16])
def test_rtn_codes_lie_on_the_grid_and_dequantize(bits, group_size):
    weight = torch.randn(7, 40, generator=torch.Generator().manual_seed(1))
    q = quantize_rtn(weight, bits, group_size)
    top = 2 ** (bits - 1) - 1
    assert q.codes.dtype == torch.int8
    assert int(q.codes.min()) >= -top - 1 and int(q.codes.max()) <= top
    assert q.scales.shape == (7, 1 if group_size is None else 3)
    expected = q.codes.float() * q.scales.repeat_interleave(q.group_size, 1)[:, :40]
    torch.testing.assert_close(q.dequantize(), expected)
    relative = float((q.dequantize() - weight).norm() / weight.norm())
    assert relative < (0.12 if bits == 4 else 0.008)


def test_clip_search_never_increases_the_error():
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    weight[:, 0] *= 8  # outliers make the full range wasteful
    searched = quantize_rtn(weight, 4, clip_search=True).dequantize()
    full = quantize_rtn(weight, 4, clip_search=False).dequantize()
    per_row_searched = ((searched - weight).abs() ** 2.4).sum(1)
    per_row_full = ((full - weight).abs() ** 2.4).sum(1)
    assert torch.all(per_row_searched <= per_row_full + 1e-6)
    assert float(per_row_searched.sum()) < 0.95 * float(per_row_full.sum())


def test_zero_rows_get_unit_scale_and_zero_codes():
    weight = torch.zeros(3, 8)
    weight[1] = torch.linspace(-1, 1, 8)
    q = quantize_rtn(weight, 4)
    assert torch.equal(q.codes[0], torch.zeros(8, dtype=torch.int8))
    assert float(q.scales[0, 0]) == 1.0
    assert torch.isfinite(q.dequantize()).all()


@pytest.mark.parametrize("group_size", [None, 32])
def test_gptq_beats_rtn_and_act_order_helps(group_size):
    # Input magnitudes grow with the column index, so the natural order fixes the least important
    # columns first; act-order reverses that and must do markedly better.
    x = correlated_inputs(512, 96)
    weight = torch.randn(48, 96, generator=torch.Generator().manual_seed(3))
    hessian = x.T.double() @ x.double()
    rtn = output_error(x, weight, quantize_rtn(weight, 4, group_size).dequantize())
    plain = output_error(x, weight, quantize_gptq(weight, hessian, 4, group_size, act_order=False).dequantize())
    ordered = output_error(x, weight, quantize_gptq(weight, hessian, 4, group_size, block_size=32).dequantize())
    assert plain < 0.9 * rtn
    assert ordered < 0.5 * rtn and ordered < 0.6 * plain


def test_gptq_equals_rtn_when_inputs_are_uncorrelated():
    # With a diagonal Hessian no error can be compensated by other columns: GPTQ is RTN.
    weight = torch.randn(16, 24, generator=torch.Generator().manual_seed(4))
    hessian = torch.diag(torch.linspace(1.0, 3.0, 24)).double()
    gptq = quantize_gptq(weight, hessian, 4, damp=1e-6)
    rtn = quantize_rtn(weight, 4)
    assert torch.equal(gptq.codes, rtn.codes)
    torch.testing.assert_close(gptq.scales, rtn.scales)


def test_gptq_keeps_column_order_under_act_order():
    # A column left permuted would wreck the output; at 8 bits the output must stay nearly exact.
    x = correlated_inputs(256, 32, seed=5)
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(5))
    hessian = x.T.double() @ x.double()
    for act_order in (False, True):
        q = quantize_gptq(weight, hessian, 8, act_order=act_order).dequantize()
        assert output_error(x, weight, q) < 1e-4


def test_gptq_survives_dead_inputs_and_rank_deficient_hessian():
    x = correlated_inputs(8, 32, seed=6)  # fewer samples than features: H is singular
    x[:, 3] = 0.0
    weight = torch.randn(4, 32, generator=torch.Generator().manual_seed(6))
    q = quantize_gptq(weight, x.T.double() @ x.double(), 4)
    assert torch.isfinite(q.dequantize()).all()
    assert torch.all(q.codes[:, 3] == 0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda w, h: quantize_rtn(w, 3), "weight bits must be one of"),
        (lambda w, h: quantize_gptq(w, h, 2), "weight bits must be one of"),
        (lambda w, h: quantize_gptq(w, h[:4, :4], 4), r"Hessian must be \(8, 8\)"),
        (lambda w, h: quantize_gptq(w, h * float("nan"), 4), "NaN or inf"),
        (lambda w, h: quantize_gptq(w, h, 4, damp=0.0), "damp must be positive"),
        (lambda w, h: quantize_rtn(w[0], 4), "2-D weight"),
        (lambda w, h: search_scales(w, 4, group_size=0), "group_size must be positive"),
    ],
)
def test_bad_arguments(call, message):
    weight, hessian = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(ValueError, match=message):
        call(weight, hessian)
