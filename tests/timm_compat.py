"""Import timm on a CPU-only torch (used by the accelerate tests and benchmarks).

``make install`` writes a ``.pth`` file so that plain ``import timm`` works in the project's
environment (see ``jepa_engine/integrations/torchvision_cpu.py``: PyPI's torchvision is a CUDA build whose
import fails against the CPU torch). Importing that module here installs the same hook for an
environment set up without it. Nothing here ever runs a torchvision op.
"""
from __future__ import annotations

import importlib
import importlib.util

import jepa_engine.integrations.torchvision_cpu  # noqa: F401  (installs the import hook)


def import_timm():
    """The ``timm`` module, or None when timm (or torchvision) is not installed."""
    if importlib.util.find_spec("torchvision") is None or importlib.util.find_spec("timm") is None:
        return None
    return importlib.import_module("timm")
