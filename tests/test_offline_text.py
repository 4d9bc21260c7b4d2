"""The offline texts: disjoint, reproducible, long enough for the pipeline's default windows."""

from asaf_fx.offline_text import CALIBRATION_MODULES, EVALUATION_MODULES, offline_texts, stdlib_docstrings


def test_the_two_texts_come_from_disjoint_modules():
    assert not set(CALIBRATION_MODULES) & set(EVALUATION_MODULES)


def test_offline_texts_are_reproducible_and_long_enough(tmp_path):
    calibration, evaluation = offline_texts(tmp_path)
    first = calibration.read_text(encoding="utf-8"), evaluation.read_text(encoding="utf-8")
    offline_texts(tmp_path)
    assert (calibration.read_text(encoding="utf-8"), evaluation.read_text(encoding="utf-8")) == first
    # the pipeline's defaults need 2 × 8 × 256 calibration and 4 × 2048 evaluation tokens; SmolLM2
    # averages about 4 characters per token on English, and the texts have over 100 000 characters
    assert all(len(text) > 100_000 for text in first)
    assert first[0] != first[1] and not list(tmp_path.glob(".*.tmp"))


def test_docstrings_are_those_of_the_modules_named():
    text = stdlib_docstrings(["json"])
    assert text.startswith("JSON (JavaScript Object Notation)") and "Serialize ``obj``" in text
