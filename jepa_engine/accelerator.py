"""Drop-in acceleration of an existing ViT / JEPA model: ``accelerate(model)``, ``restore(model)`` and
``stats(model)``.

``accelerate`` walks the module tree and routes every attention module it recognises through the
fused :func:`jepa_engine.kernels.masked_attention` op. It patches the *instance's* ``forward`` (the
module object, its class, its parameters and its ``state_dict`` keys stay exactly the same: no copy,
no new module), so checkpoints, optimisers and ``isinstance`` checks are untouched.
``restore`` removes the patched forwards again (and any attribute the patch changed).

What is recognised (first rule that matches wins; see ``AccelerationReport`` for what happened):

==============  ==========================================================  ==========================
kind            detected by                                                  call convention kept
==============  ==========================================================  ==========================
``timm``        ``qkv`` Linear, ``proj``, ``num_heads``, ``head_dim``,          ``forward(x, attn_mask=None,
                ``q_norm``/``k_norm`` and a class ``forward(self, x,           is_causal=False) -> x``
                attn_mask, ...)`` (timm ``Attention``; optional ``norm`` and
                ``gate`` of newer timm)
``ijepa``       ``qkv``/``proj``/``num_heads``/``scale``, no ``q_norm``, a     ``forward(x[, mask]) ->
                class ``forward(self, x[, mask])`` whose source returns        (x, None)``: attention
                ``x, attn`` (the official I-JEPA / V-JEPA ViT ``Attention``)   weights are not computed
``sdpa``        a class ``forward`` whose code calls SDPA through a global     unchanged: the module's own
                bound to ``torch``, ``torch.nn``, ``torch.nn.functional`` or    forward runs, its SDPA calls
                the SDPA function itself (``torch.nn.functional.scaled_dot_     go to the fused op
                product_attention``, ``F.scaled_...``, a module-level alias;
                V-JEPA 2 ``RoPEAttention`` / ``ACRoPEAttention``, timm
                ``Attention2d``)
==============  ==========================================================  ==========================

Head dims 1 to 256 fuse (80, 88, 104 of ViT-H/g/G run in the kernel's 128-wide tile). Per call, a
patched module falls back to what it did before (the class forward, or real SDPA) whenever the fused
op cannot compute the same thing: attention dropout in training, GQA, ``is_causal`` with a mask or
with ``N_q != N_k``, or a mask that is neither key padding nor frame-causal. ``ijepa`` modules called
with ``need_weights=True`` run the original forward and return the real weights. :func:`stats` counts,
per module, the calls that ran fused and those that fell back (with the reason).

Masks are accepted in the user's format and converted once to key padding (bool ``[B, N_k]``,
True = visible), plus a frame length for frame-causal masks:

- bool ``[B, N_k]`` (in ``timm``/``ijepa`` forwards: key padding, as I-JEPA code passes it);
- bool or additive masks broadcastable to ``[B, H, N_q, N_k]`` (SDPA's convention). Additive entries
  at or below the dtype's lowest finite value (``-inf``, or ``torch.finfo(dtype).min`` as timm's
  NaFlex writes them) are masked; every other entry must be 0 (else it is a bias: fall back). Masks
  whose query and head axes have size 1 (``[B, 1, 1, N_k]``) are key padding, converted by a view;
- full ``[B?, H?, N_q, N_k]`` masks: their values are inspected once (a host synchronisation; cached
  per mask, including new views of one stored mask such as ``self.attn_mask[:N, :N]`` at every
  forward): when every query row and head is the same they are key padding; when they are
  frame-causal (query i sees key j iff ``j // L <= i // L``: V-JEPA 2-AC's action-block causal mask,
  frames of patch tokens plus action/state tokens) AND-ed with key padding, the kernel's frame-causal
  mode runs with ``frame_size = L``; otherwise the call falls back to real SDPA (or the class forward);
- SDPA's ``is_causal=True`` (no mask, ``N_q == N_k``) is frame-causal with one token per frame;
- a list of index tensors (I-JEPA ``masks``: kept patch indices, each ``[B, K_i]``): the union of
  the kept positions becomes the visible keys.

Under ``torch.compile`` nothing is inspected (``compile_safe=True``): masks whose query/head axes
have size 1 convert by a view, everything else falls back, so ``fullgraph=True`` traces with no graph
break. ``compile_safe=False`` inspects full masks while compiling too (graph breaks).

Other transforms see the original code: ``torch.jit.script`` compiles the class's forward (the patched
forward presents it), ``torch.jit.trace`` and ``torch.fx.symbolic_trace`` run it (chosen from
``torch.jit.is_tracing()`` and whether the inputs are FX Proxies, never from a traced value);
``torch.save(model)`` / ``torch.load`` and ``copy.deepcopy`` give a model patched the same way.

Semantics differences, on purpose: a query row whose keys are all masked gives zeros (SDPA gives
NaN, or a uniform average for finite masks); ``ijepa`` forwards return ``None`` in place of the
attention weights.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import math
import sys
import types
import weakref
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from jepa_engine.kernels.masked_attention import MAX_HEAD_DIM, masked_attention, supports_head_dim

__all__ = ["AccelerationReport", "AccelerationStats", "accelerate", "restore", "stats", "patch_model_ema",
           "to_key_padding"]

_RECORD = "_jepa_engine_patch"  # attribute on a patched module (a _Patch)
_MODEL_RECORD = "_jepa_engine_accelerated"  # attribute on the root model (EMA objects it patched)
_SDPA_NAME = "scaled_dot_product_attention"
_REAL_SDPA = F.scaled_dot_product_attention


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ModuleEntry:
    name: str   # dotted path in the model ("" is the root)
    cls: str    # qualified class name
    kind: str   # timm / ijepa / sdpa, or "-" for skipped modules
    reason: str = ""


@dataclasses.dataclass
class AccelerationReport:
    """What :func:`accelerate` did: ``patched`` and ``skipped`` modules (with reasons), modules that
    were ``already`` patched by an earlier call, and what happened to the EMA (``ema``).

    A patched module's ``reason`` is empty when every call it makes in the supported forms runs fused,
    and names what will fall back otherwise (e.g. attention dropout while training). Run-time counts
    of fused and fallen-back calls are in :func:`stats`."""

    patched: list[ModuleEntry] = dataclasses.field(default_factory=list)
    skipped: list[ModuleEntry] = dataclasses.field(default_factory=list)
    already: list[ModuleEntry] = dataclasses.field(default_factory=list)
    ema: str = "not requested"

    def __str__(self) -> str:
        lines = [f"jepa_engine.accelerate: {len(self.patched)} patched, {len(self.skipped)} skipped, "
                 f"{len(self.already)} already patched; ema: {self.ema}"]
        for title, rows in (("patched", self.patched), ("skipped", self.skipped), ("already", self.already)):
            for e in rows:
                lines.append(f"  {title:8s} {e.name or '<root>'} ({e.cls}) {e.kind} {e.reason}".rstrip())
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Run-time counters
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ModuleStats:
    kind: str
    fused: int = 0
    fallbacks: dict = dataclasses.field(default_factory=dict)  # reason -> calls

    @property
    def fallen_back(self) -> int:
        return sum(self.fallbacks.values())


@dataclasses.dataclass
class AccelerationStats:
    """Calls of every patched module since :func:`accelerate` (or the last ``stats(model, reset=True)``):
    how many ran the fused kernel and how many fell back to the original code, by reason. Eager calls
    only: a compiled or exported graph runs without Python, so it is not counted."""

    modules: dict = dataclasses.field(default_factory=dict)  # name -> ModuleStats

    @property
    def fused(self) -> int:
        return sum(m.fused for m in self.modules.values())

    @property
    def fallen_back(self) -> int:
        return sum(m.fallen_back for m in self.modules.values())

    def reasons(self) -> dict:
        out: dict = collections.Counter()
        for m in self.modules.values():
            out.update(m.fallbacks)
        return dict(out)

    def __str__(self) -> str:
        lines = [f"jepa_engine.accelerator.stats: {self.fused} fused calls, {self.fallen_back} fallen back, "
                 f"{len(self.modules)} patched modules"]
        for name, m in self.modules.items():
            state = "fused" if m.fallen_back == 0 else ("falls back" if m.fused == 0 else "mixed")
            lines.append(f"  {name or '<root>'} ({m.kind}) {state}: {m.fused} fused, {m.fallen_back} fallen back")
            for reason, n in m.fallbacks.items():
                lines.append(f"      {n} x {reason}")
        return "\n".join(lines)


def stats(model: nn.Module, *, reset: bool = False) -> AccelerationStats:
    """Per patched module of ``model``: calls that ran fused and calls that fell back (with why).

    A model whose attention is patched but every call falls back shows ``fused == 0`` here."""
    out = AccelerationStats()
    for name, mod in model.named_modules():
        rec = mod.__dict__.get(_RECORD)
        if rec is None:
            continue
        out.modules[name] = ModuleStats(rec.kind, rec.fused, dict(rec.fallbacks))
        if reset:
            rec.fused, rec.fallbacks = 0, {}
    return out


def _count_fused(rec) -> None:
    if rec is not None and not torch.compiler.is_compiling():
        rec.fused += 1


def _count_fallback(rec, reason: str) -> None:
    if rec is not None and not torch.compiler.is_compiling():
        rec.fallbacks[reason] = rec.fallbacks.get(reason, 0) + 1


# --------------------------------------------------------------------------------------------------
# Masks: the user's format -> key padding (+ frame-causal)
# --------------------------------------------------------------------------------------------------
class _Unsupported(Exception):
    """The mask is not expressible as key padding / frame-causal (the caller falls back)."""


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What the kernel is told: key padding (bool [B, N_k] or None) and a frame length (0 = none)."""
    key_padding: Optional[torch.Tensor]
    frame_len: int = 0

    def kwargs(self) -> dict:
        kw: dict = {"key_padding": self.key_padding}
        if self.frame_len:
            kw["frame_size"] = self.frame_len
        return kw


