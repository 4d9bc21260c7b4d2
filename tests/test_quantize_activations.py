"""Per-token activation quantization before every decoder linear (lm_head left at 16 bits)."""

from __future__ import annotations

import pytest
import torch
from torch.fx import Interpreter

from asaf_fx.compile import rotation_passes
from asaf_fx.config import QuantConfig
from asaf_fx.passes.graph_utils import aten, count_op
from asaf_fx.passes.infra import PassManager, PatternError
from asaf_fx.passes.quantize_activations import QUANTIZE, QuantizeActivations


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_every_decoder_linear_gets_quantized_inputs_and_lm_head_does_not(arch, captured, tiny_models, tiny_ids, h):
    reference = captured(arch)(tiny_ids, use_cache=False).logits
    errors = {}
    for bits in (8, 4):
        gm = captured(arch)
        PassManager(rotation_passes(QuantConfig()) + [QuantizeActivations(bits)])(gm)
        layers = tiny_models[arch].config.num_hidden_layers
        assert count_op(gm, QUANTIZE) == 7 * layers  # q, k, v, o, gate, up, down; not lm_head
        final = [n for n in gm.graph.nodes if n.target == aten.linear.default][-1]
        assert final.args[0].target != aten._to_copy.default  # lm_head reads the normed stream directly
        errors[bits] = h.rel_err(gm(tiny_ids, use_cache=False).logits, reference)
    assert errors[8] < 0.02
    assert errors[8] < errors[4] < 0.5


def test_quantized_values_are_on_the_per_token_grid(captured, tiny_ids):
    gm = captured("mistral")
    PassManager([QuantizeActivations(4)])(gm)
    first = next(n for n in gm.graph.nodes if n.target == aten._to_copy.default and "asaf_fx" in n.meta)
    recorded = {}

    class Record(Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            if node is first:
                recorded["x"] = value
            return value

    Record(gm).run(tiny_ids, False)
    x = recorded["x"]
    scale = x.abs().amax(-1, keepdim=True) / 7  # the largest code is ±7 or -8 after rounding
    ratio = x / torch.where(scale > 0, scale, torch.ones_like(scale))
    assert int(ratio.round().unique().numel()) <= 16
    torch.testing.assert_close(ratio, ratio.round(), atol=1e-4, rtol=0)


def test_bad_arguments_and_missing_structure(negative_graph, h):
    with pytest.raises(ValueError, match="activation bits must be 4 or 8"):
        QuantizeActivations(16)
    with pytest.raises(ValueError, match=r"clip_ratio must lie in \(0, 1\]"):
        QuantizeActivations(4, clip_ratio=0.0)
    gm = negative_graph("gelu_mlp")
    snap = h.snapshot(gm)
    with pytest.raises(PatternError, match="expected one embedding"):
        QuantizeActivations(4)(gm)
    h.assert_unchanged(gm, snap)
