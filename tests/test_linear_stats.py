"""Per-linear calibration statistics gathered one decoder layer at a time."""

from __future__ import annotations

import torch

from asaf_fx.passes.layerwise import LayerwiseRunner
from asaf_fx.passes.linear_stats import collect_linear_stats
from asaf_fx.passes.split_layers import split_decoder_layers


def test_hessians_match_the_inputs_seen_by_the_original_model(captured, tiny_models, h):
    model = tiny_models["mistral"]
    batches = [torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    seen = h.linear_inputs(model, batches)

    runner = LayerwiseRunner(split_decoder_layers(captured("mistral")))
    states = [runner.start_tokens(ids) for ids in batches]
    for layer in range(runner.num_layers):
        stats = collect_linear_stats(runner, layer, states)
        assert len(stats) == 7  # q, k, v, o, gate, up, down: found in the graph, keyed by parameter
        for target, entry in stats.items():
            name = target.removesuffix(".weight")
            x = seen[name].double()
            assert entry.rows == x.shape[0] == 2 * 2 * 9
            torch.testing.assert_close(entry.hessian, x.T @ x, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(entry.mean_square, (x**2).mean(0), rtol=1e-6, atol=1e-6)
        states = [runner.run_layer(layer, state) for state in states]
