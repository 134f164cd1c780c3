"""The native operator library ``jepa_engine/_C.so`` (built by ``make native`` from csrc/ with CMake).

When present it is loaded once, at import, with ``torch.ops.load_library``: its ``TORCH_LIBRARY``
blocks define the schemas of the ops it holds (:func:`native_ops`, read from the loaded library) and
register their C++ CPU kernels; each op's module then registers onto the same schema what belongs in
Python (the Triton CUDA kernel, the fake kernel for shape inference and export, autograd). When absent
(no compiler when the package was installed), or when ``JEPA_ENGINE_NATIVE=0`` asks to skip it, the
ops' modules define the same schemas from Python with their Python CPU kernels: :func:`status` says
which, and why.

:class:`Op` is that registration, written once for every op: the schema (checked equal to the C++
one, or defined here), the Python kernel for CUDA tensors (and CPU tensors without the library), the
fake kernel and the autograd formula. Calling it runs the dispatcher, except on CPU tensors that the
Triton interpreter or ``use_backend`` claims while the C++ kernel holds the CPU key: those run the
Python kernel under the same autograd formula, so the Triton kernels stay testable on CPU.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import torch

from ._launch import forced_backend, interpreting

# Every op the native library defines (namespace ``jepa_engine``): its schema and its C++ CPU kernel.
# :func:`native_ops` gives those the loaded library holds (a library built from part of csrc/ holds fewer).
NATIVE_OPS = ("sample_actions", "elite_refit", "masked_attention", "latent_loss", "latent_cost", "fused_linear",
              "linear_goal_cost", "ema_update_")
ENV = "JEPA_ENGINE_NATIVE"

_loaded: bool = False
_reason: str = ""
_ops: frozenset = frozenset()


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
    global _loaded, _reason, _ops
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
            _ops = frozenset(op for op in NATIVE_OPS if _has_cpu_kernel(op))
            _loaded, _reason = True, f"loaded from {path}"
            return
    _reason = "jepa_engine/_C.so is not built (`make native` builds it; it needs cmake and a C++ compiler)"


def _has_cpu_kernel(op: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"jepa_engine::{op}", "CPU")
    except RuntimeError:   # not defined by this build of the library
        return False


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


def native_ops() -> frozenset:
    """The ops whose schema and CPU kernel the loaded native library defines (empty without it)."""
    return _ops if _loaded else frozenset()


def schema(op: str) -> Optional[str]:
    """The qualified name ``jepa_engine::<op>`` when the native library defines ``op``, else None."""
    return f"jepa_engine::{op}" if op in native_ops() else None


_load()

# The Python side of the namespace: what the ops' modules define and register from Python.
_LIB = torch.library.Library("jepa_engine", "FRAGMENT")


class Op:
    """One op of the ``jepa_engine`` namespace, registered once (see the module docstring).

    Args:
        name: the op's name (``jepa_engine::<name>``).
        schema: its schema without the namespace, as csrc/ defines it (``"f(Tensor x, float eps) -> Tensor"``).
        kernel: the Python kernel: registered for CUDA tensors always, and for CPU tensors when the
            native library does not define the op (it picks the Triton kernel or the reference itself).
        fake: the fake (meta) kernel: output shapes for tracing, export and ``torch.compile``.
        backward, setup_context: the autograd formula (``torch.library.register_autograd``), or None
            for an inference-only op.
    """

    def __init__(self, name: str, schema: str, kernel: Callable, fake: Callable, *,
                 backward: Optional[Callable] = None, setup_context: Optional[Callable] = None):
        self.name, self.qualname, self.kernel = name, f"jepa_engine::{name}", kernel
        self.native = name in native_ops()
        parsed = torch._C.parse_schema(f"jepa_engine::{schema}")
        if self.native:
            have = torch.ops.jepa_engine.__getattr__(name).default._schema
            if str(have) != str(parsed):
                raise RuntimeError(f"{self.qualname}: the native library's schema {have} differs from the Python "
                                   f"package's {parsed}; rebuild it with `make native`")
        else:
            _LIB.define(schema)
            torch.library.register_kernel(self.qualname, "cpu", kernel, lib=_LIB)
        torch.library.register_kernel(self.qualname, "cuda", kernel, lib=_LIB)
        torch.library.register_fake(self.qualname, fake, lib=_LIB)
        if backward is not None:
            torch.library.register_autograd(self.qualname, backward, setup_context=setup_context, lib=_LIB)
        self.op = torch.ops.jepa_engine.__getattr__(name).default
        self._python_path = _python_path(name, kernel, backward, setup_context)

    def python_claims(self, tensors) -> bool:
        """Whether a call on these tensors runs the Python kernel though the C++ kernel holds the CPU
        key: CPU tensors claimed by the Triton interpreter or by ``use_backend``, outside tracing."""
        return (self.native and (interpreting() or forced_backend() is not None)
                and not torch.compiler.is_compiling()
                and any(isinstance(t, torch.Tensor) and t.is_cpu for t in tensors))

    def __call__(self, *args):
        if self.python_claims(args):
            return self._python_path(*args)
        return self.op(*args)


def _python_path(name: str, kernel: Callable, backward: Optional[Callable], setup_context: Optional[Callable]):
    """``kernel`` under the op's autograd formula, as an ``autograd.Function`` (no formula: the kernel)."""
    if backward is None:
        return kernel

    def forward(ctx, *args):
        out = kernel(*args)
        setup_context(ctx, args, out)
        return out

    fn = type(f"{name}_python_path", (torch.autograd.Function,),
              {"forward": staticmethod(forward), "backward": staticmethod(backward)})
    return fn.apply
