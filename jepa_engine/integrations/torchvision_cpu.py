"""``import timm`` on the CPU build of torch.

timm imports torchvision. PyPI's torchvision for Linux x86-64 is a CUDA build: with the CPU torch its
C extension cannot load, and its Python part then registers fake kernels for ``torchvision::nms`` /
``qnms`` without checking that the extension loaded, so ``import torchvision`` fails with "operator
torchvision::nms does not exist". Declaring those two schemas first lets it import (every other part
of torchvision that timm uses is Python; the ops themselves stay unavailable, as they are anyway).

``make install`` writes a ``.pth`` file into the environment (``python -m jepa_engine.integrations.torchvision_cpu
--install``) that imports this module at start-up. Importing it installs a one-shot import hook that
acts only when torchvision is first imported, only with a CPU torch, and only when torchvision's
extension fails to load: nothing else changes, and nothing is imported before that.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

PTH_NAME = "jepa_engine_torchvision_cpu.pth"


def declare_missing_ops(package_dir: str) -> bool:
    """Load torchvision's extension from ``package_dir``, or declare the two schemas its import needs
    when it cannot load against this torch. Returns whether schemas were declared."""
    import glob
    import os

    import torch

    if torch.version.cuda is not None:  # a CUDA torch loads torchvision's own extension
        return False
    try:
        torch.ops.load_library(glob.glob(os.path.join(package_dir, "_C*.so"))[0])
        return False
    except (IndexError, OSError):
        pass
    declared = False
    for op in ("nms", "qnms"):
        try:
            getattr(torch.ops.torchvision, op)
        except (AttributeError, RuntimeError):
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            declared = True
    return declared


class _TorchvisionHook(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the loader of the spec the other finders give for
    ``torchvision`` so the schemas are declared just before torchvision's ``__init__`` runs, and
    removes itself once that has happened (``importlib.util.find_spec`` alone changes nothing)."""

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        if spec is None or spec.loader is None or not spec.submodule_search_locations:
            return spec
        exec_module = spec.loader.exec_module
        package_dir = list(spec.submodule_search_locations)[0]
        hook = self

        def exec_with_ops(module):
            if hook in sys.meta_path:
                sys.meta_path.remove(hook)
            declare_missing_ops(package_dir)
            exec_module(module)

        spec.loader.exec_module = exec_with_ops
        return spec


def install_hook() -> None:
    """Install the import hook (no-op once torchvision is imported or the hook is in place)."""
    if "torchvision" in sys.modules or any(isinstance(f, _TorchvisionHook) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionHook())


def write_pth() -> str:
    """Write the ``.pth`` file that installs the hook at interpreter start-up; returns its path."""
    import os
    import sysconfig

    path = os.path.join(sysconfig.get_paths()["purelib"], PTH_NAME)
    with open(path + ".tmp", "w") as f:
        f.write("import jepa_engine.integrations.torchvision_cpu\n")
    os.replace(path + ".tmp", path)
    return path


install_hook()

if __name__ == "__main__":
    if sys.argv[1:] != ["--install"]:
        sys.exit("usage: python -m jepa_engine.integrations.torchvision_cpu --install")
    print(f"wrote {write_pth()}")
