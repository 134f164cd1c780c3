"""Rerouting the SDPA calls of foreign forwards (V-JEPA 2 ``RoPEAttention``, timm ``Attention2d``, ...) to
the fused op: the class forward runs with globals whose ``torch`` / ``torch.nn`` / ``F`` / SDPA alias
reach :func:`_fused_sdpa`, which computes ``masked_attention`` where that is the same computation and
the route table does not give the call to PyTorch (on CUDA), and real SDPA otherwise. Also
:func:`traced`: whether a call is being traced (the original code runs).
"""
from __future__ import annotations

import sys
import types
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from jepa_engine.integrations.masks import Unsupported, causal_plan, mask_plan, route_reason
from jepa_engine.integrations.record import count_fallback, count_fused
from jepa_engine.kernels.masked_attention import MAX_HEAD_DIM, masked_attention, supports_head_dim

SDPA_NAME = "scaled_dot_product_attention"
_REAL_SDPA = F.scaled_dot_product_attention
# Flags by which a module picks its SDPA branch over an explicit matmul-softmax one (timm's fused_attn,
# V-JEPA 2's use_sdpa): a patched module takes the SDPA branch, whose calls are rerouted, when switching
# it on computes the same thing (:func:`flag_switch_reason`).
SDPA_FLAGS = ("fused_attn", "use_sdpa")


def flags_off(mod: nn.Module) -> list[str]:
    """The module's SDPA flags that are set to False."""
    return [f for f in SDPA_FLAGS if getattr(mod, f, True) is False]


def _head_dim(mod: nn.Module):
    for name in ("head_dim", "dim_head"):          # V-JEPA 2, timm Attention2d
        value = getattr(mod, name, None)
        if isinstance(value, int) and value > 0:
            return value
    heads, qkv = getattr(mod, "num_heads", None), getattr(mod, "qkv", None)
    if isinstance(heads, int) and heads > 0 and isinstance(qkv, nn.Linear):
        return qkv.out_features // (3 * heads)
    return None


def flag_switch_reason(mod: nn.Module) -> str:
    """Why switching the module's SDPA flag on could change what it computes ("" when it cannot, or no
    flag is off). Its explicit branch scales by ``mod.scale`` and drops attention weights with
    ``mod.attn_drop``; an SDPA branch scales by 1/sqrt(head dim) unless told otherwise, and may drop with
    another probability (V-JEPA 2's passes ``dropout_p=proj_drop_prob`` and ignores ``qk_scale``). So the
    switch is made only where the scale is 1/sqrt(head dim) and neither branch drops attention weights;
    elsewhere the module keeps its own code (listed as skipped with this reason)."""
    off = flags_off(mod)
    if not off:
        return ""
    flag = f"{off[0]}=False"
    scale, head_dim = getattr(mod, "scale", None), _head_dim(mod)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        if head_dim is None:
            return f"{flag}: its explicit attention scales by {scale} and its head dim is unknown; its own code runs"
        if abs(scale - head_dim ** -0.5) > 1e-6 * head_dim ** -0.5:
            return (f"{flag}: its explicit attention scales by {scale}, not 1/sqrt(head dim {head_dim}); its own "
                    f"code runs")
    drop = getattr(mod, "attn_drop", None)
    p = drop.p if isinstance(drop, nn.Dropout) else drop
    if isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0:
        return (f"{flag}: its explicit attention drops weights with p={p}, which its SDPA branch may not; its own "
                f"code runs")
    p = getattr(mod, "proj_drop_prob", None)
    if isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0:
        return f"{flag}: its SDPA branch would drop attention weights with proj_drop_prob={p}; its own code runs"
    return ""


def traced(args, kwargs) -> bool:
    """True under ``torch.jit.trace`` or when FX symbolic tracing passes Proxies: the original code
    runs (decided from the values' types, never from a traced value)."""
    if torch.jit.is_tracing():
        return True
    if _fx_tracing():
        return any(isinstance(a, torch.fx.Proxy) for a in (*args, *kwargs.values()))
    return False


def _fx_tracing() -> bool:
    sym = torch.fx._symbolic_trace
    check = getattr(sym, "is_fx_symbolic_tracing", None)  # torch >= 2.6; older: the plain flag
    return check() if check is not None else bool(sym._is_fx_tracing_flag)


_ACTIVE: list = []  # records of the sdpa-kind modules whose forward is running (innermost last)


def _sdpa_reason(query, key, value, dropout_p, enable_gqa) -> str:
    if enable_gqa:
        return "GQA (enable_gqa=True)"
    if dropout_p != 0.0:
        return "attention dropout (dropout_p > 0)"
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "q/k/v are not [B, H, N, D]"
    D = query.shape[-1]
    if not supports_head_dim(D):
        return f"head dim {D} > {MAX_HEAD_DIM}"
    if key.shape[-1] != D or value.shape[-1] != D:
        return "q, k and v head dims differ"
    if not (query.shape[:2] == key.shape[:2] == value.shape[:2]) or key.shape[2] != value.shape[2]:
        return "q, k and v batch/head sizes differ"
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in (torch.float32, torch.float16,
                                                                           torch.bfloat16):
        return f"dtype {query.dtype}/{key.dtype}/{value.dtype}"
    return ""


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False, *, _compile_safe: bool = True):
    """``F.scaled_dot_product_attention`` with the same arguments, computed by ``masked_attention``
    where that is the same computation; real SDPA otherwise."""
    rec = _ACTIVE[-1] if _ACTIVE else None
    args = (query, key, value)
    reason = "traced (FX / jit.trace): original code" if traced(args, {}) else \
        _sdpa_reason(query, key, value, dropout_p, enable_gqa)
    if not reason:
        B, _, N_q, _ = query.shape
        N_k = key.shape[2]
        try:
            plan = causal_plan(mask_plan(attn_mask, B, N_q, N_k, query.device, user_format=False,
                                         compile_safe=_compile_safe), is_causal, N_q, N_k)
        except Unsupported as e:
            reason = e.args[0]
        else:
            reason = route_reason(plan, query.device, query.dtype, query.shape[-1], N_k)
    if reason:
        count_fallback(rec, reason)
        return _REAL_SDPA(*args, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                          enable_gqa=enable_gqa)
    count_fused(rec)
    return masked_attention(query, key, value, scale=scale, **plan.kwargs())


