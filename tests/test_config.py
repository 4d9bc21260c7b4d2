import dataclasses
import json
from dataclasses import replace

import pytest

from asaf_fx import QuantConfig


def test_defaults_are_rotation_only():
    q = QuantConfig()
    assert (q.w_bits, q.a_bits, q.kv_bits, q.rotate, q.seed) == (16, 16, 16, True, 0)
    assert not q.quantizes and QuantConfig(kv_bits=4).quantizes


def test_round_trip_through_json():
    q = QuantConfig(w_bits=4, a_bits=8, kv_bits=4, w_method="gptq", rotation="orthogonal", seed=7)
    d = json.loads(json.dumps(q.to_dict()))
    assert d["version"] == QuantConfig.version
    assert QuantConfig.from_dict(d) == q


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        QuantConfig().w_bits = 4


@pytest.mark.parametrize("kwargs, match", [
    ({"w_bits": 3}, "w_bits=3"), ({"a_bits": 32}, "a_bits=32"), ({"kv_bits": True}, "kv_bits=True"),
    ({"w_method": "awq"}, "w_method"), ({"rotation": "givens"}, "rotation"), ({"seed": -1}, "seed"),
    ({"rotate": 1}, "rotate"), ({"w_clip_search": "no"}, "w_clip_search"),
])
def test_validation_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


def test_from_dict_rejects_unknown_fields_and_versions():
    with pytest.raises(ValueError, match="unknown QuantConfig fields"):
        QuantConfig.from_dict({"w_bits": 16, "group_size": 128})
    with pytest.raises(ValueError, match="version 99"):
        QuantConfig.from_dict({"version": 99})


def test_new_fields_and_overrides_validate():
    q = QuantConfig(w_bits=4, w_group_size=128, a_clip=0.9, overrides={"*.down_proj.*": {"a_bits": 8}})
    assert q.for_linear("model.layers.3.mlp.down_proj.weight").a_bits == 8
    assert q.for_linear("model.layers.3.mlp.up_proj.weight").a_bits == 16
    assert QuantConfig.from_dict(json.loads(json.dumps(q.to_dict()))) == q
    assert QuantConfig(overrides={"model.layers.0.*": {"w_bits": 4}}).quantizes
    with pytest.raises(ValueError, match="w_group_size=100"):
        QuantConfig(w_group_size=100)
    with pytest.raises(ValueError, match="a_clip=0"):
        QuantConfig(a_clip=0)
    with pytest.raises(ValueError, match="a_clip='auto': must lie in \\(0, 1\\] .* or be 'mse'"):
        QuantConfig(a_clip="auto")
    with pytest.raises(ValueError, match="unknown settings \\['kv_bits'\\]"):
        QuantConfig(overrides={"*": {"kv_bits": 4}})
    with pytest.raises(ValueError, match="w_bits=3"):
        QuantConfig(overrides={"*": {"w_bits": 3}})


def test_version_1_configs_still_load():
    assert QuantConfig.from_dict({"version": 1, "w_bits": 4}) == QuantConfig(w_bits=4)


def test_version_2_configs_load_with_the_clip_search_on():
    loaded = QuantConfig.from_dict({"version": 2, "w_bits": 4, "a_clip": 0.9})
    assert loaded == QuantConfig(w_bits=4, a_clip=0.9) and loaded.w_clip_search
    off = QuantConfig(w_bits=4, w_clip_search=False)
    assert QuantConfig.from_dict(json.loads(json.dumps(off.to_dict()))) == off


def test_version_3_configs_load_and_pinned_clips_override_every_pattern():
    assert QuantConfig.from_dict({"version": 3, "w_bits": 4, "a_clip": 0.9}) == QuantConfig(w_bits=4, a_clip=0.9)
    searched = QuantConfig(w_bits=4, a_bits=4, a_clip="mse", overrides={"*.down_proj.weight": {"a_bits": 8}})
    down, odd = "model.layers.0.mlp.down_proj.weight", "model.layers.[1].mlp.down_proj.weight"
    pinned = searched.pin({down: {"a_clip": 0.75}, odd: {"a_clip": 0.8}})
    assert pinned.for_linear(down) == replace(searched.for_linear(down), a_clip=0.75)  # a_bits 8 kept
    assert pinned.for_linear(odd).a_clip == 0.8  # a name is matched literally, brackets and all
    assert pinned.for_linear("model.layers.2.mlp.down_proj.weight").a_clip == "mse"
    assert QuantConfig.from_dict(json.loads(json.dumps(pinned.to_dict()))) == pinned
    up = "model.layers.0.mlp.up_proj.weight"
    raised = pinned.pin({up: {"a_bits": 8}, down: {"a_bits": 4}})  # pins compose: the earlier clip stays
    assert raised.for_linear(up) == replace(pinned.for_linear(up), a_bits=8)
    assert raised.for_linear(down) == replace(pinned.for_linear(down), a_bits=4, a_clip=0.75)
    with pytest.raises(ValueError, match="unknown settings"):
        pinned.pin({up: {"kv_bits": 8}})
