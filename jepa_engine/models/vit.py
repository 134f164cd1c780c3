"""ViT encoder for JEPA: patch embedding, fixed 2-D sin-cos positions, pre-norm blocks on the fused
masked attention, final LayerNorm. Runs on all patches or on an index set of visible patches per
sample (padded, with a validity mask that becomes the attention key padding)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from jepa_engine.masks import apply_index
from jepa_engine.config import ConfigIO
from jepa_engine.models.blocks import (Block, drop_path_rates, init_weights, rescale_residual_weights,
                                      sincos_pos_embed_2d)

__all__ = ["ViTConfig", "VisionTransformer", "VIT_PRESETS"]

# name -> (embed_dim, depth, num_heads). tiny trains on 2 CPU cores in minutes; small = ViT-S; base = ViT-B.
VIT_PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (128, 4, 4),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
}


@dataclass
class ViTConfig(ConfigIO):
    img_size: int = 64
    patch_size: int = 8
    in_chans: int = 1
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path: float = 0.0

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"ViTConfig: img_size must be divisible by patch_size, got {self.img_size} "
                             f"and {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"ViTConfig: embed_dim must be divisible by num_heads, got {self.embed_dim} "
                             f"and {self.num_heads}")
        if self.embed_dim % 4:
            raise ValueError(f"ViTConfig: embed_dim must be divisible by 4 (2-D sin-cos), got {self.embed_dim}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ViTConfig":
        """A preset (``"tiny"``, ``"small"``, ``"base"``), with any field overridden (e.g. ``in_chans=3``)."""
        if name not in VIT_PRESETS:
            raise ValueError(f"ViTConfig.from_name: name must be one of {sorted(VIT_PRESETS)}, got {name!r}")
        embed_dim, depth, num_heads = VIT_PRESETS[name]
        return cls(**{**dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads), **overrides})

    @property
    def grid(self) -> tuple[int, int]:
        side = self.img_size // self.patch_size
        return (side, side)

    @property
    def num_patches(self) -> int:
        h, w = self.grid
        return h * w


class VisionTransformer(nn.Module):
    """``forward(x [B, C, H, W], index [B, K] | None, valid [B, K] | None) -> [B, K or N, D]``.

    With ``index`` (flat patch indices, as :class:`jepa_engine.masks.MaskBatch` gives them) only those
    tokens are kept, and ``valid`` (True = real entry) is the key padding of every attention layer, so
    padded entries are never attended; their output rows are unspecified (callers mask them).
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.patch_embed = nn.Conv2d(cfg.in_chans, D, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(D, cfg.grid)[None], persistent=False)  # [1, N, D]
        rates = drop_path_rates(cfg.drop_path, cfg.depth)
        self.blocks = nn.ModuleList(
            Block(D, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, drop_path=r) for r in rates)
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.apply(init_weights)
        rescale_residual_weights(self.blocks)

    @property
    def grid(self) -> tuple[int, int]:
        return self.cfg.grid

    @property
    def num_patches(self) -> int:
        return self.cfg.num_patches

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    def forward(self, x: torch.Tensor, index: Optional[torch.Tensor] = None,
                valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        cfg = self.cfg
        if x.dim() != 4 or x.shape[1] != cfg.in_chans or tuple(x.shape[2:]) != (cfg.img_size, cfg.img_size):
            raise ValueError(f"VisionTransformer: x must be [B, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size}], "
                             f"got {tuple(x.shape)}")
        if valid is not None and index is None:
            raise ValueError("VisionTransformer: valid needs index (it marks the real entries of index)")
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, D]
        tokens = tokens + self.pos_embed.to(tokens.dtype)
        key_padding = None
        if index is not None:
            if valid is not None and valid.shape != index.shape:
                raise ValueError(f"VisionTransformer: valid must be [B, K] = {list(index.shape)}, "
                                 f"got {list(valid.shape)}")
            tokens = apply_index(tokens, index)  # [B, K, D]
            key_padding = valid.bool() if valid is not None else None
        for block in self.blocks:
            tokens = block(tokens, key_padding=key_padding)
        return self.norm(tokens)
