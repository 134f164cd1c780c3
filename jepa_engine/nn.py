"""Neural-network modules built on the fused kernels (the layer between the kernels and the models)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from jepa_engine.kernels.masked_attention import masked_attention


class MaskedSelfAttention(nn.Module):
    """Multi-head self-attention over JEPA masks, running the fused ``masked_attention`` op.

    Parameters are named like the ViT attention block of timm and I-JEPA (``qkv``: one Linear
    ``dim -> 3 * dim``, ``proj``: ``dim -> dim``), so their checkpoints load unchanged.

    ``forward(x)`` takes ``x [B, N, dim]`` (or packed ``[T, dim]`` with ``cu_seqlens``) and the mask
    arguments of :func:`jepa_engine.kernels.masked_attention` and returns the same shape as ``x``.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, proj_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"MaskedSelfAttention: dim must be divisible by num_heads, got {dim} and {num_heads}")
        if attn_drop != 0.0:
            raise ValueError(f"MaskedSelfAttention: attn_drop must be 0.0 (not implemented), got {attn_drop}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale if qk_scale is not None else self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, *, key_padding: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
                frame_size: Optional[int] = None, frame_extra_tokens: int = 0,
                keep_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        H, Dh = self.num_heads, self.head_dim
        if cu_seqlens is not None:
            T, C = x.shape
            q, k, v = self.qkv(x).view(T, 3, H, Dh).unbind(1)  # each [T, H, Dh], strided views
            out = masked_attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, frame_size=frame_size,
                                   frame_extra_tokens=frame_extra_tokens, scale=self.scale)
            out = out.reshape(T, C)
        else:
            B, N, C = x.shape
            q, k, v = self.qkv(x).view(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, Dh] views
            out = masked_attention(q, k, v, key_padding=key_padding, frame_size=frame_size,
                                   frame_extra_tokens=frame_extra_tokens, keep_index=keep_index, scale=self.scale)
            out = out.transpose(1, 2).reshape(B, N, C)  # free: the op writes [B, N, H, Dh] memory
        return self.proj_drop(self.proj(out))
