"""Capturing a deep model from its first decoder layers: the same graph as tracing every layer."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from asaf_fx.passes import capture
from asaf_fx.passes.capture import INPUTS, graph_inputs, run_graph
from asaf_fx.passes.infra import META_KEY
from asaf_fx.passes.repeat_layers import TRACED, first_layers, renamed, repeat_last_layer

LAYERS = TRACED + 2


def _traced_whole(monkeypatch) -> None:
    monkeypatch.setattr(capture, "decoder_stack", lambda root, num_layers: None)


def _ops(gm) -> Counter:
    # Per-layer work only: values a layer derives from the prologue alone (RoPE tables unsqueezed,
    # symbolic sizes) are made once per traced layer and shared by the copies.
    per_layer = ("linear", "scaled_dot_product_attention", "index_copy_", "silu", "rsqrt", "embedding")
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function"
                   and str(n.target).split(".")[1] in per_layer)


def _decode(gm, ids: torch.Tensor) -> torch.Tensor:
    """One token per call, every call reading the cache the earlier ones wrote."""
    batch, length = ids.shape
    cache = list(graph_inputs(gm, ids)[len(INPUTS):])
    mask = torch.ones(batch, length, dtype=torch.bool)
    steps = [gm(ids[:, i:i + 1], torch.full((batch, 1), i), torch.tensor([i]), mask, torch.tensor([0]), *cache)
             for i in range(length)]
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_repeated_capture_equals_tracing_every_layer(arch, h, monkeypatch):
    model = h.make_tiny(arch, seed=3, num_hidden_layers=LAYERS)
    forward = capture.capture(model)
    assert forward.meta[META_KEY]["traced_layers"] == TRACED
    with monkeypatch.context() as m:
        _traced_whole(m)
        whole_forward = capture.capture(model)
    assert whole_forward.meta[META_KEY]["traced_layers"] == LAYERS
    assert _ops(forward)["aten.linear.default"] == 7 * LAYERS + 1  # q k v o gate up down, lm_head
    assert _ops(forward)["aten.index_copy_.default"] == 2 * LAYERS  # each layer writes its own K and V
    assert _ops(forward) == _ops(whole_forward)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for shape in ((2, 9), (1, 23)):  # dynamic batch and length survive the copies
            ids = torch.randint(0, 256, shape, generator=generator)
            assert torch.equal(run_graph(forward, ids), run_graph(whole_forward, ids))
        # Several steps: a cache shared between layers, or one left unwritten, would change later logits.
        ids = torch.randint(0, 256, (2, 7), generator=generator)
        steps = _decode(forward, ids)
        assert torch.equal(steps, _decode(whole_forward, ids))
        assert torch.allclose(steps, model(ids, use_cache=False).logits, atol=1e-5)


def test_layers_that_differ_are_traced_whole(h):
    model = h.make_tiny("llama", seed=3, num_hidden_layers=LAYERS)
    model.model.layers[LAYERS - 1].self_attn.scaling = 0.5  # the last layer computes differently
    gm = capture.capture(model)
    assert gm.meta[META_KEY]["traced_layers"] == LAYERS
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(run_graph(gm, ids), model(ids, use_cache=False).logits, atol=1e-5)


def test_a_hooked_layer_is_traced_whole(h):
    model = h.make_tiny("llama", seed=3, num_hidden_layers=LAYERS)
    model.model.layers[TRACED].register_forward_hook(lambda module, args, out: out)
    assert capture.capture(model).meta[META_KEY]["traced_layers"] == LAYERS


def test_a_graph_whose_last_layers_differ_is_left_untouched(h):
    # Cut the model past the layer-signature check: the graph comparison alone must refuse.
    model = h.make_tiny("llama", seed=3, num_hidden_layers=LAYERS)
    model.model.layers[TRACED - 1].self_attn.scaling = 0.5
    with first_layers(model, "model.layers", TRACED):
        gm = capture._export(capture._Serving(model), torch.float32, torch.device("cpu"), TRACED)
    before = [(n.name, n.target) for n in gm.graph.nodes]
    assert not repeat_last_layer(gm, model, LAYERS)
    assert [(n.name, n.target) for n in gm.graph.nodes] == before


@pytest.mark.parametrize(("target", "expected"), [
    ("model.layers.2.mlp.up_proj.weight", "model.layers.7.mlp.up_proj.weight"),
    ("key_cache_2", "key_cache_7"),
    ("model.layers.12.fc2.weight", "model.layers.12.fc2.weight"),
    ("model.layers.2.experts.2", "model.layers.7.experts.7"),
])
def test_renamed_replaces_whole_indices_only(target, expected):
    assert renamed(target, 2, 7) == expected