_NO_MASK = _Plan(None, 0)


def _frame_plan(a: torch.Tensor, B: int, N: int) -> _Plan:
    """``a`` bool ``[b, h, N, N]`` (b in (1, B)) that is not key padding: is it frame-causal (query i
    sees key j iff ``j // L <= i // L``), AND-ed with a key padding? Two host synchronisations.

    The last query row sees every frame, so it is the key padding; a visible key j is first seen by
    the first query of its frame, ``(j // L) * L``: L is the gcd of those first rows. The candidate
    is then checked against the whole mask (every head, every batch entry)."""
    kp = a[:, 0, -1, :]                                         # [b, N]
    first = a[:, 0].to(torch.uint8).argmax(dim=1)               # [b, N]: first query row seeing key j
    rows = torch.unique(first[kp]).tolist()
    L = 0
    for r in rows:
        L = math.gcd(L, int(r))
    if L == 0:
        raise _Unsupported("the mask differs between query rows but is not frame-causal")
    pos = torch.arange(N, device=a.device) // L
    expected = (pos[None, :] <= pos[:, None])[None, None] & kp[:, None, None, :]
    if not bool((a == expected).all()):
        raise _Unsupported("the mask differs between query rows and is not frame-causal (not key padding)")
    return _Plan(kp.expand(B, N), L)