def _fused_sdpa_compile_unsafe(*args, **kwargs):
    return _fused_sdpa(*args, _compile_safe=False, **kwargs)


def _module_copy(name: str, src: types.ModuleType, overrides: dict) -> types.ModuleType:
    """A module object registered as ``name`` holding ``src``'s names (lazily loaded ones through a
    module ``__getattr__``) with ``overrides`` on top."""
    mod = sys.modules[name] = types.ModuleType(name)
    mod.__dict__.update({k: v for k, v in vars(src).items() if not k.startswith("__")})
    mod.__dict__["__getattr__"] = lambda attr: getattr(src, attr)
    mod.__dict__.update(overrides)
    return mod


def _routed_modules(compile_safe: bool) -> dict[str, Any]:
    """Stand-ins for ``torch.nn.functional``, ``torch.nn`` and ``torch`` whose SDPA (by any of those
    paths) is :func:`_fused_sdpa`, and the routed function itself; everything else is torch's own."""
    tag = f"jepa_engine.integrations.sdpa.routed_{'safe' if compile_safe else 'unsafe'}"
    fn = _fused_sdpa if compile_safe else _fused_sdpa_compile_unsafe
    functional = _module_copy(f"{tag}.functional", F, {SDPA_NAME: fn})
    nn_mod = _module_copy(f"{tag}.nn", nn, {"functional": functional})
    torch_mod = _module_copy(f"{tag}.torch", torch, {"nn": nn_mod})
    return {"F": functional, "nn": nn_mod, "torch": torch_mod, "function": fn}


_ROUTED = {True: _routed_modules(True), False: _routed_modules(False)}
_SDPA_HOLDERS = {"F": F, "nn": nn, "torch": torch}


def _routed_globals(orig: dict, aliases: dict[str, str], compile_safe: bool, qualname: str) -> dict:
    """The globals of a rerouted forward: a copy of its module's globals with the SDPA aliases bound to
    the routed versions, kept as the namespace of a module registered in ``sys.modules`` (torch.compile
    looks globals up by ``__name__``, so the copy must not pose as the original module). One copy per
    function: two forwards of one module may reach SDPA through different names."""
    name = (f"jepa_engine.integrations.sdpa._routed_{'safe' if compile_safe else 'unsafe'}."
            f"{orig.get('__name__', 'anon')}.{qualname}")
    mod = sys.modules.get(name)
    if mod is None:
        mod = sys.modules[name] = types.ModuleType(name)
    g = mod.__dict__
    g.update({k: v for k, v in orig.items() if k not in ("__name__", "__spec__", "__loader__")})
    for alias, what in aliases.items():
        g[alias] = _ROUTED[compile_safe][what]
    return g


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _code_names(c)
    return names


def sdpa_aliases(fn) -> tuple[dict[str, str], str]:
    """Global names of ``fn`` that reach SDPA: {name: "F" | "nn" | "torch" | "function"}, and a reason
    when the code names SDPA but through nothing we can reroute."""
    names = _code_names(fn.__code__)
    if SDPA_NAME not in names:
        return {}, ""
    aliases = {}
    for name in names:
        obj = fn.__globals__.get(name)
        if obj is _REAL_SDPA:
            aliases[name] = "function"
        for what, holder in _SDPA_HOLDERS.items():
            if obj is holder:
                aliases[name] = what
    if not aliases:
        return {}, ("forward calls scaled_dot_product_attention, but not through a global bound to torch, "
                    "torch.nn, torch.nn.functional or the function itself")
    return aliases, ""


_ROUTED_FNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def routed_forward(fwd, compile_safe: bool):
    """The class forward ``fwd`` with its SDPA globals rerouted (built once per function)."""
    per_fn = _ROUTED_FNS.setdefault(fwd, {})
    new = per_fn.get(compile_safe)
    if new is None:
        aliases, _ = sdpa_aliases(fwd)
        g = _routed_globals(fwd.__globals__, aliases, compile_safe, fwd.__qualname__)
        new = types.FunctionType(fwd.__code__, g, fwd.__name__, fwd.__defaults__, fwd.__closure__)
        new.__kwdefaults__ = fwd.__kwdefaults__
        new.__qualname__ = fwd.__qualname__
        per_fn[compile_safe] = new
    return new


def sdpa_forward(self, rec, fn, *args, **kwargs):
    if torch.compiler.is_compiling():
        return fn(self, *args, **kwargs)
    _ACTIVE.append(rec)
    try:
        return fn(self, *args, **kwargs)
    finally:
        _ACTIVE.pop()
