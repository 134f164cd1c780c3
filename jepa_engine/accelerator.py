"""Drop-in acceleration of an existing ViT / JEPA model: ``accelerate(model)`` and ``restore(model)``.

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
``sdpa``        a class ``forward`` whose code calls                           unchanged: the module's own
                ``F.scaled_dot_product_attention`` (``F`` any global bound to   forward runs, its SDPA calls
                ``torch.nn.functional``) or a global bound to the SDPA         go to the fused op
                function itself (V-JEPA 2 ``RoPEAttention`` style)
==============  ==========================================================  ==========================

Per call, a patched module falls back to what it did before (the class forward, or real SDPA)
whenever the fused op cannot compute the same thing: attention dropout in training, ``is_causal``,
GQA, a head dim outside (16, 32, 64, 96, 128), or a mask that is not key padding. ``ijepa`` modules
called with ``need_weights=True`` run the original forward and return the real weights.

Masks are accepted in the user's format and converted once to key padding (bool ``[B, N_k]``,
True = visible):

- bool ``[B, N_k]`` (in ``timm``/``ijepa`` forwards: key padding, as I-JEPA code passes it);
- bool or additive (0 / -inf) masks broadcastable to ``[B, H, N_q, N_k]`` (SDPA's convention) whose
  query and head axes have size 1 (``[B, 1, 1, N_k]``): converted by a view, no host sync;
- full ``[B, H?, N_q, N_k]`` masks and additive masks: their values are inspected once (one host
  synchronisation per mask tensor, cached by identity across the blocks of one forward); when every
  query row and head is the same and additive values are only 0 and -inf, they are key padding;
  otherwise the call falls back to real SDPA (or the class forward);
- a list of index tensors (I-JEPA ``masks``: kept patch indices, each ``[B, K_i]``): the union of
  the kept positions becomes the visible keys.

Under ``torch.compile`` nothing is inspected (``compile_safe=True``): masks whose query/head axes
have size 1 convert by a view, everything else falls back, so ``fullgraph=True`` traces with no graph
break. ``compile_safe=False`` inspects full masks while compiling too (graph breaks).

Semantics differences, on purpose: a query row whose keys are all masked gives zeros (SDPA gives
NaN); ``ijepa`` forwards return ``None`` in place of the attention weights.
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
import types
import weakref
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from jepa_engine.kernels.masked_attention import HEAD_DIMS, masked_attention

__all__ = ["AccelerationReport", "accelerate", "restore", "patch_model_ema", "to_key_padding"]

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
    were ``already`` patched by an earlier call, and what happened to the EMA (``ema``)."""

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
# Masks: the user's format -> key padding
# --------------------------------------------------------------------------------------------------
class _Unsupported(Exception):
    """The mask is not expressible as key padding (the caller falls back)."""


def _inspect_allowed(compile_safe: bool) -> bool:
    return not torch.compiler.is_compiling() or not compile_safe


def _kp_from_4d(m: torch.Tensor, B: int, N_q: int, N_k: int, inspect_values: bool) -> torch.Tensor:
    """``m`` bool ``[b, h, n_q, N_k]`` (SDPA broadcasting) -> ``[B, N_k]``."""
    if m.shape[-1] != N_k or m.shape[0] not in (1, B) or m.shape[2] not in (1, N_q):
        raise _Unsupported(f"mask shape {tuple(m.shape)} does not broadcast to [{B}, H, {N_q}, {N_k}]")
    if m.shape[1] != 1 or m.shape[2] != 1:
        if not inspect_values:
            raise _Unsupported("a mask varying over queries or heads is not inspected under torch.compile")
        first = m[:, :1, :1, :]
        if not bool((m == first).all()):
            raise _Unsupported("the mask differs between query rows or heads (not key padding)")
        m = first
    return m[:, 0, 0, :].expand(B, N_k)


def _convert(mask: Any, B: int, N_q: int, N_k: int, device: torch.device, *, user_format: bool,
             inspect_values: bool) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    if isinstance(mask, (list, tuple)):  # I-JEPA masks: kept indices, each [B, K_i]
        kp = torch.zeros(B, N_k, dtype=torch.bool, device=device)
        for idx in mask:
            if not torch.is_tensor(idx) or idx.dim() != 2 or idx.shape[0] != B:
                raise _Unsupported(f"index masks must be [B, K] = [{B}, K] tensors")
            kp.scatter_(1, idx.to(device=device, dtype=torch.long), True)
        return kp
    if not torch.is_tensor(mask):
        raise _Unsupported(f"mask of type {type(mask).__name__}")
    if mask.dtype != torch.bool:
        if not mask.is_floating_point():
            raise _Unsupported(f"mask dtype {mask.dtype}")
        if not inspect_values:
            raise _Unsupported("additive masks are not inspected under torch.compile")
        ninf = mask == float("-inf")
        if not bool((ninf | (mask == 0)).all()):
            raise _Unsupported("the additive mask has values other than 0 and -inf (a bias, not a mask)")
        mask = ~ninf
    if user_format and mask.dim() == 2 and tuple(mask.shape) == (B, N_k):
        kp = mask
    else:
        if mask.dim() > 4:
            raise _Unsupported(f"mask with {mask.dim()} dims")
        m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        kp = _kp_from_4d(m, B, N_q, N_k, inspect_values)
    return kp.to(device).contiguous()


