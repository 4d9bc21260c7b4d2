"""Acceptance on SmolLM2-135M-Instruct (real weights): perplexity and greedy decoding under rotation."""

import logging
import os

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


# FP perplexity of the dequantized GGUF: 19.4436 measured here (torch 2.13, transformers 5.23), 19.44 in
# the issue. The rotated model is evaluated every run; the FP model's 8 windows (~2 min on 2 cores)
# only with ASAF_FX_FULL_EVAL=1, to keep the suite in budget. FP vs rotated logits are compared
# on one window every run.
FP_PPL = 19.44


@pytest.fixture(scope="module")
def windows(smollm2, shared_data):
    tokenizer = smollm2[1]
    return token_windows(tokenizer, read_joined(shared_data / "wikitext-2-raw" / "wiki.test.raw"), 2048, 8)


def test_structure_found(smollm2, rotated):
    config = smollm2[0].config
    assert (config.hidden_size, config.num_hidden_layers, config.tie_word_embeddings) == (576, 30, True)
    for gm in (rotated.forward_graph, rotated.decode_graph):
        assert sum(n.target is HADAMARD for n in gm.graph.nodes) == 3 * 30
        assert gm.meta["asaf_fx"]["rotations"][0]["width"] == 576


def test_rotated_logits_match_fp_on_a_window(smollm2, rotated, windows, h):
    with torch.no_grad():
        ref = smollm2[0](windows[:1]).logits
    assert h.rel_err(rotated(windows[:1]).logits, ref) <= 1e-3


def test_perplexity_unchanged_by_rotation(smollm2, rotated, windows):
    rot = perplexity(lambda ids: rotated(ids).logits, windows)
    if os.environ.get("ASAF_FX_FULL_EVAL") == "1":
        fp = perplexity(lambda ids: smollm2[0](ids).logits, windows)
        assert 19.3 < fp < 19.6
    else:
        fp = FP_PPL
    log.info("SmolLM2 WikiText-2 PPL (8 x 2048): FP %.4f, rotated %.4f", fp, rot)
    assert f"{rot:.4g}" == f"{fp:.4g}"


def test_greedy_decoding_matches_transformers(smollm2, rotated):
    model, tokenizer = smollm2
    prompt = tokenizer("The three primary colours are", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=32, do_sample=False)
    ours = rotated.generate(prompt, max_new_tokens=32)
    assert torch.equal(ours, ref), (tokenizer.decode(ours[0]), tokenizer.decode(ref[0]))
