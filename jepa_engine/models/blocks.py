"""What the encoder and the predictor share: the pre-norm transformer block, the fixed 2-D sin-cos
position table, stochastic depth and the I-JEPA weight initialisation."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from jepa_engine.nn import MaskedSelfAttention

__all__ = ["Block", "DropPath", "Mlp", "drop_path_rates", "sincos_pos_embed_2d", "init_weights",
           "rescale_residual_weights"]


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """``pos [M]`` -> ``[M, dim]``: ``[sin(pos * w_i), cos(pos * w_i)]`` with ``w_i = 10000^(-i / (dim/2))``."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.double()[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sin-cos positions, fp32 ``[h * w, dim]`` in row-major patch order (flat index
    ``r * w + c``): the first half of the features encodes the row, the second half the column."""
    if dim % 4:
        raise ValueError(f"sincos_pos_embed_2d: dim must be divisible by 4, got {dim}")
    h, w = grid
    rows = torch.arange(h).repeat_interleave(w)  # [h*w]: r of each flat index
    cols = torch.arange(w).repeat(h)             # [h*w]: c of each flat index
    return torch.cat([_sincos_1d(dim // 2, rows), _sincos_1d(dim // 2, cols)], dim=1).float()


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic-depth rate of each block: linear from 0 to ``rate`` (plain floats, so models can be
    built on the meta device)."""
    return [rate * i / max(depth - 1, 1) for i in range(depth)]


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample with probability ``p`` (training)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    ``forward(x [B, N, dim], key_padding bool [B, N] | None)``: keys where ``key_padding`` is False
    are never attended (their own output rows are computed but meaningless).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MaskedSelfAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, key_padding: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), key_padding=key_padding))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """I-JEPA initialisation (use with ``model.apply``): truncated normal ``std`` for Linear and Conv2d
    weights, zero biases, LayerNorm weight 1 and bias 0."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=std)  # cut at +-2 (absolute), as I-JEPA
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def rescale_residual_weights(blocks: nn.ModuleList) -> None:
    """I-JEPA's depth scaling: the output projections of block ``i`` (1-based) are divided by
    ``sqrt(2 i)`` so the residual stream's variance does not grow with depth."""
    with torch.no_grad():
        for i, block in enumerate(blocks, start=1):
            block.attn.proj.weight.div_(math.sqrt(2.0 * i))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * i))
