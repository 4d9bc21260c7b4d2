"""Acceptance on SmolLM2-135M-Instruct (real weights): perplexity and greedy decoding under rotation."""

import logging

import pytest
import torch

import asaf_fx
from asaf_fx.data import perplexity, read_joined, token_windows

pytestmark = pytest.mark.real_model
log = logging.getLogger(__name__)
HADAMARD = torch.ops.asaf_fx.hadamard_rotate.default


@pytest.fixture(scope="module")
def rotated(smollm2):
    model, _ = smollm2
    return asaf_fx.compile(model, quant=asaf_fx.QuantConfig(w_bits=16, a_bits=16, kv_bits=16, rotate=True, seed=0),
                           max_cache_len=128)


@pytest.fixture(scope="module")
def windows(smollm2, wikitext2_test):
    tokenizer = smollm2[1]
    return token_windows(tokenizer, read_joined(wikitext2_test), 2048, 8)


def test_structure_found(smollm2, rotated):
    config = smollm2[0].config
    assert (config.hidden_size, config.num_hidden_layers, config.tie_word_embeddings) == (576, 30, True)
    gm = rotated.graph
    # q, k, o_proj and down_proj inputs, and two around the tied lm_head's norm scale
    assert sum(n.target is HADAMARD for n in gm.graph.nodes) == 4 * 30 + 2
    assert gm.meta["asaf_fx"]["rotations"][0]["width"] == 576


def test_rotated_logits_match_fp(smollm2, rotated, windows, h):
    ids = windows[:1, :512]
    with torch.no_grad():
        ref = smollm2[0](ids).logits
    assert h.rel_err(rotated(ids).logits, ref) <= 1e-3


@pytest.fixture(scope="module")
def fp_ppl(smollm2, windows):
    return perplexity(lambda ids: smollm2[0](ids).logits, windows)


def test_perplexity_unchanged_by_rotation(rotated, windows, fp_ppl):
    # Both measured in the same run (about 2 min each on 2 cores): the acceptance is "unchanged
    # to 4 significant digits", which a constant cannot stand in for. FP is ≈ 19.44 (19.4436 here).
    rot = perplexity(lambda ids: rotated(ids).logits, windows)
    fp = fp_ppl
    assert 19.3 < fp < 19.6
    log.info("SmolLM2 WikiText-2 PPL (8 x 2048): FP %.4f, rotated %.4f", fp, rot)
    assert f"{rot:.4g}" == f"{fp:.4g}"


def test_greedy_decoding_matches_transformers(smollm2, rotated, h):
    model, tokenizer = smollm2
    prompt = tokenizer("The three primary colours are", return_tensors="pt").input_ids
    with torch.no_grad(), h.single_thread():
        ref = model.generate(prompt, max_new_tokens=64, do_sample=False)
        ours = rotated.generate(prompt, max_new_tokens=64)
    assert ours.shape[1] == prompt.shape[1] + 64  # no early EOS: all 64 tokens compared
    assert torch.equal(ours, ref), (tokenizer.decode(ours[0]), tokenizer.decode(ref[0]))


def test_a_ragged_batch_gives_each_prompt_what_transformers_gives_it_alone(smollm2, h):
    model, tokenizer = smollm2
    prompts = ["Paris is the capital of", "Water boils at a temperature of one hundred degrees",
               "The largest planet in the solar system is"]
    cm = asaf_fx.compile(model, max_batch=3, max_cache_len=64)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # a session-wide tokenizer: put it back
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    with torch.no_grad(), h.single_thread():
        ours = cm.generate(batch.input_ids, batch.attention_mask, max_new_tokens=24, eos_token_id=[])
        for i, text in enumerate(prompts):
            ids = tokenizer(text, return_tensors="pt").input_ids
            ref = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
            assert torch.equal(ours[i, batch.input_ids.shape[1]:], ref[0, ids.shape[1]:]), text


def test_w4a8kv8_gptq_with_a_plan_and_its_checkpoint(smollm2, windows, fp_ppl, tmp_path, h):
    """The main job's default setting with two layers pruned: perplexity within bounds on 2 windows,
    and the saved checkpoint computes the same logits and tokens bit for bit."""
    from asaf_fx.data import calibration_windows, wikitext2_valid_path
    from asaf_fx.inspection import model_totals

    model, tokenizer = smollm2
    plan = asaf_fx.Plan((asaf_fx.Group(0, 12, 0.0), asaf_fx.Group(12, 14, 0.1), asaf_fx.Group(14, 30, 0.0)),
                        flops=1.0, dense_flops=1.0, predicted_degradation=0.0, max_degradation=0.0, method="test")
    quant = asaf_fx.QuantConfig(w_bits=4, a_bits=8, kv_bits=8, w_method="gptq")
    calibration = calibration_windows(tokenizer, wikitext2_valid_path(), n_windows=8, seq_len=256, seed=0)
    cm = asaf_fx.compile(model, plan, quant=quant, calibration=calibration)
    totals = model_totals(cm)
    assert 0.005 < 1 - totals["flops"] / totals["dense_flops"] < 0.01  # 2 of 30 layers, ~10 % of their MLP
    two = windows[:2]
    ppl = perplexity(lambda ids: cm(ids).logits, two)
    fp2 = perplexity(lambda ids: model(ids).logits, two)
    log.info("SmolLM2 2 x 2048: FP %.4f, W4A8KV8 GPTQ with 2 layers at 10 %% %.4f", fp2, ppl)
    assert 1.02 * fp2 < ppl < 1.4 * fp2
    asaf_fx.save(cm, tmp_path / "ckpt", tokenizer=tokenizer)
    loaded = asaf_fx.load(tmp_path / "ckpt")
    prompt = tokenizer("The three primary colours are", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(two[:1, :512]).logits, cm(two[:1, :512]).logits)
        assert torch.equal(loaded.generate(prompt, max_new_tokens=16), cm.generate(prompt, max_new_tokens=16))


def test_w8a8kv8_rtn_within_one_percent_of_fp(smollm2, windows, fp_ppl):
    quant = asaf_fx.QuantConfig(w_bits=8, a_bits=8, kv_bits=8, w_method="rtn")
    cm = asaf_fx.compile(smollm2[0], quant=quant)
    ppl = perplexity(lambda ids: cm(ids).logits, windows)
    log.info("SmolLM2 WikiText-2 PPL (8 x 2048): W8A8KV8 rotated RTN %.4f (FP %.4f, %.4fx)", ppl, fp_ppl, ppl / fp_ppl)
    assert fp_ppl < ppl <= 1.01 * fp_ppl
