"""The dependency rules of the layout (docs/design.md), read from the import statements."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPED = ("asaf_fx.passes", "asaf_fx.triton_kernels")


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` statement in ``path`` names, at any depth."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", ["passes", "triton_kernels"])
def test_passes_and_kernels_import_nothing_from_the_library_above_them(folder):
    wrong = {f"{path.relative_to(ROOT)}: {name}" for path in sources(folder) for name in imported_modules(path)
             if (name == "asaf_fx" or name.startswith("asaf_fx.")) and not name.startswith(MAPPED)}
    assert not wrong, "passes/ and triton_kernels/ may import only asaf_fx.passes and asaf_fx.triton_kernels"


def test_the_library_does_not_import_its_command_line_layer():
    wrong = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in sources("asaf_fx")
        if "cli" not in path.relative_to(ROOT / "asaf_fx").parts[:1]
        and path.name not in ("__main__.py", "calibrate.py")
        for name in imported_modules(path)
        if name.startswith("asaf_fx.cli")
    }
    assert not wrong


def test_no_command_imports_another_command():
    from asaf_fx.__main__ import COMMANDS

    commands = set(COMMANDS)
    for path in sources("asaf_fx/cli"):
        others = {name for name in imported_modules(path) for command in commands - {path.stem}
                  if name == f"asaf_fx.cli.{command}" or name.startswith(f"asaf_fx.cli.{command}.")}
        assert not others, f"{path.name} imports {sorted(others)}; shared argument code belongs in cli/arguments.py"


def test_the_rules_see_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nfrom asaf_fx.config import QuantConfig\n\ndef f():\n    import asaf_fx.cli.run\n")
    assert {"asaf_fx.config", "asaf_fx.config.QuantConfig", "asaf_fx.cli.run"} <= imported_modules(bad)
