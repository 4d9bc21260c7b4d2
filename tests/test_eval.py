"""Perplexity on a text file and lm-eval on a local task (asaf_fx.evaluate)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import asaf_fx
from asaf_fx.data import perplexity, read_joined, token_windows
from asaf_fx.evaluate import run_lm_eval, text_perplexity

LINES = [f"Line {i}: the quick brown fox jumps over {i % 7} lazy dogs." for i in range(40)]
DOCS = [  # the tiny local multiple-choice task; `label` indexes `choices`
    {"question": "2 + 2 =", "choices": ["4", "5", "22"], "label": 0},
    {"question": "The sky is", "choices": ["blue", "green"], "label": 0},
    {"question": "Cats say", "choices": ["woof", "meow"], "label": 1},
    {"question": "Ice is", "choices": ["hot", "cold", "loud"], "label": 1},
]


@pytest.fixture(scope="module")
def tokenizer():
    """Byte-level tokenizer with exactly 256 tokens (the tiny models' vocab), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # lm-eval needs an EOS token; "Ā" is the byte-level symbol of byte 0, which no test text contains.
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="Ā")


@pytest.fixture(scope="module")
def tiny(h):
    return h.make_tiny("llama", seed=3)


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "text.raw"
    path.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A task folder as a user would write one: a YAML task reading a local JSONL file (absolute path)."""
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS), encoding="utf-8")
    (folder / "tiny_mc.yaml").write_text(f"""\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {folder / "hf_datasets_cache"}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""", encoding="utf-8")
    return folder


# --- perplexity ---


def test_text_perplexity_equals_the_data_functions(tiny, tokenizer, text_file):
    got = text_perplexity(tiny, tokenizer, text_file, seq_len=32, windows=3)
    windows = token_windows(tokenizer, read_joined(text_file), 32, 3)
    assert got == {"file": str(text_file), "seq_len": 32, "windows": 3,
                   "perplexity": perplexity(lambda ids: tiny(ids).logits, windows)}
    # Independently of asaf_fx.data: the first 3 × 32 tokens of the blank-line-joined text.
    ids = tokenizer("\n\n".join(LINES)).input_ids
    batch = torch.tensor(ids[:96]).view(3, 32)
    with torch.no_grad():
        logits = tiny(batch).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), batch[:, 1:].reshape(-1))
    assert got["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_text_perplexity_takes_every_whole_window_by_default(tiny, tokenizer, text_file):
    n_tokens = len(tokenizer(read_joined(text_file)).input_ids)
    assert text_perplexity(tiny, tokenizer, text_file, seq_len=100)["windows"] == n_tokens // 100


def test_text_perplexity_errors_name_the_file_and_the_fix(tiny, tokenizer, tmp_path, text_file):
    with pytest.raises(FileNotFoundError, match=r"missing\.txt does not exist"):
        text_perplexity(tiny, tokenizer, tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.txt is empty"):
        text_perplexity(tiny, tokenizer, empty)
    with pytest.raises(ValueError, match=r"text\.raw: .*asked for 1000.*fewer windows"):
        text_perplexity(tiny, tokenizer, text_file, seq_len=32, windows=1000)
    with pytest.raises(ValueError, match=r"shorter than one window of 100000 tokens"):
        text_perplexity(tiny, tokenizer, text_file, seq_len=100000)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8"):
        text_perplexity(tiny, tokenizer, latin1)


# --- lm-eval ---


def test_local_task_runs_and_rotation_preserves_every_loglikelihood(tiny, tokenizer, task_dir):
    compiled = asaf_fx.compile(tiny, decode=False)
    fp = run_lm_eval(tiny, tokenizer, ["tiny_mc"], include_path=task_dir, log_samples=True)
    rot = run_lm_eval(compiled, tokenizer, ["tiny_mc"], include_path=task_dir, log_samples=True)
    for result in (fp, rot):
        metrics = result["tasks"]["tiny_mc"]
        assert 0.0 <= metrics["acc"] <= 1.0 and metrics["n"] == len(DOCS)
        assert result["seed"] == 0 and result["lm_eval_version"].startswith("0.4")
    assert fp["tasks"]["tiny_mc"]["acc"] == rot["tasks"]["tiny_mc"]["acc"]
    fp_docs, rot_docs = fp["samples"]["tiny_mc"], rot["samples"]["tiny_mc"]
    assert [d["doc_id"] for d in fp_docs] == [d["doc_id"] for d in rot_docs] == list(range(len(DOCS)))
    for a, b, doc in zip(fp_docs, rot_docs, DOCS):
        assert len(a["resps"]) == len(doc["choices"])  # one (loglikelihood, is_greedy) per choice
        assert [ll for ll, _ in b["resps"]] == pytest.approx([ll for ll, _ in a["resps"]], rel=1e-4, abs=1e-4)
        assert a["metrics"]["acc"] == b["metrics"]["acc"]


def test_lm_eval_errors_are_clear(tiny, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="no lm-eval tasks"):
        run_lm_eval(tiny, tokenizer, [])
    with pytest.raises(FileNotFoundError, match="not a directory of lm-eval task YAML"):
        run_lm_eval(tiny, tokenizer, ["tiny_mc"], include_path=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="limit=0"):
        run_lm_eval(tiny, tokenizer, ["tiny_mc"], limit=0)
