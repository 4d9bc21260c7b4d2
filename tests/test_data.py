import math

import pytest
import torch

from asaf_fx.data import data_dir, perplexity, read_joined, token_windows
from asaf_fx.models import load_model


class _CharTokenizer:
    def __call__(self, text, return_tensors=None):
        class Out:
            input_ids = torch.tensor([[ord(c) for c in text]])
        return Out()


def test_read_joined_follows_the_data_readme(tmp_path):
    path = tmp_path / "t.raw"
    path.write_bytes(b" = Title = \r\n first line \r\nsecond\r\n")
    assert read_joined(path) == " = Title = \n\n first line \n\nsecond"


def test_token_windows_cut_without_overlap():
    w = token_windows(_CharTokenizer(), "abcdefghij", seq_len=3)
    assert w.tolist() == [[97, 98, 99], [100, 101, 102], [103, 104, 105]]
    with pytest.raises(ValueError, match="only 3 windows of 3"):
        token_windows(_CharTokenizer(), "abcdefghij", seq_len=3, n_windows=4)


def test_perplexity_of_uniform_logits_is_the_vocab_size():
    windows = torch.randint(0, 50, (3, 17))
    assert perplexity(lambda ids: torch.zeros(*ids.shape, 50), windows, batch_size=2) == pytest.approx(50)


def test_perplexity_of_a_perfect_model_is_one():
    windows = torch.randint(0, 10, (2, 9))

    def oracle(ids):
        logits = torch.full((*ids.shape, 10), -1e4)
        logits[:, :-1].scatter_(-1, ids[:, 1:, None], 0.0)
        return logits

    assert math.isclose(perplexity(oracle, windows), 1.0)


def test_data_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("ASAF_FX_DATA", str(tmp_path))
    assert data_dir() == tmp_path


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a known model"):
        load_model(tmp_path / "missing")
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf"):
        load_model(bad)
