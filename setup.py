"""setuptools drives CMake for the native operator library ``jepa_engine/_C.so`` (CMakeLists.txt, csrc/).

The library links the libtorch of the torch it is built against, so it is built only where the build
can import that torch: ``pip install --no-build-isolation .`` (or ``pip wheel``) in an environment that
has torch builds it into the wheel; under pip's default build isolation torch is not there (and pip must
not pull one: PyPI's default torch is the multi-GB CUDA build), so the wheel goes without it and the
package runs its Python path, as it does when cmake or a C++ compiler is missing or the build fails.
``make native`` builds the same library (and the C++ runner) into the source tree for an editable install.
``JEPA_ENGINE_CMAKE_ARGS`` passes more ``-D`` options to CMake, ``JEPA_ENGINE_BUILD_JOBS`` the parallel jobs;
``JEPA_ENGINE_BUILD_NATIVE=0`` builds no library.

The wheel is tagged ``py3-none-<platform>``: the library is the machine's code but calls no Python API.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

try:  # setuptools >= 70.1; before it, the wheel package's
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:
    try:
        from wheel.bdist_wheel import bdist_wheel
    except ImportError:
        bdist_wheel = None

ROOT = Path(__file__).resolve().parent
NO_LIBRARY = "jepa_engine/_C.so is not built and every op runs its Python path"


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build the CMake target ``jepa_engine_ops`` into the extension's place."""

    def run(self):
        for ext in self.extensions:
            self.build_extension(ext)

    def get_ext_filename(self, fullname):  # CMake names it _C.so, and kernels/_native.py looks for that
        return os.path.join(*fullname.split(".")) + ".so"

    def get_outputs(self):  # only what was built: a skipped library is not in the wheel's record
        return [p for p in super().get_outputs() if os.path.exists(p)]

    def build_extension(self, ext):
        why = self._why_not_built()
        if why:
            print(f"native: {why}; {NO_LIBRARY}", file=sys.stderr)
            return
        import torch

        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        tree = Path(self.build_temp).resolve() / "native"
        configure = ["cmake", "-S", str(ROOT), "-B", str(tree), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DJEPA_ENGINE_LIB_DIR={out.parent}",
                     "-DJEPA_ENGINE_RUNNER=OFF", *shlex.split(os.environ.get("JEPA_ENGINE_CMAKE_ARGS", ""))]
        jobs = os.environ.get("JEPA_ENGINE_BUILD_JOBS", str(os.cpu_count() or 1))
        compile_ = ["cmake", "--build", str(tree), "--target", "jepa_engine_ops", "-j", jobs]
        for cmd in (configure, compile_):
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                print((run.stdout + run.stderr)[-3000:], file=sys.stderr)
                print(f"native: {shlex.join(cmd[:2])} failed; {NO_LIBRARY}", file=sys.stderr)
                return  # (a _C.so there is `make native`'s, copied as package data)
        print(f"native: built {out} against torch {torch.__version__}", file=sys.stderr)

    @staticmethod
    def _why_not_built() -> str:
        if os.environ.get("JEPA_ENGINE_BUILD_NATIVE", "1") == "0":
            return "JEPA_ENGINE_BUILD_NATIVE=0"
        try:
            import torch  # noqa: F401
        except ImportError:
            return "torch is not importable in the build environment (build with --no-build-isolation)"
        if shutil.which("cmake") is None:
            return "cmake not found"
        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None:
            return f"no C++ compiler ({cxx}) found"
        return ""


commands = {"build_ext": CMakeBuild}
if bdist_wheel is not None:
    class Wheel(bdist_wheel):
        def get_tag(self):
            _, _, platform = super().get_tag()
            return "py3", "none", platform

    commands["bdist_wheel"] = Wheel

setup(ext_modules=[CMakeExtension("jepa_engine._C")], cmdclass=commands)