class _MaskCache:
    """One entry: the last mask object seen in eager mode and its key padding, so a model passing the
    same mask to every block converts (and inspects) it once per forward."""

    def __init__(self):
        self.key = None

    @staticmethod
    def _fingerprint(mask, B, N_q, N_k):
        items = mask if isinstance(mask, (list, tuple)) else (mask,)
        return (id(mask), B, N_q, N_k) + tuple((id(t), getattr(t, "_version", 0)) for t in items)

    def get(self, mask, B, N_q, N_k, device, user_format):
        key = self._fingerprint(mask, B, N_q, N_k) + (user_format, device)
        if self.key == key and self.ref is mask:
            return self.value
        value = _convert(mask, B, N_q, N_k, device, user_format=user_format, inspect_values=True)
        self.key, self.ref, self.value = key, mask, value
        return value


_CACHE = _MaskCache()


def to_key_padding(mask: Any, batch: int, num_queries: int, num_keys: int, *,
                   device: Optional[torch.device] = None, user_format: bool = True) -> Optional[torch.Tensor]:
    """Convert a mask in any supported format (see the module docstring) to bool key padding
    ``[batch, num_keys]`` (True = visible), or ``None`` for no mask.

    Raises ``ValueError`` when the mask is not expressible as key padding.
    """
    device = device or (mask.device if torch.is_tensor(mask) else torch.device("cpu"))
    try:
        return _convert(mask, batch, num_queries, num_keys, torch.device(device), user_format=user_format,
                        inspect_values=True)
    except _Unsupported as e:
        raise ValueError(f"to_key_padding: mask is not expressible as key padding: {e}") from None


def _key_padding(mask, B, N_q, N_k, device, *, user_format: bool, compile_safe: bool):
    """Key padding or raise _Unsupported; cached by identity in eager mode."""
    if mask is None:
        return None
    if torch.compiler.is_compiling():
        return _convert(mask, B, N_q, N_k, device, user_format=user_format, inspect_values=not compile_safe)
    return _CACHE.get(mask, B, N_q, N_k, device, user_format)


# --------------------------------------------------------------------------------------------------
# The fused SDPA route (used by the "sdpa" patch)
# --------------------------------------------------------------------------------------------------
def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False, *, _compile_safe: bool = True):
    """``F.scaled_dot_product_attention`` with the same arguments, computed by ``masked_attention``
    where that is the same computation; real SDPA otherwise."""
    args = (query, key, value)
    ok = (not is_causal and not enable_gqa and dropout_p == 0.0 and query.dim() == 4 and key.dim() == 4
          and value.dim() == 4 and query.shape[-1] in HEAD_DIMS and query.shape[-1] == key.shape[-1]
          and value.shape[-1] == query.shape[-1] and query.shape[:2] == key.shape[:2] == value.shape[:2]
          and key.shape[2] == value.shape[2] and query.dtype == key.dtype == value.dtype
          and query.dtype in (torch.float32, torch.float16, torch.bfloat16))
    if ok:
        B, _, N_q, _ = query.shape
        try:
            kp = _key_padding(attn_mask, B, N_q, key.shape[2], query.device, user_format=False,
                              compile_safe=_compile_safe)
        except _Unsupported:
            ok = False
    if not ok:
        return _REAL_SDPA(*args, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                          enable_gqa=enable_gqa)
    return masked_attention(query, key, value, key_padding=kp, scale=scale)


def _fused_sdpa_compile_unsafe(*args, **kwargs):
    return _fused_sdpa(*args, _compile_safe=False, **kwargs)


def _routed_functional(compile_safe: bool) -> types.ModuleType:
    """A stand-in for ``torch.nn.functional`` whose SDPA is :func:`_fused_sdpa` (everything else is
    torch's own function objects)."""
    name = f"jepa_engine.accelerator.functional_{'safe' if compile_safe else 'unsafe'}"
    mod = sys.modules[name] = types.ModuleType(name)
    mod.__dict__.update({k: v for k, v in vars(F).items() if not k.startswith("__")})
    setattr(mod, _SDPA_NAME, _fused_sdpa if compile_safe else _fused_sdpa_compile_unsafe)
    return mod


_ROUTED_F = {True: _routed_functional(True), False: _routed_functional(False)}


def _routed_globals(orig: dict, aliases: dict[str, str], compile_safe: bool) -> dict:
    """The globals of a rerouted forward: a copy of its module's globals with the SDPA aliases bound to
    the routed versions, kept as the namespace of a module registered in ``sys.modules`` (torch.compile
    looks globals up by ``__name__``, so the copy must not pose as the original module)."""
    name = f"jepa_engine.accelerator._routed_{'safe' if compile_safe else 'unsafe'}.{orig.get('__name__', 'anon')}"
    mod = sys.modules.get(name)
    if mod is None:
        mod = sys.modules[name] = types.ModuleType(name)
    g = mod.__dict__
    g.update({k: v for k, v in orig.items() if k not in ("__name__", "__spec__", "__loader__")})
    routed = _ROUTED_F[compile_safe]
    for alias, what in aliases.items():
        g[alias] = routed if what == "module" else getattr(routed, _SDPA_NAME)
    return g


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _code_names(c)
    return names