def _plan_from_4d(m: torch.Tensor, B: int, N_q: int, N_k: int, inspect_values: bool) -> _Plan:
    """``m`` bool ``[b, h, n_q, N_k]`` (SDPA broadcasting; True = visible) -> a plan."""
    if m.shape[-1] != N_k or m.shape[0] not in (1, B) or m.shape[2] not in (1, N_q):
        raise _Unsupported(f"mask shape {tuple(m.shape)} does not broadcast to [{B}, H, {N_q}, {N_k}]")
    if m.shape[1] != 1 or m.shape[2] != 1:
        if not inspect_values:
            raise _Unsupported("a mask varying over queries or heads is not inspected under torch.compile")
        first = m[:, :1, :1, :]
        if not bool((m == first).all()):
            if N_q != N_k or m.shape[2] != N_q:
                raise _Unsupported("the mask differs between query rows or heads (not key padding)")
            return _frame_plan(m, B, N_q)
        m = first
    return _Plan(m[:, 0, 0, :].expand(B, N_k), 0)


def _masked_entries(mask: torch.Tensor) -> torch.Tensor:
    """Additive mask -> bool "masked": entries at or below the dtype's lowest finite value (-inf, or
    torch.finfo(dtype).min as timm's NaFlex writes it). Raises unless every other entry is 0."""
    masked = mask <= torch.finfo(mask.dtype).min
    if not bool((masked | (mask == 0)).all()):
        raise _Unsupported("the additive mask has values other than 0 and -inf / the dtype's lowest "
                           "finite value (a bias, not a mask)")
    return masked


def _convert(mask: Any, B: int, N_q: int, N_k: int, device: torch.device, *, user_format: bool,
             inspect_values: bool) -> _Plan:
    if mask is None:
        return _NO_MASK
    if isinstance(mask, (list, tuple)):  # I-JEPA masks: kept indices, each [B, K_i]
        kp = torch.zeros(B, N_k, dtype=torch.bool, device=device)
        for idx in mask:
            if not torch.is_tensor(idx) or idx.dim() != 2 or idx.shape[0] != B:
                raise _Unsupported(f"index masks must be [B, K] = [{B}, K] tensors")
            kp.scatter_(1, idx.to(device=device, dtype=torch.long), True)
        return _Plan(kp)
    if not torch.is_tensor(mask):
        raise _Unsupported(f"mask of type {type(mask).__name__}")
    if mask.dtype != torch.bool:
        if not mask.is_floating_point():
            raise _Unsupported(f"mask dtype {mask.dtype}")
        if not inspect_values:
            raise _Unsupported("additive masks are not inspected under torch.compile")
        mask = ~_masked_entries(mask)
    if user_format and mask.dim() == 2 and tuple(mask.shape) == (B, N_k):
        plan = _Plan(mask)
    else:
        if mask.dim() > 4:
            raise _Unsupported(f"mask with {mask.dim()} dims")
        m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        plan = _plan_from_4d(m, B, N_q, N_k, inspect_values)
    return _Plan(plan.key_padding.to(device).contiguous(), plan.frame_len)


