"""jepa_engine: fused Triton kernels and a minimal, fast JEPA world-model engine.

``import jepa_engine`` is light: submodules (and torch/triton) load on first use.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = {"kernels"}
# Public names re-exported lazily: name -> submodule that defines it.
_LAZY_ATTRS = {"EMA": "training.ema", "accelerate": "integrations.accelerate",
               "restore": "integrations.accelerate", "stats": "integrations.accelerate"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"jepa_engine.{name}")
    if name in _LAZY_ATTRS:
        return getattr(importlib.import_module(f"jepa_engine.{_LAZY_ATTRS[name]}"), name)
    raise AttributeError(f"module 'jepa_engine' has no attribute {name!r}")
