"""Packaging: the import is light, kernels resolve as jepa_engine.kernels, the CLI answers."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path


def _python(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                          cwd="/").stdout


def test_import_is_light():
    out = _python("import sys, jepa_engine; print(sorted(m for m in ('torch', 'triton', 'pynvml') if m in sys.modules))")
    assert out.strip() == "[]"


def test_kernels_resolve_from_any_directory():
    out = _python("import jepa_engine.kernels as k; print(k.__file__)")
    assert out.strip().endswith(os.path.join("kernels", "__init__.py"))


def test_cli_help():
    proc = subprocess.run([sys.executable, "-m", "jepa_engine", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "demo" in proc.stdout


def test_selfcheck_passes_for_every_op(capsys):
    from jepa_engine import selfcheck

    assert selfcheck.run() == 0
    out = capsys.readouterr().out
    for name in selfcheck.CHECKS:   # every kernel check's line ends "ok" (the native line has its own)
        line = next((ln for ln in out.splitlines() if ln.strip().startswith(name)), None)
        assert line is not None and line.rstrip().endswith(" ok"), (name, out)


def test_wheel_carries_the_native_library(tmp_path):
    """A wheel (and so a non-editable install) carries jepa_engine/_C.so as package data, and the installed
    layout looks for it there. The tree is copied with a stand-in _C.so (a file that is not a library):
    the wheel holds it, and the unpacked wheel's kernels/_native.py tries to load that very file."""
    root, src = Path(__file__).resolve().parents[1], tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.so")
    for name in ("jepa_engine", "kernels"):
        shutil.copytree(root / name, src / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    (src / "jepa_engine" / "_C.so").write_bytes(b"not a library")
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
           "--disable-pip-version-check"]
    build = subprocess.run(pip + [str(src), "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("jepa_engine-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    assert {"jepa_engine/_C.so", "jepa_engine/kernels/_native.py", "jepa_engine/cli.py"} <= names
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "JEPA_ENGINE_NATIVE")}
    env["PYTHONPATH"] = str(tmp_path / "site")
    run = subprocess.run([sys.executable, "-c", "from jepa_engine.kernels import _native as n; print(n.__file__); "
                          "print(n.status())"], capture_output=True, text=True, env=env, cwd="/", timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    where, status = run.stdout.strip().splitlines()[-2:]
    site = tmp_path / "site" / "jepa_engine"
    assert where == str(site / "kernels" / "_native.py")
    assert status.startswith(f"{site / '_C.so'} could not be loaded"), status
