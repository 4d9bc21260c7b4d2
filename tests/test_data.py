import gzip
import math

import pytest
import torch

from asaf_fx.data import (
    EMBEDDED,
    calibration_windows,
    check_windows,
    data_dir,
    perplexity,
    read_joined,
    text_sha256,
    token_windows,
    wikitext2_test_path,
    wikitext2_valid_path,
)
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


def test_check_windows_share_no_token_with_the_calibration_draw(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("".join(chr(0x100 + i) for i in range(400)), encoding="utf-8")  # a token is its position
    drawn = set(calibration_windows(_CharTokenizer(), path, 6, 10, seed=3).flatten().tolist())
    checks = check_windows(_CharTokenizer(), path, 3, 40, avoid=(6, 10, 3))
    assert checks.shape == (3, 40)
    assert not drawn & set(checks.flatten().tolist())
    starts = [int(w[0]) - 0x100 for w in checks]
    assert all(start % 40 == 0 for start in starts) and starts == sorted(starts)
    free = [s for s in range(0, 400, 40) if not drawn & set(range(0x100 + s, 0x100 + s + 40))]
    assert starts == free[-3:]  # the last free windows, in text order
    assert torch.equal(check_windows(_CharTokenizer(), path, None, 40, avoid=(6, 10, 3)),
                       torch.stack([torch.arange(0x100 + s, 0x100 + s + 40) for s in free]))
    with pytest.raises(ValueError, match=f"has {len(free)} windows of 40 tokens outside the calibration"):
        check_windows(_CharTokenizer(), path, len(free) + 1, 40, avoid=(6, 10, 3))


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
    monkeypatch.delenv("ASAF_FX_DATA")
    assert data_dir() == EMBEDDED


# sha256 of the two files as published in WikiText-2 (shared/data/README.md; asaf_fx/text/README.md)
TEST_SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"
VALID_SHA256 = "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"


def test_the_embedded_wikitext2_is_the_published_text(monkeypatch):
    monkeypatch.delenv("ASAF_FX_DATA", raising=False)
    test, valid = wikitext2_test_path(), wikitext2_valid_path()
    assert test == EMBEDDED / "wikitext-2-raw" / "wiki.test.raw.gz" and valid.name == "wiki.valid.tokens.gz"
    assert text_sha256(test) == TEST_SHA256 and text_sha256(valid) == VALID_SHA256
    assert read_joined(test).startswith(" = Robert Boulter = \n\n")


def test_a_plain_file_is_preferred_and_reads_like_its_gzip_copy(tmp_path):
    folder = tmp_path / "wikitext-2-raw"
    folder.mkdir()
    body = b" = T = \r\n a \r\nb\r\n"
    (folder / "wiki.test.raw.gz").write_bytes(gzip.compress(body, mtime=0))
    assert wikitext2_test_path(tmp_path) == folder / "wiki.test.raw.gz"
    assert read_joined(folder / "wiki.test.raw.gz") == " = T = \n\n a \n\nb"
    (folder / "wiki.test.raw").write_bytes(body)
    assert wikitext2_test_path(tmp_path) == folder / "wiki.test.raw"
    assert text_sha256(folder / "wiki.test.raw") == text_sha256(folder / "wiki.test.raw.gz")


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a known model"):
        load_model(tmp_path / "missing")
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf"):
        load_model(bad)