def _tensor_key(t: torch.Tensor) -> tuple:
    """Identifies a tensor's contents while a reference to it is held (its storage cannot be reused):
    a new view of the same memory (``self.mask[:n, :n]`` at every forward) gives the same key."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype,
            t.device, t._version)


class _MaskCache:
    """A few entries: recent masks (held, so their memory is not reused) and their plans, so a model
    passing the same mask to every block (or a view of one stored mask at every forward) converts
    and inspects it once."""

    SIZE = 4

    def __init__(self):
        self.entries: collections.OrderedDict = collections.OrderedDict()

    def get(self, mask, B, N_q, N_k, device, user_format):
        items = mask if isinstance(mask, (list, tuple)) else (mask,)
        if not all(torch.is_tensor(t) for t in items):
            return _convert(mask, B, N_q, N_k, device, user_format=user_format, inspect_values=True)
        key = (type(mask), tuple(_tensor_key(t) for t in items), B, N_q, N_k, device, user_format)
        hit = self.entries.get(key)
        if hit is not None:
            self.entries.move_to_end(key)
            value = hit[1]
            if isinstance(value, _Unsupported):
                raise value
            return value
        try:
            value = _convert(mask, B, N_q, N_k, device, user_format=user_format, inspect_values=True)
        except _Unsupported as e:
            value = e
        self.entries[key] = (items, value)
        while len(self.entries) > self.SIZE:
            self.entries.popitem(last=False)
        if isinstance(value, _Unsupported):
            raise value
        return value


_CACHE = _MaskCache()


def to_key_padding(mask: Any, batch: int, num_queries: int, num_keys: int, *,
                   device: Optional[torch.device] = None, user_format: bool = True) -> Optional[torch.Tensor]:
    """Convert a mask in any supported format (see the module docstring) to bool key padding
    ``[batch, num_keys]`` (True = visible), or ``None`` for no mask.

    Raises ``ValueError`` when the mask is not expressible as key padding (a frame-causal mask is
    not: :func:`to_attention_plan` gives its frame length)."""
    kp, frame_len = to_attention_plan(mask, batch, num_queries, num_keys, device=device, user_format=user_format)
    if frame_len:
        raise ValueError(f"to_key_padding: mask is not expressible as key padding: it is frame-causal "
                         f"with {frame_len} tokens per frame")
    return kp


def to_attention_plan(mask: Any, batch: int, num_queries: int, num_keys: int, *,
                      device: Optional[torch.device] = None, user_format: bool = True
                      ) -> tuple[Optional[torch.Tensor], int]:
    """``(key_padding, frame_len)`` of a mask: what :func:`masked_attention` is given for it
    (``key_padding=``, ``frame_size=frame_len``; frame_len 0 = not frame-causal).

    Raises ``ValueError`` when the mask is neither key padding nor frame-causal (with key padding)."""
    device = device or (mask.device if torch.is_tensor(mask) else torch.device("cpu"))
    try:
        plan = _convert(mask, batch, num_queries, num_keys, torch.device(device), user_format=user_format,
                        inspect_values=True)
    except _Unsupported as e:
        raise ValueError(f"to_key_padding: mask is not expressible as key padding: {e}") from None
    return plan.key_padding, plan.frame_len


def _plan(mask, B, N_q, N_k, device, *, user_format: bool, compile_safe: bool) -> _Plan:
    """The plan of a mask, or raise _Unsupported; cached in eager mode."""
    if mask is None:
        return _NO_MASK
    if torch.compiler.is_compiling():
        return _convert(mask, B, N_q, N_k, device, user_format=user_format, inspect_values=not compile_safe)
    return _CACHE.get(mask, B, N_q, N_k, device, user_format)


def _causal_plan(plan: _Plan, is_causal: bool, N_q: int, N_k: int) -> _Plan:
    """SDPA's ``is_causal`` (lower triangle, N_q == N_k) is frame-causal with one token per frame."""
    if not is_causal:
        return plan
    if N_q != N_k:
        raise _Unsupported("is_causal with N_q != N_k")
    if plan.key_padding is not None or plan.frame_len:
        raise _Unsupported("is_causal together with a mask")
    return _Plan(None, 1)


