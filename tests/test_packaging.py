"""asaf_fx is the only top-level import name, in a built wheel and in the editable install."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("import asaf_fx, asaf_fx.passes, asaf_fx.triton_kernels.hadamard, asaf_fx.triton_kernels.ops; "
         "print(asaf_fx.passes.__file__)")


def run_python(code: str, cwd: Path, env_path: str | None = None) -> str:
    env = {"PATH": "/usr/bin:/bin"}
    if env_path:
        env["PYTHONPATH"] = env_path
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Build from a copy: setuptools writes build/ and *.egg-info beside the sources it builds.
    source = tmp_path_factory.mktemp("source") / "asaf-fx"
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", "runs", ".pytest_cache")
    shutil.copytree(ROOT, source, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("asaf_fx-*.whl")
    return path


def test_wheel_has_one_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"asaf_fx"}
    # Every source module must reach the wheel under its installed name (pyproject lists packages).
    installed = {"asaf_fx": "asaf_fx", "passes": "asaf_fx/passes", "triton_kernels": "asaf_fx/triton_kernels"}
    for folder, target in installed.items():
        for source in (ROOT / folder).rglob("*.py"):
            assert f"{target}/{source.relative_to(ROOT / folder).as_posix()}" in names, source
    # The embedded WikiText-2 and its attribution travel with the package.
    for data in ("text/README.md", "text/wikitext-2/wiki.valid.tokens.gz", "text/wikitext-2-raw/wiki.test.raw.gz"):
        assert f"asaf_fx/{data}" in names


def test_regular_install_imports(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    where = run_python(PROBE, cwd=tmp_path, env_path=str(site))
    assert Path(where) == site / "asaf_fx" / "passes" / "__init__.py"


def test_editable_install_imports_from_the_repo(tmp_path):
    where = run_python(PROBE, cwd=tmp_path)
    assert Path(where) == ROOT / "passes" / "__init__.py"
