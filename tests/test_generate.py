"""Serving through the one graph: prefill into the cache, ragged batches, sampling, streaming, the cache's size."""

import pytest
import torch

import asaf_fx
from asaf_fx.sampling import Sampling

W4A4 = asaf_fx.QuantConfig(w_bits=4, a_bits=4, kv_bits=4, w_method="rtn", w_clip_search=False, a_clip=0.9)


@pytest.fixture(scope="module")
def served(tiny_models):
    """W4A4KV4 RTN models (per-token activations and KV codes: where padding could leak between rows)."""
    return {arch: asaf_fx.compile(model, quant=W4A4, max_batch=4, max_cache_len=128, backend=None)
            for arch, model in tiny_models.items()}


def _left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return ids, mask


def _rows(lengths, vocab=256, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_ragged_batch_rows_equal_each_row_alone(arch, served, h):
    cm = served[arch]
    rows = _rows((5, 37, 1, 20))
    ids, mask = _left_padded(rows)
    with h.single_thread():
        together = cm.generate(ids, mask, max_new_tokens=12, eos_token_id=[])
        logits = cm(ids, mask).logits
        for i, row in enumerate(rows):
            alone = cm.generate(row[None], max_new_tokens=12, eos_token_id=[])
            assert torch.equal(together[i, ids.shape[1]:], alone[0, len(row):]), f"row {i}"
            assert h.rel_err(logits[i, ids.shape[1] - len(row):], cm(row[None]).logits[0]) <= 1e-5


def test_prefill_writes_the_cache_the_decode_steps_read(served, h):
    """generate's first token comes from one prefill call; each next one from a step over the cache,
    equal to scoring the whole sequence so far."""
    cm = served["llama"]
    prompt = _rows((9,))[0][None]
    with h.single_thread():
        out = cm.generate(prompt, max_new_tokens=6, eos_token_id=[])
        full = cm(out[:, :-1]).logits.argmax(-1)
    assert torch.equal(out[0, 9:], full[0, 8:])


def test_eos_ends_a_row_and_pads_it(served):
    cm = served["mistral"]
    rows = _rows((4, 6), seed=8)
    ids, mask = _left_padded(rows)
    free = cm.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    eos = int(free[0, ids.shape[1] + 2])  # row 0's third new token ends row 0
    out = cm.generate(ids, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    new = out[0, ids.shape[1]:]
    first = int((new == eos).nonzero()[0])
    assert first <= 2 and torch.all(new[first + 1:] == 0)
    assert out.shape[1] <= ids.shape[1] + 8


def test_sampling_follows_torch_global_seed_and_its_filters(served):
    cm = served["qwen2"]
    prompt = _rows((6,), seed=4)[0][None]
    torch.manual_seed(11)
    a = cm.generate(prompt, max_new_tokens=10, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, eos_token_id=[])
    torch.manual_seed(11)
    b = cm.generate(prompt, max_new_tokens=10, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, eos_token_id=[])
    assert torch.equal(a, b)
    greedy = cm.generate(prompt, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(cm.generate(prompt, max_new_tokens=10, do_sample=True, top_k=1, eos_token_id=[]), greedy)


def test_sampler_draws_what_transformers_draws():
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(0)) * 3
    theirs = LogitsProcessorList([TemperatureLogitsWarper(0.8), TopKLogitsWarper(40), TopPLogitsWarper(0.85)])
    ours = Sampling(True, 0.8, 40, 0.85)
    assert torch.equal(ours.filtered(logits), theirs(None, logits.clone()))
    torch.manual_seed(5)
    drawn = torch.multinomial(theirs(None, logits.clone()).softmax(-1), 1).squeeze(1)
    torch.manual_seed(5)
    assert torch.equal(ours.next_tokens(logits), drawn)


def test_streamer_gets_the_prompt_then_each_token(served):
    cm = served["llama"]
    prompt = _rows((5,))[0][None]
    got = []

    class Streamer:
        def put(self, ids):
            got.append(ids.clone())

        def end(self):
            got.append("end")

    out = cm.generate(prompt, max_new_tokens=4, eos_token_id=[], streamer=Streamer())
    assert torch.equal(got[0], prompt) and got[-1] == "end"
    assert torch.equal(torch.stack(got[1:-1], dim=1), out[:, 5:])


def test_transformers_iterator_streamer_yields_the_text(served):
    from transformers import TextIteratorStreamer

    class Tokenizer:  # enough of a tokenizer for the streamer: ids as text
        def decode(self, ids, **kwargs):
            return "".join(f"<{int(i)}>" for i in ids)

    cm = served["llama"]
    prompt = _rows((5,))[0][None]
    streamer = TextIteratorStreamer(Tokenizer(), skip_prompt=True)
    out = cm.generate(prompt, max_new_tokens=4, eos_token_id=[], streamer=streamer)
    assert "".join(streamer) == "".join(f"<{int(i)}>" for i in out[0, 5:])


def test_batch_and_cache_are_chosen_at_call_time(tiny_models, tmp_path, h):
    """One compile serves every batch up to max_batch; a checkpoint is loaded with its own cache length."""
    cm = asaf_fx.compile(tiny_models["llama"], quant=W4A4, max_batch=3, max_cache_len=40, backend=None)
    rows = _rows((4, 4, 4), seed=2)
    three = torch.stack(rows)
    with h.single_thread():
        out3 = cm.generate(three, max_new_tokens=5, eos_token_id=[])
        out1 = cm.generate(three[1:2], max_new_tokens=5, eos_token_id=[])
    assert torch.equal(out3[1], out1[0])
    asaf_fx.save(cm, tmp_path / "ckpt")
    longer = asaf_fx.load(tmp_path / "ckpt", max_cache_len=128)
    assert longer.max_cache_len == 128 and longer.max_batch == 1
    long = longer.generate(three[:1], max_new_tokens=100, eos_token_id=[])
    assert long.shape == (1, 104) and torch.equal(long[:, :9], out3[:1])
    with pytest.raises(ValueError, match="exceeds the KV cache of 40"):
        asaf_fx.load(tmp_path / "ckpt", max_cache_len=40).generate(three[:1], max_new_tokens=100)


def test_decode_steps_equal_scoring(served, h):
    cm = served["qwen2"]
    ids = _rows((6,), seed=9)[0][None]
    step = cm.decode_steps(1, 16)
    logits = torch.cat([step(ids[:, i:i + 1], i) for i in range(6)], dim=1)
    assert h.rel_err(logits, cm(ids).logits) <= 1e-5


def test_compile_exports_once(tiny_models, monkeypatch):
    calls = []
    export = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: calls.append(1) or export(*a, **k))
    asaf_fx.compile(tiny_models["mistral"], quant=W4A4)
    assert len(calls) == 1
