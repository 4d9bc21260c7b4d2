"""Splitting a forward graph into per-layer submodules, and running them one layer at a time."""

from __future__ import annotations

import pytest
import torch

from asaf_fx.passes.capture import graph_inputs, run_graph
from asaf_fx.passes.graph_utils import aten, count_op
from asaf_fx.passes.infra import PassManager, PatternError
from asaf_fx.passes.layerwise import LayerwiseRunner
from asaf_fx.passes.split_layers import split_decoder_layers


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_split_computes_the_same_logits_and_has_one_part_per_layer(arch, captured, tiny_models, tiny_ids):
    gm = captured(arch)
    reference = run_graph(gm, tiny_ids)
    split = split_decoder_layers(gm)
    assert split.num_layers == tiny_models[arch].config.num_hidden_layers
    for name in split.layers:  # q, k, v, o, gate, up, down
        assert count_op(getattr(split.module, name), aten.linear.default) == 7
    assert count_op(getattr(split.module, split.epilogue), aten.linear.default) == 1  # lm_head
    assert count_op(getattr(split.module, split.prologue), aten.embedding.default) == 1
    assert torch.equal(split.module(*graph_inputs(gm, tiny_ids)), reference)
    longer = torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(2))  # dynamic shapes
    assert torch.equal(split.module(*graph_inputs(gm, longer)), run_graph(gm, longer))


def test_split_after_rotation_passes(captured, tiny_ids, h):
    from asaf_fx.compile import rotation_passes
    from asaf_fx.config import QuantConfig

    gm = captured("llama")
    PassManager(rotation_passes(QuantConfig()))(gm)
    reference = run_graph(gm, tiny_ids)
    split = split_decoder_layers(gm)
    assert torch.equal(split.module(*graph_inputs(gm, tiny_ids)), reference)


def test_runner_resumes_from_a_cached_layer_input(captured, tiny_ids):
    split = split_decoder_layers(captured("mistral"))
    runner = LayerwiseRunner(split)
    reference = runner.run(*graph_inputs(split.source, tiny_ids))
    assert torch.equal(reference, split.module(*graph_inputs(split.source, tiny_ids)))
    state = runner.start_tokens(tiny_ids)
    cached = [state]
    for layer in range(runner.num_layers):
        state = runner.run_layer(layer, state)
        cached.append(state)
    for start in range(runner.num_layers):
        resumed = cached[start]
        for layer in range(start, runner.num_layers):
            resumed = runner.run_layer(layer, resumed)
        assert torch.equal(runner.finish(resumed), reference)


def test_runner_state_holds_only_what_later_parts_need(captured, tiny_ids):
    runner = LayerwiseRunner(split_decoder_layers(captured("qwen2")))
    state = runner.start_tokens(tiny_ids)
    after_first = runner.run_layer(0, state)
    hidden = [v for v in after_first.values() if isinstance(v, torch.Tensor) and v.shape == (2, 11, 96)]
    assert len(hidden) == 1  # the residual stream, once; no weights or intermediate activations
    assert not any(isinstance(v, torch.nn.Parameter) for v in after_first.values())


def test_layer_call_hook_sees_the_layer_and_can_change_its_output(captured, tiny_ids):
    runner = LayerwiseRunner(split_decoder_layers(captured("llama")))
    seen = []

    def call(submodule, args):
        seen.append(count_op(submodule, aten.linear.default))
        return submodule(*args)

    state = runner.start_tokens(tiny_ids)
    state = runner.run_layer(1, runner.run_layer(0, state), call=call)
    assert seen == [7]
    zeroed = runner.run_layer(1, runner.run_layer(0, runner.start_tokens(tiny_ids)), call=lambda m, a: m(*a) * 0)
    assert not torch.equal(runner.finish(zeroed), runner.finish(state))
    with pytest.raises(IndexError, match="layer 5 is out of range for 2 decoder layers"):
        runner.run_layer(5, state)


def test_graph_without_swiglu_is_refused_unchanged(negative_graph, h):
    gm = negative_graph("layernorm_lm")
    snap = h.snapshot(gm)
    with pytest.raises(PatternError, match="found 0 residual adds and 0 attentions"):
        split_decoder_layers(gm)
    h.assert_unchanged(gm, snap)
