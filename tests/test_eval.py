"""Perplexity on a text file, lm-eval on a local task, and the python -m asaf_fx eval CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import asaf_fx
from asaf_fx.cli.eval import main
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
def tokenizer(h):
    return h.byte_tokenizer()


@pytest.fixture(scope="module")
def tiny(h):
    return h.make_tiny("llama", seed=3)


@pytest.fixture(scope="module")
def model_dir(tiny, tokenizer, tmp_path_factory) -> Path:
    """The tiny model and tokenizer saved as a transformers directory (what --model PATH loads)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


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
    (folder / "tiny_gen.jsonl").write_text("".join(json.dumps({"prompt": d["question"], "answer": d["choices"][0]})
                                                   + "\n" for d in DOCS), encoding="utf-8")
    (folder / "tiny_gen.yaml").write_text(f"""\
task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "tiny_gen.jsonl"}
  cache_dir: {folder / "hf_datasets_cache"}
output_type: generate_until
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: answer
generation_kwargs:
  until: ["e", "\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
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
    compiled = asaf_fx.compile(tiny)
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


def test_generate_until_task_runs_on_the_compiled_model_as_on_transformers(tiny, tokenizer, task_dir):
    """Greedy generations of a rotation-only model, with the task's stop strings, equal the original's."""
    compiled = asaf_fx.compile(tiny, max_batch=2)
    fp = run_lm_eval(tiny, tokenizer, ["tiny_gen"], include_path=task_dir, log_samples=True, batch_size=2)
    rot = run_lm_eval(compiled, tokenizer, ["tiny_gen"], include_path=task_dir, log_samples=True, batch_size=2)
    ours = [d["resps"] for d in rot["samples"]["tiny_gen"]]
    assert ours == [d["resps"] for d in fp["samples"]["tiny_gen"]]
    assert len(ours) == len(DOCS) and any(r[0][0] for r in ours)  # something was generated
    assert all("e" not in r[0][0] and "\n" not in r[0][0] for r in ours)  # cut at the stop strings
    assert rot["tasks"]["tiny_gen"]["exact_match"] == fp["tasks"]["tiny_gen"]["exact_match"]
    with pytest.raises(ValueError, match="max_batch=2"):
        run_lm_eval(asaf_fx.compile(tiny), tokenizer, ["tiny_gen"], include_path=task_dir, batch_size=2)


def test_lm_eval_errors_are_clear(tiny, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="no lm-eval tasks"):
        run_lm_eval(tiny, tokenizer, [])
    with pytest.raises(FileNotFoundError, match="not a directory of lm-eval task YAML"):
        run_lm_eval(tiny, tokenizer, ["tiny_mc"], include_path=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="limit=0"):
        run_lm_eval(tiny, tokenizer, ["tiny_mc"], limit=0)


# --- CLI ---


def test_cli_errors_exit_2_with_the_problem_and_the_fix(tmp_path, text_file, capsys):
    assert main(["--model", "smollm2", "--text", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt does not exist; pass an existing UTF-8 text file" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    assert main(["--model", "smollm2", "--text", str(empty)]) == 2
    assert "empty.txt is empty" in capsys.readouterr().err
    assert main(["--model", "no-such-model", "--text", str(text_file)]) == 2
    assert "'no-such-model' is neither a known model (smollm2) nor an existing path" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "smollm2", "--limit", "3"])
    assert exit_info.value.code == 2
    assert "add --tasks" in capsys.readouterr().err


def test_cli_bad_input_prints_no_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "asaf_fx", "eval", "--model", "smollm2", "--text", str(tmp_path / "x.txt")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "x.txt does not exist" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_cli_on_a_saved_model_rotated_with_a_local_task(tiny, tokenizer, model_dir, text_file, task_dir, tmp_path,
                                                        capsys):
    out = tmp_path / "results" / "eval.json"
    argv = ["--model", str(model_dir), "--rotate", "--text", str(text_file), "--seq-len", "32", "--windows", "2",
            "--tasks", "tiny_mc", "--include-path", str(task_dir), "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert json.loads(out.read_text(encoding="utf-8")) == report
    assert report["schema"] == "asaf_fx.eval/1" and report["rotate"] is True
    assert report["perplexity"]["windows"] == 2 and report["perplexity"]["seq_len"] == 32
    # Rotation preserves the function, so the rotated CLI run matches the unrotated model.
    expected = text_perplexity(tiny, tokenizer, text_file, seq_len=32, windows=2)["perplexity"]
    assert report["perplexity"]["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert 0.0 <= report["lm_eval"]["tasks"]["tiny_mc"]["acc"] <= 1.0
    assert "tiny_mc" in captured.err and "perplexity (2×32)" in captured.err  # the rich table on stderr


def test_cli_unknown_task_names_where_it_looked(model_dir, task_dir, capsys):
    # Slow part: the task is not under --include-path, so lm-eval's built-in index is built (~13 s).
    assert main(["--model", str(model_dir), "--tasks", "tiny_mc,no_such_task", "--include-path", str(task_dir)]) == 2
    err = capsys.readouterr().err
    assert "unknown lm-eval task(s) no_such_task" in err and str(task_dir) in err
    assert "write a task YAML and pass its folder" in err


@pytest.mark.real_model
def test_cli_smollm2_wikitext2_perplexity(smollm2, wikitext2_test, monkeypatch, capsys):
    # The session's SmolLM2 stands in for the CLI's own load (same load_model("smollm2") call).
    monkeypatch.setattr("asaf_fx.cli.eval.load_model", lambda name: smollm2 if name == "smollm2" else None)
    text = wikitext2_test
    assert main(["--model", "smollm2", "--text", str(text), "--windows", "1", "--seq-len", "512"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["perplexity"]["windows"] == 1 and report["perplexity"]["seq_len"] == 512
    assert 10 < report["perplexity"]["perplexity"] < 60


def test_cli_on_a_model_dir_written_by_asaf_fx_save(tiny, tokenizer, text_file, tmp_path, capsys):
    compiled = asaf_fx.compile(tiny, quant=asaf_fx.QuantConfig(w_bits=4, a_bits=8, w_method="rtn"))
    folder = tmp_path / "saved"
    asaf_fx.save(compiled, folder, tokenizer=tokenizer)
    assert main([str(folder), "--text", str(text_file), "--seq-len", "32", "--windows", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == str(folder) and report["rotate"] is False
    # the reloaded model is bit-identical, so the perplexity is exactly the compiled model's
    expected = text_perplexity(compiled, tokenizer, text_file, seq_len=32, windows=2)["perplexity"]
    assert report["perplexity"]["perplexity"] == expected
    bare = tmp_path / "no-tokenizer"
    asaf_fx.save(compiled, bare)
    assert main([str(bare), "--text", str(text_file)]) == 2
    assert (
        "holds no tokenizer; save one beside the model with asaf_fx.save(model, dir, tokenizer="
        in capsys.readouterr().err
    )
    assert main([str(tmp_path / "nothing"), "--text", str(text_file)]) == 2
    assert "is not a directory; pass the directory asaf_fx.save wrote" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["somewhere", "--model", "smollm2"], "give either MODEL_DIR"),
    ([], "give either MODEL_DIR"),
    (["somewhere", "--rotate"], "--rotate applies to --model"),
])
def test_cli_takes_model_dir_or_model(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
