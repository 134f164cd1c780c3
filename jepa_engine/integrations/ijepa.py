"""The official I-JEPA / V-JEPA ViT ``Attention`` (``forward(x[, mask])`` returning ``x, attn``): its
recogniser and the fused forward that replaces it (returns ``(x, None)``: the weights are not computed;
``need_weights=True`` runs the original forward)."""
from __future__ import annotations

import inspect
from typing import Optional

from torch import nn

from jepa_engine.integrations.masks import call_plan
from jepa_engine.kernels.masked_attention import masked_attention


def recognise(mod: nn.Module, params: list[str]) -> Optional[tuple[int, str]]:
    """``(head_dim, reason)`` when ``mod`` (with ``qkv``, ``proj``, ``num_heads``) has the form of the
    I-JEPA ``Attention`` (``reason`` non-empty when its widths do not add up), None otherwise."""
    if (hasattr(mod, "q_norm") or params not in (["self", "x"], ["self", "x", "mask"])
            or not hasattr(mod, "scale") or not isinstance(getattr(mod, "attn_drop", None), nn.Dropout)):
        return None
    try:
        src = inspect.getsource(type(mod).forward)
    except (OSError, TypeError):
        src = ""
    if "return x, attn" not in src.replace("(", "").replace(")", ""):
        return None
    C, heads, dim_qkv = mod.qkv.in_features, mod.num_heads, mod.qkv.out_features
    if dim_qkv != 3 * C or C % heads:
        return C // heads, f"qkv width {dim_qkv} != 3 * dim {C} (or dim not divisible by num_heads)"
    return C // heads, ""


def forward(self, rec, x, mask=None, *, need_weights: bool = False):
    plan, reason = call_plan(self, rec, x, mask, reason="need_weights=True" if need_weights else "")
    if reason:
        return type(self).forward(self, *((x,) if mask is None else (x, mask)))
    B, N, C = x.shape
    H = self.num_heads
    q, k, v = self.qkv(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
    out = masked_attention(q, k, v, scale=self.scale, **plan.kwargs())
    out = out.transpose(1, 2).reshape(B, N, C)
    return self.proj_drop(self.proj(out)), None
