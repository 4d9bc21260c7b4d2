"""English text that every Python installation has: the standard library's docstrings.

The pipeline calibrates on WikiText-2 validation and evaluates on WikiText-2 test when the shared
data folder is there; a fresh machine without it (and without a dataset hub) still needs two
disjoint texts. Docstrings of two disjoint sets of standard-library modules serve: about 35 000
SmolLM2 tokens each (Python 3.11), technical English rather than encyclopedia prose, so the
perplexities are not comparable with WikiText-2 ones. They depend on the Python version, which is
why the files are written next to the results they produced.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Sequence
from pathlib import Path

from asaf_fx._atomic import write_text_atomic

CALIBRATION_MODULES = ("argparse", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib",
                       "email.message", "enum", "fractions", "functools", "heapq", "inspect", "ipaddress", "itertools",
                       "json", "logging")
EVALUATION_MODULES = ("pathlib", "random", "re", "shutil", "statistics", "string", "subprocess", "tarfile", "textwrap",
                      "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile", "configparser", "gettext",
                      "http.client")


def stdlib_docstrings(modules: Sequence[str]) -> str:
    """Each module's docstring, then those of its public classes (and their methods) and functions, sorted by name."""
    docs = []
    with warnings.catch_warnings():  # some namespaces (typing.re) warn when their docstring is read
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in modules:
            docs += _module_docstrings(importlib.import_module(name))
    return "\n".join(doc for doc in docs if doc) + "\n"


def _module_docstrings(module) -> list[str | None]:
    docs = [inspect.getdoc(module)]
    for attribute, obj in sorted(vars(module).items()):
        if attribute.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue  # private, or imported from elsewhere (documented there, if at all)
        docs.append(inspect.getdoc(obj) if inspect.isfunction(obj) or inspect.isclass(obj) else None)
        if inspect.isclass(obj):
            docs += [inspect.getdoc(method) for name, method in sorted(vars(obj).items())
                     if not name.startswith("_") and inspect.isfunction(method)]
    return docs


def offline_texts(directory: Path) -> tuple[Path, Path]:
    """Write (atomically) and return ``directory``'s calibration and evaluation texts."""
    calibration, evaluation = directory / "offline-calibration.txt", directory / "offline-evaluation.txt"
    write_text_atomic(calibration, stdlib_docstrings(CALIBRATION_MODULES))
    write_text_atomic(evaluation, stdlib_docstrings(EVALUATION_MODULES))
    return calibration, evaluation
