"""Import timm on a CPU-only torch (used by the accelerate tests and benchmarks).

timm imports torchvision at import time. The torchvision wheel built for our torch (0.28 for torch
2.13) is a CUDA build whose C extension cannot load against the CPU torch; its Python part then works,
except that it registers fake kernels for ``torchvision::nms``/``qnms`` without checking that the
extension loaded ("operator torchvision::nms does not exist"). Declaring those two schemas first lets
it import. Nothing here ever runs a torchvision op.
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import os

import torch


def import_timm():
    """The ``timm`` module, or None when timm (or torchvision) is not installed."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or importlib.util.find_spec("timm") is None:
        return None
    if spec.origin:
        libs = glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so"))
        try:
            torch.ops.load_library(libs[0])
        except (IndexError, OSError):
            for op in ("nms", "qnms"):
                try:
                    getattr(torch.ops.torchvision, op)
                except (AttributeError, RuntimeError):
                    torch.library.define(f"torchvision::{op}",
                                         "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return importlib.import_module("timm")
