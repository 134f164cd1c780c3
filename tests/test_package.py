"""Packaging: the import is light, kernels resolve as jepa_engine.kernels, the CLI answers."""
from __future__ import annotations

import os
import subprocess
import sys


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
