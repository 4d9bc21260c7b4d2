"""Acceptance on tiny random models: rotation-only compile preserves logits and greedy decoding."""

import pytest
import torch

import asaf_fx
from asaf_fx.compile import UnsupportedArchitectureError
from asaf_fx.passes.capture import UnsupportedModelError

HADAMARD = torch.ops.asaf_fx.hadamard_rotate.default
ROTATE = asaf_fx.QuantConfig(w_bits=16, a_bits=16, kv_bits=16, rotate=True, seed=0)


@pytest.fixture(scope="module")
def compiled(tiny_models):
    return {arch: asaf_fx.compile(model, quant=ROTATE, max_cache_len=64) for arch, model in tiny_models.items()}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_rotation_only_compile_preserves_logits(arch, compiled, tiny_models, h):
    cm, model = compiled[arch], tiny_models[arch]
    for shape in [(2, 11), (1, 1), (3, 37)]:  # dynamic batch and length
        ids = torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            ref = model(ids).logits
        assert h.rel_err(cm(ids).logits, ref) <= 1e-3
    layers = model.config.num_hidden_layers
    # q, k, o_proj and down_proj inputs in each layer, and two around a tied lm_head's norm scale
    tied = 2 if model.config.tie_word_embeddings else 0
    assert sum(n.target is HADAMARD for n in cm.graph.graph.nodes) == 4 * layers + tied


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_greedy_decoding_matches_transformers_generate(arch, compiled, tiny_models, h):
    model = tiny_models[arch]
    prompt = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), h.single_thread():
        ref = model.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
        ours = compiled[arch].generate(prompt, max_new_tokens=32, eos_token_id=[])
    assert ours.shape == (1, 39)
    assert torch.equal(ours, ref)


def test_orthogonal_rotation_option(tiny_models, h):
    model = tiny_models["qwen2"]
    cm = asaf_fx.compile(model, quant=asaf_fx.QuantConfig(rotation="orthogonal", seed=1))
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    assert h.rel_err(cm(ids).logits, model(ids).logits) <= 1e-3


def test_compile_leaves_the_model_unchanged(tiny_models):
    model = tiny_models["llama"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    asaf_fx.compile(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied


def test_not_a_causal_lm(h):
    from transformers import LlamaConfig, LlamaModel

    with pytest.raises(UnsupportedModelError, match="not a causal LM"):
        asaf_fx.compile(LlamaModel(LlamaConfig(**h.tiny)))
    with pytest.raises(UnsupportedModelError, match="expected a transformers causal LM"):
        asaf_fx.compile("llama")


def test_meta_device_model(h):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**h.tiny))
    with pytest.raises(UnsupportedModelError, match="meta device"):
        asaf_fx.compile(model)


def test_gpt2_is_an_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32)).eval()
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel is not a supported.*layer_norm"):
        asaf_fx.compile(model)


def test_generate_checks_its_inputs(compiled, tiny_models):
    cm = compiled["mistral"]
    with pytest.raises(ValueError, match=r"at most max_batch=1 \(compile with max_batch=2\)"):
        cm.generate(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds the KV cache of 64"):
        cm.generate(torch.zeros(1, 40, dtype=torch.long), max_new_tokens=32)
    with pytest.raises(ValueError, match="left padding"):
        cm.generate(torch.zeros(1, 3, dtype=torch.long), torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="shape of input_ids"):
        cm(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 4))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        cm.generate(torch.zeros(1, 3, dtype=torch.long), do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="context of 128 positions"):
        asaf_fx.compile(tiny_models["llama"], max_cache_len=129)