def _sdpa_aliases(fn) -> tuple[dict[str, str], str]:
    """Global names of ``fn`` that reach SDPA: {name: "module" | "function"}, and a reason when the
    code names SDPA but through nothing we can reroute."""
    names = _code_names(fn.__code__)
    if _SDPA_NAME not in names:
        return {}, ""
    aliases = {}
    for name in names:
        obj = fn.__globals__.get(name)
        if obj is F:
            aliases[name] = "module"
        elif obj is _REAL_SDPA:
            aliases[name] = "function"
    if not aliases:
        return {}, ("forward calls scaled_dot_product_attention, but not through a global bound to "
                    "torch.nn.functional or to the function (e.g. torch.nn.functional.<...> chains)")
    return aliases, ""


# --------------------------------------------------------------------------------------------------
# Fused forwards (bound to the module instance)
# --------------------------------------------------------------------------------------------------
def _timm_forward(self, x, attn_mask=None, is_causal=False, **kwargs):
    patch = self._jepa_engine_patch
    if kwargs or is_causal or x.dim() != 3 or (self.training and self.attn_drop.p > 0):
        if is_causal:
            kwargs["is_causal"] = True
        return patch.original(x, attn_mask, **kwargs)  # older timm has no is_causal argument
    B, N, _ = x.shape
    try:
        kp = _key_padding(attn_mask, B, N, N, x.device, user_format=True, compile_safe=patch.compile_safe)
    except _Unsupported:
        return patch.original(x, attn_mask)
    H, Dh = self.num_heads, self.head_dim
    gate = getattr(self, "gate", None)
    g = gate(x).sigmoid() if gate is not None else None
    q, k, v = self.qkv(x).reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, Dh] views
    q, k = self.q_norm(q), self.k_norm(k)
    out = masked_attention(q, k, v, key_padding=kp, scale=self.scale)
    out = out.transpose(1, 2).reshape(B, N, H * Dh)  # free: the op writes [B, N, H, Dh] memory
    norm = getattr(self, "norm", None)
    if norm is not None:
        out = norm(out)
    if g is not None:
        out = out * g
    return self.proj_drop(self.proj(out))


def _ijepa_forward(self, x, mask=None, *, need_weights: bool = False):
    patch = self._jepa_engine_patch
    orig_args = (x,) if mask is None else (x, mask)
    if need_weights or x.dim() != 3 or (self.training and self.attn_drop.p > 0):
        return patch.original(*orig_args)
    B, N, C = x.shape
    try:
        kp = _key_padding(mask, B, N, N, x.device, user_format=True, compile_safe=patch.compile_safe)
    except _Unsupported:
        return patch.original(*orig_args)
    H = self.num_heads
    q, k, v = self.qkv(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
    out = masked_attention(q, k, v, key_padding=kp, scale=self.scale)
    out = out.transpose(1, 2).reshape(B, N, C)
    return self.proj_drop(self.proj(out)), None


# --------------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Patch:
    kind: str
    original: Any               # the class's bound forward (the fallback path)
    compile_safe: bool
    changed_attrs: dict         # attribute -> value before the patch


def _forward_params(fn) -> list[str]:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []


def _head_dim_reason(head_dim: int) -> str:
    if head_dim not in HEAD_DIMS:
        return f"head dim {head_dim} is not one of the fused kernel's {HEAD_DIMS}"
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


def _patch(mod: nn.Module, kind: str, compile_safe: bool) -> None:
    changed = {}
    if kind == "sdpa":
        fwd = type(mod).forward
        aliases, _ = _sdpa_aliases(fwd)
        g = _routed_globals(fwd.__globals__, aliases, compile_safe)
        new = types.FunctionType(fwd.__code__, g, fwd.__name__, fwd.__defaults__, fwd.__closure__)
        new.__kwdefaults__ = fwd.__kwdefaults__
        new.__qualname__ = fwd.__qualname__
        # Modules that pick SDPA with a flag (timm's fused_attn, V-JEPA's use_sdpa) take the SDPA path.
        for flag in ("fused_attn", "use_sdpa"):
            if getattr(mod, flag, True) is False:
                changed[flag] = mod.__dict__.get(flag, _MISSING)
                object.__setattr__(mod, flag, True)
    else:
        new = _timm_forward if kind == "timm" else _ijepa_forward
    record = _Patch(kind, mod.forward, compile_safe, changed)
    mod.__dict__[_RECORD] = record
    mod.__dict__["forward"] = types.MethodType(new, mod)


_MISSING = object()


def _unpatch(mod: nn.Module) -> None:
    record = mod.__dict__.pop(_RECORD)
    mod.__dict__.pop("forward", None)
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
                report.patched.append(ModuleEntry(name, cls, kind))
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
