"""I-JEPA predictor: a narrow ViT that predicts the encoder's embeddings at target positions from the
context embeddings.

    ctx [B, Kc, D_enc] --Linear--> [B, Kc, D_p] + pos[ctx_index]          (context tokens)
    mask_token [D_p] + pos[target_index]              -> [B, Kt, D_p]      (one query per target patch)
    [context | targets] -> blocks (key padding: ctx_valid | target_valid) -> LayerNorm
    target rows --Linear--> [B, Kt, D_enc]

All target patches of a sample (the union of its blocks) are predicted in one pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from jepa_engine.config import ConfigIO
from jepa_engine.models.blocks import (Block, drop_path_rates, init_weights, rescale_residual_weights,
                                      sincos_pos_embed_2d)
from jepa_engine.models.vit import VIT_PRESETS, ViTConfig

__all__ = ["PredictorConfig", "Predictor", "PREDICTOR_PRESETS"]

# encoder preset -> (predictor_dim, depth, num_heads)
PREDICTOR_PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (64, 3, 4),
    "small": (192, 6, 6),
    "base": (384, 12, 12),
}


@dataclass
class PredictorConfig(ConfigIO):
    embed_dim: int = 128          # the encoder's width (input and output of the predictor)
    predictor_dim: int = 64       # the predictor's own (narrow) width
    depth: int = 3
    num_heads: int = 4
    mlp_ratio: float = 4.0
    grid: tuple[int, int] = (8, 8)
    qkv_bias: bool = True
    drop_path: float = 0.0

    def __post_init__(self):
        self.grid = tuple(self.grid)
        if self.predictor_dim % self.num_heads:
            raise ValueError(f"PredictorConfig: predictor_dim must be divisible by num_heads, got "
                             f"{self.predictor_dim} and {self.num_heads}")
        if self.predictor_dim % 4:
            raise ValueError(f"PredictorConfig: predictor_dim must be divisible by 4 (2-D sin-cos), got "
                             f"{self.predictor_dim}")

    @classmethod
    def for_encoder(cls, vit_cfg: ViTConfig, name: Optional[str] = None, **overrides) -> "PredictorConfig":
        """The preset predictor for an encoder config. ``name`` defaults to the encoder preset whose
        (embed_dim, depth, num_heads) match ``vit_cfg``."""
        if name is None:
            shape = (vit_cfg.embed_dim, vit_cfg.depth, vit_cfg.num_heads)
            matches = [n for n, p in VIT_PRESETS.items() if p == shape]
            if not matches:
                raise ValueError(f"PredictorConfig.for_encoder: no preset matches the encoder "
                                 f"(embed_dim, depth, num_heads) = {shape}; pass name= one of "
                                 f"{sorted(PREDICTOR_PRESETS)}")
            name = matches[0]
        if name not in PREDICTOR_PRESETS:
            raise ValueError(f"PredictorConfig.for_encoder: name must be one of {sorted(PREDICTOR_PRESETS)}, "
                             f"got {name!r}")
        predictor_dim, depth, num_heads = PREDICTOR_PRESETS[name]
        base = dict(embed_dim=vit_cfg.embed_dim, predictor_dim=predictor_dim, depth=depth, num_heads=num_heads,
                    mlp_ratio=vit_cfg.mlp_ratio, grid=vit_cfg.grid, qkv_bias=vit_cfg.qkv_bias)
        return cls(**{**base, **overrides})

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


def _check_pair(name: str, index: torch.Tensor, valid: torch.Tensor, B: int) -> None:
    if index.dim() != 2 or index.shape[0] != B:
        raise ValueError(f"Predictor: {name}_index must be [B, K] with B = {B}, got {list(index.shape)}")
    if valid.shape != index.shape:
        raise ValueError(f"Predictor: {name}_valid must be {list(index.shape)}, got {list(valid.shape)}")


class Predictor(nn.Module):
    """``forward(ctx [B, Kc, D_enc], ctx_index [B, Kc], ctx_valid [B, Kc], target_index [B, Kt],
    target_valid [B, Kt]) -> [B, Kt, D_enc]``: predictions at the target positions (padded target rows
    are unspecified). Invalid context and target entries are never attended."""

    def __init__(self, cfg: PredictorConfig):
        super().__init__()
        self.cfg = cfg
        Dp = cfg.predictor_dim
        self.predictor_embed = nn.Linear(cfg.embed_dim, Dp)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dp))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(Dp, cfg.grid), persistent=False)  # [N, Dp]
        rates = drop_path_rates(cfg.drop_path, cfg.depth)
        self.blocks = nn.ModuleList(
            Block(Dp, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, drop_path=r) for r in rates)
        self.norm = nn.LayerNorm(Dp, eps=1e-6)
        self.predictor_proj = nn.Linear(Dp, cfg.embed_dim)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        rescale_residual_weights(self.blocks)

    def forward(self, ctx: torch.Tensor, ctx_index: torch.Tensor, ctx_valid: torch.Tensor,
                target_index: torch.Tensor, target_valid: torch.Tensor) -> torch.Tensor:
        if ctx.dim() != 3 or ctx.shape[-1] != self.cfg.embed_dim:
            raise ValueError(f"Predictor: ctx must be [B, Kc, {self.cfg.embed_dim}], got {list(ctx.shape)}")
        B, Kc, _ = ctx.shape
        _check_pair("ctx", ctx_index, ctx_valid, B)
        _check_pair("target", target_index, target_valid, B)
        if ctx_index.shape[1] != Kc:
            raise ValueError(f"Predictor: ctx_index must be [B, Kc] = [{B}, {Kc}], got {list(ctx_index.shape)}")
        x = self.predictor_embed(ctx)                               # [B, Kc, Dp]
        pos = self.pos_embed.to(x.dtype)
        x = x + pos[ctx_index.long()]
        queries = self.mask_token.to(x.dtype) + pos[target_index.long()]  # [B, Kt, Dp]
        x = torch.cat([x, queries], dim=1)                          # [B, Kc + Kt, Dp]
        key_padding = torch.cat([ctx_valid.bool(), target_valid.bool()], dim=1)
        for block in self.blocks:
            x = block(x, key_padding=key_padding)
        x = self.norm(x[:, Kc:])
        return self.predictor_proj(x)
