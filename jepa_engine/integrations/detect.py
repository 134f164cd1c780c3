"""Which modules ``accelerate`` patches and as what kind (timm, ijepa, sdpa), why the others are skipped,
and what the report can tell about a patched module before any call."""
from __future__ import annotations

import inspect

from torch import nn

from jepa_engine.integrations.ijepa import recognise as recognise_ijepa
from jepa_engine.integrations.sdpa import flag_switch_reason, sdpa_aliases
from jepa_engine.integrations.timm import recognise as recognise_timm
from jepa_engine.kernels.masked_attention import MAX_HEAD_DIM, supports_head_dim
from jepa_engine.nn import MaskedSelfAttention

# First match wins: timm's form is tried before the I-JEPA one.
_RECOGNISERS = (("timm", recognise_timm), ("ijepa", recognise_ijepa))


def _forward_params(fn) -> list[str]:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []


def _head_dim_reason(head_dim: int) -> str:
    if not supports_head_dim(head_dim):
        return f"head dim {head_dim} is outside the fused kernel's 1..{MAX_HEAD_DIM}"
    return ""


def classify(mod: nn.Module) -> tuple[str, str]:
    """(kind, "") for a module we patch, ("", reason) otherwise (reason "" = not attention-like)."""
    cls = type(mod)
    if isinstance(mod, MaskedSelfAttention):
        return "", "already runs the fused masked_attention op (jepa_engine.nn.MaskedSelfAttention)"
    if "forward" in mod.__dict__:
        return "", "its forward was replaced on the instance by other code; left alone"
    fwd = cls.forward
    has_qkv = isinstance(getattr(mod, "qkv", None), nn.Linear) and isinstance(getattr(mod, "proj", None), nn.Module)
    heads = getattr(mod, "num_heads", None)
    if has_qkv and isinstance(heads, int) and heads > 0:
        params = _forward_params(fwd)
        for kind, recognise in _RECOGNISERS:
            match = recognise(mod, params)
            if match is not None:
                head_dim, reason = match
                reason = reason or _head_dim_reason(head_dim)
                return ("", reason) if reason else (kind, "")
    aliases, reason = sdpa_aliases(fwd)
    if aliases:
        head_dim = getattr(mod, "head_dim", None)
        if isinstance(head_dim, int) and _head_dim_reason(head_dim):
            return "", _head_dim_reason(head_dim)
        reason = flag_switch_reason(mod)
        return ("", reason) if reason else ("sdpa", "")
    if reason:
        return "", reason
    name = cls.__name__.lower()
    if isinstance(mod, nn.MultiheadAttention):
        return "", "torch.nn.MultiheadAttention (its forward calls F.multi_head_attention_forward; not routed)"
    if "attention" in name or "attn" in name or (has_qkv and heads):
        return "", ("attention-like but unrecognised: forward matches neither timm's Attention nor the "
                    "I-JEPA (x, attn) form and does not call F.scaled_dot_product_attention")
    return "", ""


def static_note(mod: nn.Module, kind: str) -> str:
    """What the report can tell before any call: conditions under which calls will fall back."""
    notes = []
    drop = getattr(mod, "attn_drop", None)
    if kind != "sdpa" and isinstance(drop, nn.Dropout) and drop.p > 0:
        notes.append(f"falls back while training (attention dropout p={drop.p})")
    p = getattr(mod, "proj_drop_prob", None) if kind == "sdpa" else None
    if isinstance(p, float) and p > 0:
        notes.append(f"falls back if it passes dropout_p={p} to SDPA")
    return "fused" + (f"; {'; '.join(notes)}" if notes else "")
