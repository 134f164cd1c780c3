"""Installing and removing a patch on a module instance: the patched ``forward`` (a bound method that
TorchScript reads as the class's forward), its pickling / deepcopy, and the attributes it changes."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
from typing import Optional

import torch
from torch import nn

from jepa_engine.integrations.ijepa import forward as ijepa_forward
from jepa_engine.integrations.record import MISSING, RECORD, Patch, count_fallback
from jepa_engine.integrations.sdpa import flags_off, routed_forward, sdpa_forward, traced
from jepa_engine.integrations.timm import forward as timm_forward
from jepa_engine.kernels.precision import matmul_precision


def _patched_call(kind: str, routed, mod: nn.Module, *args, **kwargs):
    """One call of a patched module: the fused forward of its kind, or the class's own forward under
    jit.trace / FX symbolic tracing."""
    if traced(args, kwargs):
        count_fallback(mod._jepa_engine_patch, "traced (FX / jit.trace): original code")
        return type(mod).forward(mod, *args, **kwargs)
    rec = mod._jepa_engine_patch
    if rec.precision is not None and not torch.compiler.is_compiling():
        with precision_scope(rec.precision, args):
            return _fused_call(kind, routed, mod, rec, *args, **kwargs)
    return _fused_call(kind, routed, mod, rec, *args, **kwargs)


def precision_scope(precision: str, args) -> contextlib.AbstractContextManager:
    """The block at ``precision``: fp32 / tf32 products (torch's TF32 flag, which the attention kernel
    follows too), or bf16 autocast on the device of the first tensor argument."""
    if precision == "bf16":
        dev = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        return torch.autocast(dev, torch.bfloat16)
    return matmul_precision(precision)


def _fused_call(kind: str, routed, mod: nn.Module, rec, *args, **kwargs):
    if kind == "timm":
        return timm_forward(mod, rec, *args, **kwargs)
    if kind == "ijepa":
        return ijepa_forward(mod, rec, *args, **kwargs)
    return sdpa_forward(mod, rec, routed, *args, **kwargs)


def _dispatcher(impl):
    def forward(self, *args, **kwargs):  # names no global: it runs with the class forward's globals
        return impl(self, *args, **kwargs)
    return forward


def _patched_forward(mod: nn.Module, kind: str, compile_safe: bool) -> types.MethodType:
    """The instance ``forward`` of a patched module: a bound method that calls the fused path.

    To TorchScript it is the class's forward: ``__wrapped__`` gives its source and signature and the
    function's globals are the class forward's, so ``torch.jit.script`` compiles the original code."""
    cls_fwd = type(mod).forward
    routed = routed_forward(cls_fwd, compile_safe) if kind == "sdpa" else None
    template = _dispatcher(functools.partial(_patched_call, kind, routed))
    fn = types.FunctionType(template.__code__, cls_fwd.__globals__, "forward", None, template.__closure__)
    fn.__wrapped__ = cls_fwd
    fn.__qualname__ = cls_fwd.__qualname__
    fn.__doc__ = cls_fwd.__doc__
    return types.MethodType(fn, mod)


class _Rebuild:
    """Pickled in place of a patched module's instance attributes: unpickling (``torch.load``,
    ``copy.deepcopy``) builds them again for the new module object."""

    def __init__(self, mod: nn.Module, attr: str, kind: str, compile_safe: bool):
        self.args = (mod, attr, kind, compile_safe)

    def __reduce__(self):
        return (_rebuild_attr, self.args)


def _rebuild_attr(mod: nn.Module, attr: str, kind: str, compile_safe: bool):
    # Runs while ``mod`` is being unpickled (its __dict__ not yet filled): only its class is read.
    if attr == "forward":
        return _patched_forward(mod, kind, compile_safe)
    return _GetState(mod)


class _GetState:
    """A patched module's ``__getstate__``: the module's state with the patched forward (a bound
    method of a generated function, not picklable by reference) replaced by a rebuild recipe."""

    def __init__(self, mod: nn.Module):
        self.mod = mod

    def __call__(self) -> dict:
        mod = self.mod
        state = type(mod).__getstate__(mod)
        rec = state.get(RECORD)
        if rec is not None:
            state[RECORD] = dataclasses.replace(rec, fused=0, fallbacks={})  # a new object counts anew
            for attr in ("forward", "__getstate__"):
                state[attr] = _Rebuild(mod, attr, rec.kind, rec.compile_safe)
        return state


def patch(mod: nn.Module, kind: str, compile_safe: bool, precision: Optional[str] = None) -> None:
    changed = {}
    if kind == "sdpa":
        # Modules that pick SDPA with a flag (timm's fused_attn, V-JEPA's use_sdpa) take the SDPA path
        # (classify patches them only where that computes the same: sdpa.flag_switch_reason).
        for flag in flags_off(mod):
            changed[flag] = mod.__dict__.get(flag, MISSING)
            object.__setattr__(mod, flag, True)
    mod.__dict__[RECORD] = Patch(kind, compile_safe, changed, precision=precision)
    mod.__dict__["forward"] = _patched_forward(mod, kind, compile_safe)
    mod.__dict__["__getstate__"] = _GetState(mod)


def unpatch(mod: nn.Module) -> None:
    record = mod.__dict__.pop(RECORD)
    mod.__dict__.pop("forward", None)
    mod.__dict__.pop("__getstate__", None)
    for name, old in record.changed_attrs.items():
        if old is MISSING:
            mod.__dict__.pop(name, None)
        else:
            mod.__dict__[name] = old
