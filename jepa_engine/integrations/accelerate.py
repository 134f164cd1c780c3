"""Drop-in acceleration of an existing ViT / JEPA model: ``accelerate(model)``, ``restore(model)``,
``stats(model)`` and ``patch_model_ema(ema)`` (public as ``jepa_engine.accelerate`` / ``restore`` / ``stats``).

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

A module that picks SDPA by a flag that is off (V-JEPA 2 ``use_sdpa=False``, timm ``fused_attn=False``) is
switched to its SDPA branch only where both branches compute the same (scale 1/sqrt(head dim), no
attention dropout in either); otherwise it keeps its own code and is listed as skipped, with the reason
(:func:`jepa_engine.integrations.sdpa.flag_switch_reason`).

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

On CUDA the route table (``jepa_engine/kernels/routes.py``) decides each call too: where it gives the
call's class (mask kind, head dim, key count, dtype) to PyTorch, the patched module runs its original
computation (its own SDPA call, with the user's mask), so a patched model is never slower than the
original where the table has a measurement; the report states, per patched class of a model on a
CUDA device, which masks run the kernel, and :func:`stats` counts those calls as fallbacks.

Semantics differences, on purpose: a query row whose keys are all masked gives zeros (SDPA gives
NaN, or a uniform average for finite masks); ``ijepa`` forwards return ``None`` in place of the
attention weights.
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Optional

import torch
from torch import nn

from jepa_engine.integrations.detect import classify, static_note
from jepa_engine.integrations.patch import patch, unpatch
from jepa_engine.integrations.record import MODEL_RECORD, RECORD, AccelerationStats, ModuleStats
from jepa_engine.integrations.sdpa import _head_dim
from jepa_engine.kernels import routes
from jepa_engine.kernels.ema import ema_update_
from jepa_engine.kernels.precision import check_precision
from jepa_engine.training.ema import EMA

__all__ = ["AccelerationReport", "AccelerationStats", "accelerate", "restore", "stats", "patch_model_ema"]


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
    # patched class (of modules on a CUDA device) -> what the route table runs, by mask kind
    routes: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"jepa_engine.accelerate: {len(self.patched)} patched, {len(self.skipped)} skipped, "
                 f"{len(self.already)} already patched; ema: {self.ema}"]
        for title, rows in (("patched", self.patched), ("skipped", self.skipped), ("already", self.already)):
            for e in rows:
                lines.append(f"  {title:8s} {e.name or '<root>'} ({e.cls}) {e.kind} {e.reason}".rstrip())
        for cls, route in self.routes.items():
            lines.append(f"  route    {cls}: {route}")
        return "\n".join(lines)


def _route_note(mod: nn.Module) -> str:
    """For a patched module whose parameters are on a CUDA device: which calls the route table gives to
    the fused kernel and which to the module's own SDPA code (the faster one there), by mask kind."""
    p = next(mod.parameters(), None)
    head_dim = _head_dim(mod)
    if p is None or not p.is_cuda or head_dim is None:
        return ""
    dev = routes.device_class(p.device)
    return f"on {dev}, head dim {head_dim}, {p.dtype}: {routes.attention_summary(dev, head_dim, p.dtype)}"


def stats(model: nn.Module, *, reset: bool = False) -> AccelerationStats:
    """Per patched module of ``model``: calls that ran fused and calls that fell back (with why).

    A model whose attention is patched but every call falls back shows ``fused == 0`` here."""
    out = AccelerationStats()
    for name, mod in model.named_modules():
        rec = mod.__dict__.get(RECORD)
        if rec is None:
            continue
        out.modules[name] = ModuleStats(rec.kind, rec.fused, dict(rec.fallbacks))
        if reset:
            rec.fused, rec.fallbacks = 0, {}
    return out


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


def accelerate(model: nn.Module, *, attention: bool = True, ema: Any = None,
               compile_safe: bool = True, precision: Optional[str] = None) -> AccelerationReport:
    """Patch ``model`` in place to run its attention on the fused masked-attention op.

    Args:
        model: any ``nn.Module`` (a timm ViT, an I-JEPA / V-JEPA encoder or predictor, your own).
        attention: patch the attention modules (see the module docstring for what is recognised).
        ema: optionally an EMA to accelerate too: a timm ``ModelEmaV3``-style object (its ``update``
            becomes the one-launch EMA, see :func:`patch_model_ema`) or a :class:`jepa_engine.EMA`
            (already one launch; nothing to do).
        compile_safe: never inspect mask values under ``torch.compile`` (no graph break; masks
            that would need it fall back to SDPA / the original forward).
        precision: how the patched modules' fp32 products run. None (default): as torch's own setting
            says, as ``torch.nn.Linear`` does (``torch.set_float32_matmul_precision``: "highest" is IEEE
            fp32, "high" TF32 on CUDA; the attention kernel follows it). ``"fp32"`` / ``"tf32"``: that,
            whatever the global setting; ``"bf16"``: the patched modules run under bf16 autocast.

    Returns:
        An :class:`AccelerationReport`. Calling ``accelerate`` again is a no-op (modules already
        patched are listed under ``already``). :func:`restore` undoes everything.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate: model must be an nn.Module, got {type(model).__name__}")
    if precision is not None:
        check_precision("accelerate", precision)
    report = AccelerationReport()
    if attention:
        for name, mod in model.named_modules():
            cls = f"{type(mod).__module__}.{type(mod).__qualname__}"
            if RECORD in mod.__dict__:
                report.already.append(ModuleEntry(name, cls, mod.__dict__[RECORD].kind))
                continue
            kind, reason = classify(mod)
            if kind:
                patch(mod, kind, compile_safe, precision)
                report.patched.append(ModuleEntry(name, cls, kind, static_note(mod, kind)))
                note = _route_note(mod)
                if note:
                    report.routes.setdefault(cls, note)
            elif reason:
                report.skipped.append(ModuleEntry(name, cls, "-", reason))
    if ema is not None:
        if isinstance(ema, EMA):
            report.ema = "jepa_engine.EMA: already one launch"
        else:
            report.ema = patch_model_ema(ema)
            patched = model.__dict__.setdefault(MODEL_RECORD, [])
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
        if RECORD in mod.__dict__:
            unpatch(mod)
    for ema_obj in model.__dict__.pop(MODEL_RECORD, []):
        _restore_ema(ema_obj)
