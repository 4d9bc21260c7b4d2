"""Lowering decoder linears to the INT4 kernel ops, and the W4A4KV4 model on both kernel paths."""

import os

import pytest
import torch

import asaf_fx
from asaf_fx.compile import rotation_passes
from asaf_fx.config import QuantConfig
from asaf_fx.passes.capture import run_graph
from asaf_fx.passes.graph_utils import count_op, get_tensor, is_op
from asaf_fx.passes.infra import PassManager, PatternError
from asaf_fx.passes.lower.lower_linears import LinearLowering, LowerLinears
from asaf_fx.passes.quantize.rtn import quantize_rtn
from asaf_fx.passes.split_layers import decoder_linears

ops = torch.ops.asaf_fx
CALIBRATION = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(5))


def _rotated(captured, arch):
    gm = captured(arch)
    PassManager(rotation_passes(QuantConfig()))(gm)
    return gm


def _weights(gm, bits=4, group_size=None):
    return [quantize_rtn(get_tensor(gm, n.args[1]), bits, group_size) for layer in decoder_linears(gm) for n in layer]


@pytest.mark.parametrize("a_bits", [4, 8, 16])
def test_int4_kernels_compute_what_the_simulation_computes(captured, tiny_ids, h, a_bits):
    gm, simulated = _rotated(captured, "qwen2"), _rotated(captured, "qwen2")
    weights = _weights(gm, group_size=64 if a_bits == 8 else None)
    PassManager([LowerLinears([LinearLowering.make(w, a_bits, 0.9) for w in weights])])(gm)
    # same weights kept as dequantized floats, activations quantized and dequantized in the graph
    PassManager([LowerLinears([LinearLowering(w, None, a_bits, 0.9) for w in weights])])(simulated)
    assert count_op(gm, torch.ops.aten.linear.default) == 1  # lm_head stays a float linear
    assert count_op(simulated, torch.ops.aten.linear.default) == 15
    kernel = ops.w4a16_linear.default if a_bits == 16 else ops.w4a_int_linear.default
    assert count_op(gm, kernel) == 2 * 4  # per layer: q/k/v stacked, o, gate/up stacked, down
    out, ref = run_graph(gm, tiny_ids), run_graph(simulated, tiny_ids)
    assert h.rel_err(out, ref) < 1e-4


def test_quantization_is_shared_and_fused(captured):
    gm = _rotated(captured, "llama")
    PassManager([LowerLinears([LinearLowering.make(w, 4) for w in _weights(gm)])])(gm)
    # per layer: one for q/k/v, one for gate/up; o_proj and down_proj fuse with their Hadamard
    assert count_op(gm, ops.quantize_per_token.default) == 2 * 2
    assert count_op(gm, ops.hadamard_rotate_quantize.default) == 2 * 2
    assert not any(name.endswith("proj.weight") for name, _ in gm.named_parameters())  # float copies freed


def _stacks(gm):
    return [n.meta["asaf_fx"].get("stacked_weights") for n in gm.graph.nodes if is_op(n, ops.w4a_int_linear)]


def test_linears_reading_one_input_with_one_setting_are_stacked(captured):
    gm = _rotated(captured, "llama")
    names = [n.args[1].target for layer in decoder_linears(gm) for n in layer]
    lows = [LinearLowering.make(w, 8 if name.endswith("k_proj.weight") else 4) for w, name in zip(_weights(gm), names)]
    PassManager([LowerLinears(lows)])(gm)
    short = [None if s is None else [n.split(".")[-2] for n in s] for s in _stacks(gm)]
    # k_proj's 8-bit input is another setting: it stays alone, q and v share one call
    assert short == [["q_proj", "v_proj"], None, None, ["gate_proj", "up_proj"], None] * 2
    slices = [n for n in gm.graph.nodes if "stack_slice" in n.meta.get("asaf_fx", {})]
    widths = [n.args[3] - n.args[2] for n in slices]
    assert widths == [96, 48, 160, 160] * 2  # q (96), v (48); gate and up (160 each)


def test_stacked_outputs_equal_separate_calls_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    k = 96
    x_q = torch.randint(-8, 8, (5, k), dtype=torch.int8, generator=g)
    x_scale = torch.rand(5, generator=g) + 0.1
    parts = [quantize_rtn(torch.randn(n, k, generator=g), 4) for n in (64, 32, 48)]
    packed = [ops.pack_int4(w.codes) for w in parts]
    separate = torch.cat([ops.w4a_int_linear(x_q, x_scale, p, w.scales, None, k, torch.float32, 4)
                          for p, w in zip(packed, parts)], dim=-1)
    stacked = ops.w4a_int_linear(x_q, x_scale, torch.cat(packed), torch.cat([w.scales for w in parts]), None, k,
                                 torch.float32, 4)
    assert torch.equal(stacked, separate)


def test_graphs_lowered_by_one_pass_share_stacked_weights(captured):
    first, second = _rotated(captured, "llama"), _rotated(captured, "llama")
    lower = LowerLinears([LinearLowering.make(w, 4) for w in _weights(first)])
    PassManager([lower])(first)
    PassManager([lower])(second)
    stacked = [n for n in first.graph.find_nodes(op="get_attr") if "_stack" in n.target]
    assert len(stacked) == 2 * 2 * 2  # codes and scales of q/k/v and gate/up, two layers
    for node in stacked:
        assert get_tensor(first, node) is get_tensor(second, node)


def test_lowering_checks_its_inputs(captured):
    gm = _rotated(captured, "llama")
    weights = _weights(gm)
    with pytest.raises(PatternError, match="14 decoder linears in the graph, 13 lowerings"):
        LowerLinears([LinearLowering.make(w) for w in weights[:-1]])(gm)
    swapped = [weights[1], weights[0], *weights[2:]]  # q_proj (96, 96) and k_proj (48, 96) exchanged
    with pytest.raises(PatternError, match="linear 0 has weight"):
        LowerLinears([LinearLowering.make(w) for w in swapped])(gm)


@pytest.mark.interpreter
def test_w4a4kv4_logits_match_between_triton_and_reference_kernels(tiny_models, tiny_ids, h, monkeypatch):
    quant = QuantConfig(w_bits=4, a_bits=4, kv_bits=4, w_method="gptq", w_group_size=None)
    cm = asaf_fx.compile(tiny_models["llama"], quant=quant, calibration=CALIBRATION)
    logits = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("ASAF_FX_KERNELS", backend)
        logits[backend] = cm(tiny_ids[:, :5]).logits
    assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
    assert h.rel_err(logits["triton"], logits["reference"]) < 1e-3
