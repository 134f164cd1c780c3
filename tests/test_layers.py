"""The layering contract: import-linter's contracts in pyproject.toml hold, and a planted back-arrow breaks them.

import-linter (via grimp) reads every import statement of every module, those inside functions
included, so a cycle cannot hide in a deferred import.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

ROOT = Path(__file__).resolve().parents[1]


def _lint(tree: Path, config: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the packages under ``tree`` (first on sys.path), with ``config``."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(config)!r}, no_cache=True, no_logo=True))")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=300)


def _copy_tree(dst: Path) -> Path:
    """The engine as an importable tree without the editable install's mapping: ``kernels/`` placed
    at ``jepa_engine/kernels`` (where it is imported from), and ``benches/``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "results")
    shutil.copytree(ROOT / "jepa_engine", dst / "jepa_engine", ignore=ignore)
    shutil.copytree(ROOT / "kernels", dst / "jepa_engine" / "kernels", ignore=ignore)
    shutil.copytree(ROOT / "benches", dst / "benches", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return _copy_tree(tmp_path_factory.mktemp("layers"))


def test_contracts_hold(tree):
    run = _lint(tree, tree / "pyproject.toml")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "broken" not in run.stdout.lower().replace("0 broken", ""), run.stdout[-4000:]


@pytest.mark.parametrize("module, back_arrow", [
    # A deferred import inside a function, from the lowest engine layer up to the experiment.
    ("profiling/meters.py", "def _planted():\n    from jepa_engine.comparison import run  # noqa\n"),
    # The kernels reaching into the engine.
    ("kernels/_launch.py", "def _planted():\n    import jepa_engine.models  # noqa\n"),
    # Planning reaching up to the evaluation loop.
    ("planning/base.py", "from jepa_engine.evaluation import mpc  # noqa\n"),
])
def test_planted_back_arrow_breaks_the_contract(tmp_path, module, back_arrow):
    planted = _copy_tree(tmp_path)
    path = planted / "jepa_engine" / module
    path.write_text(path.read_text() + "\n\n" + back_arrow)
    run = _lint(planted, planted / "pyproject.toml")
    assert run.returncode != 0, f"a back-arrow in {module} went unnoticed:\n{run.stdout[-3000:]}"
    assert "BROKEN" in run.stdout.upper(), run.stdout[-3000:]
