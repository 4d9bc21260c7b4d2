"""asaf_fx.compile with quantization: bit widths, overrides, shared weights, backends, bad input."""

import pytest
import torch

import asaf_fx
from asaf_fx.config import QuantConfig
from asaf_fx.inspection import layers

CALIBRATION = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def w4a4(tiny_models):
    quant = QuantConfig(w_bits=4, a_bits=4, kv_bits=4, w_method="gptq")
    return asaf_fx.compile(tiny_models["mistral"], quant=quant, calibration=CALIBRATION, max_cache_len=32)


def test_w8a8kv8_stays_close_and_w4a4kv4_does_not_break(tiny_models, tiny_ids, w4a4, h):
    model = tiny_models["mistral"]
    ref = model(tiny_ids).logits
    w8 = asaf_fx.compile(model, quant=QuantConfig(w_bits=8, a_bits=8, kv_bits=8))
    err8, err4 = h.rel_err(w8(tiny_ids).logits, ref), h.rel_err(w4a4(tiny_ids).logits, ref)
    assert 0 < err8 < 0.02 and err8 < err4 < 0.5


def test_decoding_agrees_with_scoring(w4a4, tiny_ids):
    int4 = [t for name, t in w4a4.graph.named_buffers() if name.endswith("_int4")]
    assert len(int4) == 2 * 4  # q/k/v and gate/up stacked
    out = w4a4.generate(tiny_ids[:1, :4], max_new_tokens=4)
    for step in range(4, 8):  # the KV cache quantizes exactly as the full-sequence graph does
        assert w4a4(out[:, :step]).logits[0, -1].argmax() == out[0, step]


def test_inspect_reports_bits_and_bytes(w4a4):
    infos = layers(w4a4.graph)
    layer = next(i for i in infos if i.name == "0")
    assert {(lin.w_bits, lin.a_bits) for lin in layer.linears} == {(4, 4)}
    down = layer.linears[-1]
    assert (down.out_features, down.in_features) == (96, 160)
    assert down.weight_bytes == 96 * 80 + 96 * 4  # packed nibbles + one float32 scale per row
    head = infos[-1].linears[0]
    assert (head.w_bits, head.a_bits) == (None, 16)


def test_overrides_by_weight_name(tiny_models):
    quant = QuantConfig(w_bits=4, a_bits=8, overrides={"model.layers.1.*": {"w_bits": 8, "a_bits": 16},
                                                       "*.down_proj.weight": {"a_bits": 4}})
    cm = asaf_fx.compile(tiny_models["llama"], quant=quant)
    infos = {i.name: i for i in layers(cm.graph)}
    first = {name: (lin.w_bits, lin.a_bits)
             for lin in infos["0"].linears for name in lin.weight.split(".")[-2].split("+")}
    assert first == {"q_proj": (4, 8), "k_proj": (4, 8), "v_proj": (4, 8), "o_proj": (4, 8),
                     "gate_proj": (4, 8), "up_proj": (4, 8), "down_proj": (4, 4)}
    assert {(lin.w_bits, lin.a_bits) for lin in infos["1"].linears} == {(None, 16)}  # 8-bit weights stay float


def test_an_override_that_matches_no_weight_names_the_closest(tiny_models):
    quant = QuantConfig(w_bits=4, a_bits=8, overrides={"*.down_proj": {"a_bits": 4}})  # no ".weight"
    with pytest.raises(ValueError, match=r"overrides\['\*\.down_proj'\] matches no decoder linear weight.*"
                                         r"names look like model\.layers\.\d\.mlp\.down_proj\.weight"):
        asaf_fx.compile(tiny_models["llama"], quant=quant)


def test_torch_compile_backend_runs_the_same_graph(tiny_models, tiny_ids, h):
    quant = QuantConfig(w_bits=4, a_bits=8)
    eager = asaf_fx.compile(tiny_models["qwen2"], quant=quant, backend=None)
    traced = asaf_fx.compile(tiny_models["qwen2"], quant=quant, backend="aot_eager")
    assert traced.backend == "aot_eager" and eager.backend is None
    assert h.rel_err(traced(tiny_ids).logits, eager(tiny_ids).logits) < 1e-5


@pytest.mark.parametrize("kwargs, error, match", [
    ({"quant": QuantConfig(w_bits=4, w_method="gptq")}, ValueError, "GPTQ needs calibration data"),
    ({"calibration": torch.zeros(0, 8, dtype=torch.long)}, ValueError, "calibration data is empty"),
    ({"calibration": []}, ValueError, "calibration data is empty"),
    ({"calibration": torch.zeros(1, 129, dtype=torch.long)}, ValueError, "exceed the model's context of 128"),
    ({"calibration": torch.zeros(1, 8)}, TypeError, "2-D LongTensor"),
    ({"calibration": "wiki.valid.tokens"}, TypeError, "calibration\\[0\\] must be a 2-D LongTensor"),
    ({"quant": {"w_bits": 4}}, TypeError, "quant must be an asaf_fx.QuantConfig"),
])
def test_bad_input(tiny_models, kwargs, error, match):
    with pytest.raises(error, match=match):
        asaf_fx.compile(tiny_models["llama"], **kwargs)


def test_eval_and_device_work_like_a_module(w4a4):
    assert w4a4.eval() is w4a4 and not w4a4.training
    assert w4a4.device == torch.device("cpu")


@pytest.mark.parametrize("clip_search", [True, False])
def test_w_clip_search_reaches_the_weight_quantizer(captured, monkeypatch, clip_search):
    import importlib

    compile_module = importlib.import_module("asaf_fx.compile")  # the attribute asaf_fx.compile is the function
    seen = []
    monkeypatch.setattr(
        compile_module,
        "quantize_decoder_weights",
        lambda gm, specs, calibration, on_stats=None, before_layer=None: seen.extend(specs) or [None] * len(specs),
    )
    compile_module.linear_lowerings(captured("llama"), QuantConfig(w_bits=4, w_clip_search=clip_search), None)
    assert len(seen) == 14 and {s.w_clip_search for s in seen} == {clip_search}
