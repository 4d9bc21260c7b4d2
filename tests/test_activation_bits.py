"""8-bit activations in chosen layers: the graph copy, the measured gains, the choice."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import asaf_fx
from asaf_fx.calibration.activation_gains import ActivationGains, measure_activation_gains
from asaf_fx.passes.capture import run_graph
from asaf_fx.passes.graph_utils import is_op
from asaf_fx.passes.quantize.activation_bits import QUANTIZERS, with_activation_bits

CALIBRATION = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(3))
HELD_OUT = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(4))
W4A4 = asaf_fx.QuantConfig(w_bits=4, a_bits=4, kv_bits=4, w_method="rtn", a_clip=0.9)


def quantizer_bits(gm) -> list[int]:
    return [node.args[[a.name for a in node.target._schema.arguments].index("bits")]
            for node in gm.graph.nodes if is_op(node, *QUANTIZERS)]


def test_the_copy_equals_compile_at_8_bits_and_the_original_is_untouched(tiny_models, tiny_ids, h):
    model = tiny_models["qwen2"]
    low = asaf_fx.compile(model, quant=W4A4)
    high = asaf_fx.compile(model, quant=replace(W4A4, a_bits=8))
    before = quantizer_bits(low.graph)
    assert before and set(before) == {4}
    raised = with_activation_bits(low.graph, 8)
    assert quantizer_bits(raised) == [8] * len(before)
    assert quantizer_bits(low.graph) == before  # a copy
    assert any(n.target is torch.ops.asaf_fx.hadamard_rotate_quantize.default for n in raised.graph.nodes)
    with torch.no_grad():
        got = run_graph(raised, tiny_ids)
        assert h.rel_err(got, high(tiny_ids).logits) < 1e-4  # RTN weights do not depend on a_bits
        assert h.rel_err(got, low(tiny_ids).logits) > 1e-2
    with pytest.raises(ValueError, match="activation bits must be 4 or 8"):
        with_activation_bits(low.graph, 16)


def _nll(compiled, ids) -> float:
    logits = compiled(ids).logits
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))


def test_each_gain_is_the_perplexity_change_compile_gives_with_that_layer_at_8_bits(tiny_models):
    model = tiny_models["llama"]
    seen = []
    gains = measure_activation_gains(model, W4A4, CALIBRATION, HELD_OUT, on_layer=lambda *a: seen.append(a))
    assert len(gains.gains) == 2 and seen == list(enumerate(gains.gains))
    assert all(len(names) == 7 and all(n.startswith(f"model.layers.{i}.") for n in names)
               for i, names in enumerate(gains.linears))  # names come from the graph; their form is HF's
    base = asaf_fx.compile(model, quant=W4A4, calibration=CALIBRATION)
    tokens = HELD_OUT[:, 1:].numel()
    with torch.no_grad():
        base_nll = _nll(base, HELD_OUT)
        for layer, gain in enumerate(gains.gains):
            quant = W4A4.pin({name: {"a_bits": 8} for name in gains.linears[layer]})
            mixed = asaf_fx.compile(model, quant=quant, calibration=CALIBRATION)
            expected = math.expm1((_nll(mixed, HELD_OUT) - base_nll) / tokens)
            assert gain == pytest.approx(expected, rel=0.01)  # simulated kernels: float rounding
            assert abs(gain) > 1e-3  # 8-bit inputs really changed the model


def test_choose_takes_the_most_helped_layers_and_only_those_that_help():
    names = [[f"model.layers.{i}.mlp.up_proj.weight", f"model.layers.{i}.mlp.down_proj.weight"] for i in range(4)]
    gains = ActivationGains([0.01, -0.05, -0.02, 0.0], names)
    base = asaf_fx.QuantConfig(w_bits=4, a_bits=4, overrides={"*.down_proj.weight": {"w_bits": 8},
                                                              "model.layers.1.mlp.up_proj.weight": {"a_bits": 16}})
    layers, quant = gains.choose(base, 3)
    assert layers == [1, 2]  # layers 0 and 3 do not help
    assert gains.choose(base, 1)[0] == [1]
    assert quant.for_linear(names[1][1]).a_bits == 8
    assert quant.for_linear(names[1][0]).a_bits == 16  # a 16-bit input is not lowered to 8
    assert quant.for_linear(names[2][1]) == replace(base.for_linear(names[2][1]), a_bits=8)  # w_bits 8 kept
    assert quant.for_linear(names[0][0]).a_bits == 4
    assert gains.choose(base, 0) == ([], base)
    with pytest.raises(ValueError, match="choose between 0 and 4 layers"):
        gains.choose(base, 5)
    assert ActivationGains.from_dict(gains.to_dict()) == gains
    with pytest.raises(ValueError, match="measured at 4 bits"):
        ActivationGains.from_dict({**gains.to_dict(), "bits": 4})


def test_a_config_with_no_4_bit_inputs_is_refused_before_any_work(tiny_models):
    with pytest.raises(ValueError, match="nothing to raise to 8 bits"):
        measure_activation_gains(tiny_models["llama"], asaf_fx.QuantConfig(w_bits=4, a_bits=8), CALIBRATION, HELD_OUT)
