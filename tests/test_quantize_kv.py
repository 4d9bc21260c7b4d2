"""KV-cache quantization: where the quantizers go, and that they quantize what they should."""

import pytest
import torch

from asaf_fx.compile import rotation_passes
from asaf_fx.config import QuantConfig
from asaf_fx.passes.capture import INPUTS, graph_inputs, run_graph
from asaf_fx.passes.graph_utils import count_op
from asaf_fx.passes.infra import PassManager, PatternError
from asaf_fx.passes.quantize.quantize_kv import KV_DEQUANTIZE, KV_QUANTIZE, QuantizeKV


def test_keys_and_values_of_every_attention_are_quantized(captured):
    gm = captured("llama")
    PassManager(rotation_passes(QuantConfig()) + [QuantizeKV(4)])(gm)
    assert count_op(gm, KV_QUANTIZE) == count_op(gm, KV_DEQUANTIZE) == 4  # K and V of two layers
    kinds = sorted(n.meta["asaf_fx"]["kv"] for n in gm.graph.nodes if n.target is KV_QUANTIZE)
    assert kinds == ["key", "key", "value", "value"]
    for node in gm.graph.nodes:
        if node.target is KV_QUANTIZE:
            source = node.args[0]
            # keys after the online Q/K rotation, values straight out of v_proj; one group per head
            expected = (
                torch.ops.asaf_fx.hadamard_rotate.default
                if node.meta["asaf_fx"]["kv"] == "key"
                else torch.ops.aten.linear.default
            )
            assert source.target is expected and node.args[2] == 48


def test_cache_holds_quantized_values(captured, tiny_ids, h):
    gm = captured("mistral")
    PassManager(rotation_passes(QuantConfig()) + [QuantizeKV(4)])(gm)
    inputs = graph_inputs(gm, tiny_ids[:1, :1])
    gm(*inputs)
    caches = inputs[len(INPUTS):]
    assert len(caches) == 2 * 2
    for cache in caches:
        row = cache[0, :, 0]  # (kv heads, head_dim) at position 0
        assert row.abs().sum() > 0
        # 4-bit asymmetric: at most 16 distinct values per head
        assert all(torch.unique(head).numel() <= 16 for head in row)


def test_error_grows_as_bits_fall(captured, tiny_ids, h):
    ref = run_graph(captured("qwen2"), tiny_ids)
    errors = []
    for bits in (8, 4):
        gm = captured("qwen2")
        PassManager(rotation_passes(QuantConfig()) + [QuantizeKV(bits)])(gm)
        errors.append(h.rel_err(run_graph(gm, tiny_ids), ref))
    assert 0 < errors[0] < errors[1] < 0.2


def test_bad_settings(captured, negative_graph):
    with pytest.raises(ValueError, match="KV-cache bits must be 4 or 8"):
        QuantizeKV(16)
    with pytest.raises(ValueError, match="group size 32 does not divide head_dim 48"):
        QuantizeKV(4, group_size=32)(captured("llama"))
    with pytest.raises(PatternError, match="no scaled_dot_product_attention"):
        QuantizeKV(4)(negative_graph("gelu_mlp"))
