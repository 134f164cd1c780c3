"""jepa_engine: fused Triton kernels and a minimal, fast JEPA world-model engine.

``import jepa_engine`` is light: submodules (and torch/triton) load on first use.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = {"kernels"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"jepa_engine.{name}")
    raise AttributeError(f"module 'jepa_engine' has no attribute {name!r}")
