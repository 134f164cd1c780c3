"""The native operator library ``jepa_engine/_C.so`` (built by ``make native`` from csrc/ with CMake).

When present it is loaded once, at import, with ``torch.ops.load_library``: its ``TORCH_LIBRARY``
block defines the schemas of the ops listed in :data:`NATIVE_OPS` and registers their C++ CPU
kernels; each op's module then registers onto the same schema what belongs in Python (the Triton CUDA
kernel and the fake kernel for shape inference and export). When absent (no compiler when the package
was installed), or when ``JEPA_ENGINE_NATIVE=0`` asks to skip it, every op runs its Python path, as
before: :func:`status` says which, and why.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from ._launch import forced_backend, interpreting

# The ops whose schema and CPU kernel the native library provides (namespace ``jepa_engine``).
NATIVE_OPS = ("sample_actions", "elite_refit")
ENV = "JEPA_ENGINE_NATIVE"

_loaded: bool = False
_reason: str = ""


def _candidates() -> list[Path]:
    """Where the library may be: ``JEPA_ENGINE_NATIVE=/path/to/_C.so``, else in the ``jepa_engine``
    package folder, found from this folder in both layouts: the repository (``kernels/`` next to
    ``jepa_engine/``) and an installed package (``jepa_engine/kernels/``)."""
    env = os.environ.get(ENV, "")
    if env not in ("", "0", "1"):
        return [Path(env)]
    here = Path(__file__).resolve().parent
    return [here.parent / "jepa_engine" / "_C.so", here.parent / "_C.so"]


def _load() -> None:
    global _loaded, _reason
    if os.environ.get(ENV, "") == "0":
        _reason = f"{ENV}=0: the native library is not loaded"
        return
    for path in _candidates():
        if path.is_file():
            try:
                torch.ops.load_library(str(path))
            except (OSError, RuntimeError) as e:   # built against another torch, or a broken build
                _reason = f"{path} could not be loaded ({type(e).__name__}: {e}); rebuild it with `make native`"
                return
            _loaded, _reason = True, f"loaded from {path}"
            return
    _reason = "jepa_engine/_C.so is not built (`make native` builds it; it needs cmake and a C++ compiler)"


def available() -> bool:
    """Whether the native library is loaded in this process (its schemas and CPU kernels exist)."""
    return _loaded


def status() -> str:
    """Why the native library is, or is not, loaded."""
    return _reason


def cpu_kernel_runs(*tensors) -> bool:
    """Whether an op given these arguments runs its C++ CPU kernel: all are CPU tensors, and neither
    the Triton interpreter (``TRITON_INTERPRET=1``) nor ``use_backend`` claims the call (``"reference"``
    forces the Python reference, the specification the C++ kernels are tested against)."""
    return (all(type(t) is torch.Tensor and t.is_cpu for t in tensors) and forced_backend() is None
            and not interpreting())


def schema(op: str) -> Optional[str]:
    """The qualified name ``jepa_engine::<op>`` when the native library defines ``op``, else None."""
    return f"jepa_engine::{op}" if _loaded and op in NATIVE_OPS else None


_load()
