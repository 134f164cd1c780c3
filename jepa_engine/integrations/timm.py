"""timm's ``Attention`` (ViT, DeiT, ...; q/k norm, optional ``norm`` and ``gate``): its recogniser and the
fused forward that replaces it, keeping ``forward(x, attn_mask=None, is_causal=False) -> x``."""
from __future__ import annotations

from typing import Optional

from torch import nn

from jepa_engine.integrations.masks import call_plan
from jepa_engine.kernels.masked_attention import masked_attention


def recognise(mod: nn.Module, params: list[str]) -> Optional[tuple[int, str]]:
    """``(head_dim, reason)`` when ``mod`` (with ``qkv``, ``proj``, ``num_heads``) has the form of timm's
    ``Attention`` (``reason`` non-empty when its widths do not add up), None otherwise."""
    if not (hasattr(mod, "q_norm") and hasattr(mod, "k_norm") and params[:3] == ["self", "x", "attn_mask"]
            and isinstance(getattr(mod, "head_dim", None), int)
            and isinstance(getattr(mod, "attn_drop", None), nn.Dropout)):
        return None
    dim_qkv = mod.qkv.out_features
    if dim_qkv != 3 * mod.num_heads * mod.head_dim:
        return mod.head_dim, f"qkv width {dim_qkv} != 3 * num_heads * head_dim"
    return mod.head_dim, ""


def forward(self, rec, x, attn_mask=None, is_causal=False, **kwargs):
    plan, reason = call_plan(self, rec, x, attn_mask, is_causal=is_causal,
                             reason=f"keyword arguments {sorted(kwargs)}" if kwargs else "")
    if reason:
        if is_causal:
            kwargs["is_causal"] = True
        return type(self).forward(self, x, attn_mask, **kwargs)  # older timm has no is_causal argument
    B, N, _ = x.shape
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
