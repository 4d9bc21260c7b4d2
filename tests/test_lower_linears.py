"""Lowering decoder linears to the INT4 kernel ops, and the W4A4KV4 model on both kernel paths."""

import os

import pytest
import torch

import asaf_fx
from asaf_fx.compile import rotation_passes
from asaf_fx.config import QuantConfig
from asaf_fx.passes.graph_utils import count_op, get_tensor
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
    assert count_op(gm, kernel) == 14
    out, ref = gm(tiny_ids, use_cache=False).logits, simulated(tiny_ids, use_cache=False).logits
    assert h.rel_err(out, ref) < 1e-4


def test_quantization_is_shared_and_fused(captured):
    gm = _rotated(captured, "llama")
    PassManager([LowerLinears([LinearLowering.make(w, 4) for w in _weights(gm)])])(gm)
    # per layer: one for q/k/v, one for gate/up; o_proj and down_proj fuse with their Hadamard
    assert count_op(gm, ops.quantize_per_token.default) == 2 * 2
    assert count_op(gm, ops.hadamard_rotate_quantize.default) == 2 * 2
    assert not any(name.endswith("proj.weight") for name, _ in gm.named_parameters())  # float copies freed


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
    cm = asaf_fx.compile(tiny_models["llama"], quant=quant, calibration=CALIBRATION, decode=False)
    logits = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("ASAF_FX_KERNELS", backend)
        logits[backend] = cm(tiny_ids[:, :5]).logits
    assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
    assert h.rel_err(logits["triton"], logits["reference"]) < 1e-3