# --------------------------------------------------------------------------------------------------
# Transforms that must see the original code: TorchScript, jit.trace, FX symbolic tracing
# --------------------------------------------------------------------------------------------------
def _traced(args, kwargs) -> bool:
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


# --------------------------------------------------------------------------------------------------
# The fused SDPA route (used by the "sdpa" patch)
# --------------------------------------------------------------------------------------------------
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
    reason = "traced (FX / jit.trace): original code" if _traced(args, {}) else \
        _sdpa_reason(query, key, value, dropout_p, enable_gqa)
    if not reason:
        B, _, N_q, _ = query.shape
        N_k = key.shape[2]
        try:
            plan = _causal_plan(_plan(attn_mask, B, N_q, N_k, query.device, user_format=False,
                                      compile_safe=_compile_safe), is_causal, N_q, N_k)
        except _Unsupported as e:
            reason = str(e)
    if reason:
        _count_fallback(rec, reason)
        return _REAL_SDPA(*args, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                          enable_gqa=enable_gqa)
    _count_fused(rec)
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
    tag = f"jepa_engine.accelerator.routed_{'safe' if compile_safe else 'unsafe'}"
    fn = _fused_sdpa if compile_safe else _fused_sdpa_compile_unsafe
    functional = _module_copy(f"{tag}.functional", F, {_SDPA_NAME: fn})
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
    name = (f"jepa_engine.accelerator._routed_{'safe' if compile_safe else 'unsafe'}."
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


def _sdpa_aliases(fn) -> tuple[dict[str, str], str]:
    """Global names of ``fn`` that reach SDPA: {name: "F" | "nn" | "torch" | "function"}, and a reason
    when the code names SDPA but through nothing we can reroute."""
    names = _code_names(fn.__code__)
    if _SDPA_NAME not in names:
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


def _routed_forward(fwd, compile_safe: bool):
    """The class forward ``fwd`` with its SDPA globals rerouted (built once per function)."""
    per_fn = _ROUTED_FNS.setdefault(fwd, {})
    new = per_fn.get(compile_safe)
    if new is None:
        aliases, _ = _sdpa_aliases(fwd)
        g = _routed_globals(fwd.__globals__, aliases, compile_safe, fwd.__qualname__)
        new = types.FunctionType(fwd.__code__, g, fwd.__name__, fwd.__defaults__, fwd.__closure__)
        new.__kwdefaults__ = fwd.__kwdefaults__
        new.__qualname__ = fwd.__qualname__
        per_fn[compile_safe] = new
    return new


# --------------------------------------------------------------------------------------------------
# Fused forwards
# --------------------------------------------------------------------------------------------------
def _timm_forward(self, rec, x, attn_mask=None, is_causal=False, **kwargs):
    original = type(self).forward
    reason = ""
    if kwargs:
        reason = f"keyword arguments {sorted(kwargs)}"
    elif x.dim() != 3:
        reason = "x is not [B, N, C]"
    elif self.training and self.attn_drop.p > 0:
        reason = "attention dropout while training"
    if not reason:
        B, N, _ = x.shape
        try:
            plan = _causal_plan(_plan(attn_mask, B, N, N, x.device, user_format=True,
                                      compile_safe=rec.compile_safe), is_causal, N, N)
        except _Unsupported as e:
            reason = str(e)
    if reason:
        _count_fallback(rec, reason)
        if is_causal:
            kwargs["is_causal"] = True
        return original(self, x, attn_mask, **kwargs)  # older timm has no is_causal argument
    _count_fused(rec)
    H, Dh = self.num_heads, self.head_dim
    gate = getattr(self, "gate", None)
    g = gate(x).sigmoid() if gate is not None else None
    q, k, v = self.qkv(x).reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, Dh] views
    q, k = self.q_norm(q), self.k_norm(k)
    out = masked_attention(q, k, v, scale=self.scale, **plan.kwargs())
    out = out.transpose(1, 2).reshape(B, N, H * Dh)  # free: the op writes [B, N, H, Dh] memory
    norm = getattr(self, "norm", None)
    if norm is not None:
        out = norm(out)
    if g is not None:
        out = out * g
    return self.proj_drop(self.proj(out))


