"""Activation clip ratios chosen per linear by output error (a_clip="mse")."""

from __future__ import annotations

import pytest
import torch

import asaf_fx
from asaf_fx.config import QuantConfig
from asaf_fx.passes.layerwise import LayerwiseRunner
from asaf_fx.passes.quantize import activation_clip
from asaf_fx.passes.quantize.activation_clip import CLIP_GRID, search_activation_clips
from asaf_fx.passes.split_layers import split_decoder_layers

CALIBRATION = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(7))


def _output_error(x: torch.Tensor, weight: torch.Tensor, bits: int, clip: float) -> float:
    codes, scale = torch.ops.asaf_fx.quantize_per_token(x, bits, clip)
    return float(((codes.float() * scale[:, None] - x) @ weight.float().T).square().sum())


@pytest.mark.parametrize("max_rows", [None, 36])  # 36: the first batch's 32 rows and 4 of the second's
def test_each_input_gets_the_ratio_with_the_least_output_error(captured, tiny_models, h, monkeypatch, max_rows):
    model = tiny_models["mistral"]
    batches = list(CALIBRATION.split(2))
    seen = {name: x.float()[:max_rows] for name, x in h.linear_inputs(model, batches).items()}
    if max_rows is not None:
        monkeypatch.setattr(activation_clip, "MAX_ROWS", max_rows)
    runner = LayerwiseRunner(split_decoder_layers(captured("mistral")))
    states = [runner.start_tokens(ids) for ids in batches]
    groups = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "o",
              "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "down"}
    chosen_all = []
    for layer in range(runner.num_layers):
        names = [
            f"model.layers.{layer}.{'self_attn' if groups[p] in ('attn', 'o') else 'mlp'}.{p}.weight" for p in groups
        ]
        bits = {name: 8 if "down_proj" in name else 4 for name in names}
        chosen = search_activation_clips(runner, layer, states, bits)
        assert set(chosen) == set(names)
        for group in set(groups.values()):
            members = [n for n in names if groups[n.split(".")[-2]] == group]
            errors = [sum(_output_error(seen[n.removesuffix(".weight")], model.get_parameter(n), bits[n], clip)
                          for n in members) for clip in CLIP_GRID]
            expected = CLIP_GRID[min(range(len(CLIP_GRID)), key=errors.__getitem__)]
            assert {chosen[n] for n in members} == {expected}, (layer, group, errors)
        chosen_all += list(chosen.values())
        states = [runner.run_layer(layer, state) for state in states]
    assert len(set(chosen_all)) > 1  # the ratios really differ between inputs
    assert search_activation_clips(runner, 0, states, {"model.layers.1.mlp.down_proj.weight": 4}) == {}


@pytest.fixture(scope="module")
def searched(tiny_models):
    quant = QuantConfig(w_bits=4, a_bits=4, kv_bits=4, w_method="rtn", a_clip="mse",
                        overrides={"*.o_proj.weight": {"a_clip": 0.9}, "*.down_proj.weight": {"a_bits": 16}})
    return asaf_fx.compile(tiny_models["llama"], asaf_fx.uniform_plan(2, 0.25), quant=quant, calibration=CALIBRATION,
                           prune=asaf_fx.PruneConfig(granularity=16))


def test_compile_pins_the_chosen_ratios_in_the_returned_config(searched, tiny_models, tiny_ids):
    quant = searched.quant
    clips = {}
    for layer in range(2):
        for part, proj in (("self_attn", "q_proj"), ("self_attn", "o_proj"), ("mlp", "up_proj"), ("mlp", "down_proj")):
            settings = quant.for_linear(f"model.layers.{layer}.{part}.{proj}.weight")
            clips[proj, layer] = settings.a_clip
            assert settings.w_bits == 4 and settings.a_bits == (16 if proj == "down_proj" else 4)
    assert all(clips["q_proj", i] in CLIP_GRID and clips["up_proj", i] in CLIP_GRID for i in range(2))
    assert clips["o_proj", 0] == clips["o_proj", 1] == 0.9  # a fixed override is kept as given
    assert all(clips["down_proj", i] == 1.0 for i in range(2))  # 16-bit inputs: nothing to search
    used = {n.args[-1] for n in searched.graph.graph.nodes
            if n.op == "call_function" and "quantize" in str(n.target) and "kv" not in str(n.target)}
    assert used == {clips["q_proj", i] for i in range(2)} | {clips["up_proj", i] for i in range(2)} | {0.9}
    again = asaf_fx.compile(tiny_models["llama"], asaf_fx.uniform_plan(2, 0.25), quant=quant, calibration=CALIBRATION,
                            prune=asaf_fx.PruneConfig(granularity=16))
    assert again.quant == quant and torch.equal(again(tiny_ids).logits, searched(tiny_ids).logits)


def test_search_needs_calibration_data(tiny_models):
    with pytest.raises(ValueError, match="a_clip='mse' chooses each activation clip on calibration data"):
        asaf_fx.compile(tiny_models["llama"], quant=QuantConfig(w_bits=4, a_bits=4, a_clip="mse"))
