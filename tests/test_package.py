"""Packaging: the import is light, kernels resolve as jepa_engine.kernels, the CLI answers."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest


def _python(code: str, **env: str | None) -> str:
    """stdout of ``python -c code`` from ``/``, without TRITON_INTERPRET; ``env`` sets variables (None: unsets)."""
    run_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run_env.update({k: v for k, v in env.items() if v is not None})
    for k in [k for k, v in env.items() if v is None]:
        run_env.pop(k, None)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=run_env, cwd="/",
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


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


ROOT = Path(__file__).resolve().parents[1]
TOOLS = [t for t in ("cmake", os.environ.get("CXX", "c++")) if shutil.which(t) is None]
# The fewest sources that make a loadable library (ops.cpp defines the planning ops' schemas): the build tests' time.
TWO_SOURCES = "-DJEPA_ENGINE_SOURCES=csrc/ops.cpp;csrc/planning_kernels.cpp"


def _wheel(tmp_path: Path, stand_in: bool, **env: str) -> tuple[str, set[str], str]:
    """Build a wheel of a copy of the tree as a user's ``pip wheel --no-build-isolation .`` does, with the
    venv's torch importable, unpack it and ask its kernels/_native.py what it loaded. Returns the wheel's
    file name, its entries and the loader's status line."""
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.so")
    for name in ("jepa_engine", "kernels", "csrc"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    for name in ("pyproject.toml", "README.md", "setup.py", "CMakeLists.txt"):
        shutil.copy(ROOT / name, src / name)
    if stand_in:
        (src / "jepa_engine" / "_C.so").write_bytes(b"not a library")
    (src / "kernels" / "configs").mkdir(exist_ok=True)   # a tuned launch-config file travels as package data
    (src / "kernels" / "configs" / "some-gpu.json").write_text('{"format": 1, "kernels": {}}')
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
           "--disable-pip-version-check"]
    build = subprocess.run(pip + [str(src), "-w", str(tmp_path / "dist")], capture_output=True, text=True,
                           timeout=300, env=dict(os.environ, **env))
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("jepa_engine-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    out = _python("from jepa_engine.kernels import _native as n; print(n.__file__); print(n.status())",
                  JEPA_ENGINE_NATIVE=None, PYTHONPATH=str(tmp_path / "site"))
    where, status = out.strip().splitlines()[-2:]
    assert where == str(tmp_path / "site" / "jepa_engine" / "kernels" / "_native.py")
    return wheel.name, names, status


def test_wheel_carries_the_native_library(tmp_path):
    """A wheel (and so a non-editable install) carries a jepa_engine/_C.so that `make native` built as
    package data, and the installed layout looks for it there. The tree is copied with a stand-in _C.so
    (a file that is not a library), and setup.py's own build fails (CMake is given a source that is not
    there): the wheel is still built, it holds the stand-in, and the unpacked wheel's kernels/_native.py
    tries to load that very file."""
    name, names, status = _wheel(tmp_path, stand_in=True, JEPA_ENGINE_CMAKE_ARGS="-DJEPA_ENGINE_SOURCES=csrc/none.cpp")
    assert {"jepa_engine/_C.so", "jepa_engine/kernels/_native.py", "jepa_engine/cli.py",
            "jepa_engine/kernels/configs/some-gpu.json"} <= names
    assert status.startswith(f"{tmp_path / 'site' / 'jepa_engine' / '_C.so'} could not be loaded"), status
    # machine code inside: a platform wheel (it calls no Python API: any Python 3)
    assert name.startswith("jepa_engine-") and name.endswith("-py3-none-linux_x86_64.whl"), name


@pytest.mark.skipif(bool(TOOLS), reason=f"no {' or '.join(TOOLS)} on PATH to build the native library")
def test_wheel_build_drives_cmake_for_the_native_library(tmp_path):
    """setup.py builds _C.so with CMake against the build environment's torch: the wheel carries a library
    that loads and defines its ops. (Two of the sources, for time: JEPA_ENGINE_CMAKE_ARGS reaches CMake.)"""
    name, names, status = _wheel(tmp_path, stand_in=False, JEPA_ENGINE_CMAKE_ARGS=f"'{TWO_SOURCES}'")
    assert "jepa_engine/_C.so" in names and name.endswith("-py3-none-linux_x86_64.whl"), (name, sorted(names)[:5])
    assert status == f"loaded from {tmp_path / 'site' / 'jepa_engine' / '_C.so'}", status
    code = ("import torch, jepa_engine.kernels._native as n; assert n.available(); "
            "print(sorted(n.native_ops()), torch._C._dispatch_has_kernel_for_dispatch_key("
            "'jepa_engine::sample_actions', 'CPU'))")
    out = _python(code, JEPA_ENGINE_NATIVE=None, PYTHONPATH=str(tmp_path / "site"))
    assert out.split() == ["['elite_refit',", "'sample_actions']", "True"], out


@pytest.mark.skipif(bool(TOOLS), reason=f"no {' or '.join(TOOLS)} on PATH to build the native library")
def test_cmake_links_a_cuda_torch_without_its_toolkit(tmp_path):
    """A CUDA build of torch whose TorchConfig.cmake stops for want of a CUDA toolkit (what a pip CUDA torch
    does on a machine without the CUDA runtime headers): CMakeLists.txt links the wheel's CPU libraries
    directly, and the library loads. Simulated with this torch's files and a TorchConfig.cmake that stops."""
    import torch

    real = Path(torch.__file__).parent
    fake = tmp_path / "torch"
    (fake / "share" / "cmake" / "Torch").mkdir(parents=True)
    (fake / "share" / "cmake" / "Torch" / "TorchConfig.cmake").write_text(
        'message(FATAL_ERROR "Your installed Caffe2 version uses CUDA but I cannot find the CUDA libraries.")\n')
    (fake / "include").symlink_to(real / "include")
    (fake / "lib").mkdir()
    for lib in (real / "lib").iterdir():
        (fake / "lib" / lib.name).symlink_to(lib)
    (fake / "lib" / "libtorch_cuda.so").write_bytes(b"")        # what makes it a CUDA build
    out = tmp_path / "out"
    configure = ["cmake", "-S", str(ROOT), "-B", str(tmp_path / "build"), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={fake / 'share' / 'cmake'}", f"-DJEPA_ENGINE_LIB_DIR={out}",
                 "-DJEPA_ENGINE_RUNNER=OFF", TWO_SOURCES]
    run = subprocess.run(configure, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert "TorchConfig.cmake cannot find: linking its CPU libraries" in run.stdout, run.stdout[-2000:]
    build = subprocess.run(["cmake", "--build", str(tmp_path / "build"), "-j2", "--target", "jepa_engine_ops"],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, (build.stdout + build.stderr)[-3000:]
    got = _python("import jepa_engine.kernels._native as n; print(n.available(), sorted(n.native_ops()))",
                  JEPA_ENGINE_NATIVE=str(out / "_C.so"))
    assert got.split() == ["True", "['elite_refit',", "'sample_actions']"], got