def _ijepa_forward(self, rec, x, mask=None, *, need_weights: bool = False):
    orig_args = (x,) if mask is None else (x, mask)
    reason = ""
    if need_weights:
        reason = "need_weights=True"
    elif x.dim() != 3:
        reason = "x is not [B, N, C]"
    elif self.training and self.attn_drop.p > 0:
        reason = "attention dropout while training"
    if not reason:
        B, N, C = x.shape
        try:
            plan = _plan(mask, B, N, N, x.device, user_format=True, compile_safe=rec.compile_safe)
        except _Unsupported as e:
            reason = str(e)
    if reason:
        _count_fallback(rec, reason)
        return type(self).forward(self, *orig_args)
    _count_fused(rec)
    H = self.num_heads
    q, k, v = self.qkv(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
    out = masked_attention(q, k, v, scale=self.scale, **plan.kwargs())
    out = out.transpose(1, 2).reshape(B, N, C)
    return self.proj_drop(self.proj(out)), None


def _sdpa_forward(self, rec, fn, *args, **kwargs):
    if torch.compiler.is_compiling():
        return fn(self, *args, **kwargs)
    _ACTIVE.append(rec)
    try:
        return fn(self, *args, **kwargs)
    finally:
        _ACTIVE.pop()


def _patched_call(kind: str, routed, mod: nn.Module, *args, **kwargs):
    """One call of a patched module: the fused forward of its kind, or the class's own forward under
    jit.trace / FX symbolic tracing."""
    if _traced(args, kwargs):
        _count_fallback(mod._jepa_engine_patch, "traced (FX / jit.trace): original code")
        return type(mod).forward(mod, *args, **kwargs)
    rec = mod._jepa_engine_patch
    if kind == "timm":
        return _timm_forward(mod, rec, *args, **kwargs)
    if kind == "ijepa":
        return _ijepa_forward(mod, rec, *args, **kwargs)
    return _sdpa_forward(mod, rec, routed, *args, **kwargs)


def _dispatcher(impl):
    def forward(self, *args, **kwargs):  # names no global: it runs with the class forward's globals
        return impl(self, *args, **kwargs)
    return forward


def _patched_forward(mod: nn.Module, kind: str, compile_safe: bool) -> types.MethodType:
    """The instance ``forward`` of a patched module: a bound method that calls the fused path.

    To TorchScript it is the class's forward: ``__wrapped__`` gives its source and signature and the
    function's globals are the class forward's, so ``torch.jit.script`` compiles the original code."""
    cls_fwd = type(mod).forward
    routed = _routed_forward(cls_fwd, compile_safe) if kind == "sdpa" else None
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
        rec = state.get(_RECORD)
        if rec is not None:
            state[_RECORD] = dataclasses.replace(rec, fused=0, fallbacks={})  # a new object counts anew
            for attr in ("forward", "__getstate__"):
                state[attr] = _Rebuild(mod, attr, rec.kind, rec.compile_safe)
        return state


# --------------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------------
class _Missing:
    """Marks an attribute the patch added (absent before); a picklable singleton."""

    def __reduce__(self):
        return "_MISSING"

    def __repr__(self):
        return "<missing>"


_MISSING = _Missing()


@dataclasses.dataclass
class _Patch:
    kind: str
    compile_safe: bool
    changed_attrs: dict         # attribute -> value before the patch (_MISSING: absent)
    fused: int = 0              # calls that ran the fused kernel (eager)
    fallbacks: dict = dataclasses.field(default_factory=dict)  # reason -> calls that fell back


def _forward_params(fn) -> list[str]:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []


def _head_dim_reason(head_dim: int) -> str:
    if not supports_head_dim(head_dim):
        return f"head dim {head_dim} is outside the fused kernel's 1..{MAX_HEAD_DIM}"
    return ""


def _classify(mod: nn.Module) -> tuple[str, str]:
    """(kind, "") for a module we patch, ("", reason) otherwise (reason "" = not attention-like)."""
    from jepa_engine.nn import MaskedSelfAttention

    cls = type(mod)
    if isinstance(mod, MaskedSelfAttention):
        return "", "already runs the fused masked_attention op (jepa_engine.nn.MaskedSelfAttention)"
    if "forward" in mod.__dict__:
        return "", "its forward was replaced on the instance by other code; left alone"
    fwd = cls.forward
    params = _forward_params(fwd)
    has_qkv = isinstance(getattr(mod, "qkv", None), nn.Linear) and isinstance(getattr(mod, "proj", None), nn.Module)
    heads = getattr(mod, "num_heads", None)
    if has_qkv and isinstance(heads, int) and heads > 0:
        dim_qkv = mod.qkv.out_features
        if (hasattr(mod, "q_norm") and hasattr(mod, "k_norm") and params[:3] == ["self", "x", "attn_mask"]
                and isinstance(getattr(mod, "head_dim", None), int)
                and isinstance(getattr(mod, "attn_drop", None), nn.Dropout)):
            if dim_qkv != 3 * heads * mod.head_dim:
                return "", f"qkv width {dim_qkv} != 3 * num_heads * head_dim"
            reason = _head_dim_reason(mod.head_dim)
            return ("", reason) if reason else ("timm", "")
        if (not hasattr(mod, "q_norm") and params in (["self", "x"], ["self", "x", "mask"])
                and hasattr(mod, "scale") and isinstance(getattr(mod, "attn_drop", None), nn.Dropout)):
            try:
                src = inspect.getsource(fwd)
            except (OSError, TypeError):
                src = ""
            if "return x, attn" in src.replace("(", "").replace(")", ""):
                C = mod.qkv.in_features
                if dim_qkv != 3 * C or C % heads:
                    return "", f"qkv width {dim_qkv} != 3 * dim {C} (or dim not divisible by num_heads)"
                reason = _head_dim_reason(C // heads)
                return ("", reason) if reason else ("ijepa", "")
    aliases, reason = _sdpa_aliases(fwd)
    if aliases:
        head_dim = getattr(mod, "head_dim", None)
        if isinstance(head_dim, int) and _head_dim_reason(head_dim):
            return "", _head_dim_reason(head_dim)
        return "sdpa", ""
    if reason:
        return "", reason
    name = cls.__name__.lower()
    if isinstance(mod, nn.MultiheadAttention):
        return "", "torch.nn.MultiheadAttention (its forward calls F.multi_head_attention_forward; not routed)"
    if "attention" in name or "attn" in name or (has_qkv and heads):
        return "", ("attention-like but unrecognised: forward matches neither timm's Attention nor the "
                    "I-JEPA (x, attn) form and does not call F.scaled_dot_product_attention")
    return "", ""


def _static_note(mod: nn.Module, kind: str) -> str:
    """What the report can tell before any call: conditions under which calls will fall back."""
    notes = []
    drop = getattr(mod, "attn_drop", None)
    if kind != "sdpa" and isinstance(drop, nn.Dropout) and drop.p > 0:
        notes.append(f"falls back while training (attention dropout p={drop.p})")
    p = getattr(mod, "proj_drop_prob", None) if kind == "sdpa" else None
    if isinstance(p, float) and p > 0:
        notes.append(f"falls back if it passes dropout_p={p} to SDPA")
    return "fused" + (f"; {'; '.join(notes)}" if notes else "")


def _patch(mod: nn.Module, kind: str, compile_safe: bool) -> None:
    changed = {}
    if kind == "sdpa":
        # Modules that pick SDPA with a flag (timm's fused_attn, V-JEPA's use_sdpa) take the SDPA path.
        for flag in ("fused_attn", "use_sdpa"):
            if getattr(mod, flag, True) is False:
                changed[flag] = mod.__dict__.get(flag, _MISSING)
                object.__setattr__(mod, flag, True)
    mod.__dict__[_RECORD] = _Patch(kind, compile_safe, changed)
    mod.__dict__["forward"] = _patched_forward(mod, kind, compile_safe)
    mod.__dict__["__getstate__"] = _GetState(mod)


def _unpatch(mod: nn.Module) -> None:
    record = mod.__dict__.pop(_RECORD)
    mod.__dict__.pop("forward", None)
    mod.__dict__.pop("__getstate__", None)
    for name, old in record.changed_attrs.items():
        if old is _MISSING:
            mod.__dict__.pop(name, None)
        else:
            mod.__dict__[name] = old


# --------------------------------------------------------------------------------------------------
# EMA: timm ModelEmaV3-style objects
# --------------------------------------------------------------------------------------------------
def patch_model_ema(ema_obj) -> str:
    """Replace ``ema_obj.update(model, step=None)`` of a timm ``ModelEmaV3``-style object (``module``,
    ``get_decay(step)``, ``update``) with the one-launch EMA (:func:`jepa_engine.kernels.ema_update_`).

    Same result as ModelEmaV3: every floating ``state_dict`` entry is averaged (only parameters with
    ``exclude_buffers=True``; buffers are then copied), other entries copied, with the decay of
    ``get_decay(step)``. Calls that the kernel cannot serve (``stochastic_rounding`` on bf16 tensors,
    or an EMA kept on another device than the model) run the original ``update``. Returns a note for
    the report; :func:`restore` (on the object or on the model ``accelerate`` patched) undoes it.
    """
    if "_jepa_engine_ema" in vars(ema_obj):
        return "already patched"
    if not (hasattr(ema_obj, "module") and callable(getattr(ema_obj, "get_decay", None))
            and callable(getattr(ema_obj, "update", None))):
        raise TypeError(f"patch_model_ema: expected a timm ModelEmaV3-style object (module, get_decay, update), "
                        f"got {type(ema_obj).__name__}")
    original = ema_obj.update
    lists: dict[int, tuple] = {}

    def _tensors(model):
        key = id(model)
        if key not in lists or lists[key][0]() is not model:
            if getattr(ema_obj, "exclude_buffers", False):
                t = [p.detach() for p in ema_obj.module.parameters()]
                o = [p.detach() for p in model.parameters()]
                tb, ob = list(ema_obj.module.buffers()), list(model.buffers())
            else:
                t, o, tb, ob = [], [], [], []
                for ev, mv in zip(ema_obj.module.state_dict().values(), model.state_dict().values()):
                    (t if ev.is_floating_point() else tb).append(ev)
                    (o if ev.is_floating_point() else ob).append(mv)
            # The kernel needs each pair on one device with one shape (ModelEmaV3's device= option
            # keeps the average elsewhere); bf16 stochastic rounding is not implemented by it.
            fallback = (any(a.device != b.device or a.shape != b.shape for a, b in zip(t, o))
                        or (getattr(ema_obj, "stochastic_rounding", False)
                            and any(x.dtype == torch.bfloat16 for x in t)))
            lists[key] = (weakref.ref(model), fallback, t, o, tb, ob)
        return lists[key][1:]

    @torch.no_grad()
    def update(model, step: Optional[int] = None):
        from jepa_engine.kernels.ema import ema_update_

        fallback, t, o, tb, ob = _tensors(model)
        if fallback:
            return original(model, step)
        ema_update_(t, o, float(ema_obj.get_decay(step)), target_buffers=tb, online_buffers=ob)

    ema_obj.update = update
    ema_obj._jepa_engine_ema = original
    return f"{type(ema_obj).__name__}.update -> one-launch EMA"


def _restore_ema(ema_obj) -> None:
    original = vars(ema_obj).pop("_jepa_engine_ema", None)
    if original is not None:
        vars(ema_obj).pop("update", None)
        if getattr(ema_obj, "update", None) != original:  # the original was itself an instance attribute
            ema_obj.update = original


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------
def accelerate(model: nn.Module, *, attention: bool = True, ema: Any = None,
               compile_safe: bool = True) -> AccelerationReport:
    """Patch ``model`` in place to run its attention on the fused masked-attention op.

    Args:
        model: any ``nn.Module`` (a timm ViT, an I-JEPA / V-JEPA encoder or predictor, your own).
        attention: patch the attention modules (see the module docstring for what is recognised).
        ema: optionally an EMA to accelerate too: a timm ``ModelEmaV3``-style object (its ``update``
            becomes the one-launch EMA, see :func:`patch_model_ema`) or a :class:`jepa_engine.EMA`
            (already one launch; nothing to do).
        compile_safe: never inspect mask values under ``torch.compile`` (no graph break; masks
            that would need it fall back to SDPA / the original forward).

    Returns:
        An :class:`AccelerationReport`. Calling ``accelerate`` again is a no-op (modules already
        patched are listed under ``already``). :func:`restore` undoes everything.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate: model must be an nn.Module, got {type(model).__name__}")
    report = AccelerationReport()
    if attention:
        for name, mod in model.named_modules():
            cls = f"{type(mod).__module__}.{type(mod).__qualname__}"
            if _RECORD in mod.__dict__:
                report.already.append(ModuleEntry(name, cls, mod.__dict__[_RECORD].kind))
                continue
            kind, reason = _classify(mod)
            if kind:
                _patch(mod, kind, compile_safe)
                report.patched.append(ModuleEntry(name, cls, kind, _static_note(mod, kind)))
            elif reason:
                report.skipped.append(ModuleEntry(name, cls, "-", reason))
    if ema is not None:
        from jepa_engine.ema import EMA

        if isinstance(ema, EMA):
            report.ema = "jepa_engine.EMA: already one launch"
        else:
            report.ema = patch_model_ema(ema)
            patched = model.__dict__.setdefault(_MODEL_RECORD, [])
            if not any(e is ema for e in patched):
                patched.append(ema)
    return report


def restore(model: Any) -> None:
    """Undo :func:`accelerate` on ``model`` (every patched forward and changed attribute, and EMA
    objects patched through it), or :func:`patch_model_ema` on an EMA object. Idempotent."""
    if not isinstance(model, nn.Module):
        _restore_ema(model)
        return
    for mod in model.modules():
        if _RECORD in mod.__dict__:
            _unpatch(mod)
    for ema_obj in model.__dict__.pop(_MODEL_RECORD, []):
        _restore_ema(ema_obj)
