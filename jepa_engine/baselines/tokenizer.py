"""`ActionTokenizer`: continuous actions <-> integer tokens by uniform binning of each dimension.

Each action dimension is clipped to [low, high] and split into `bins` equal bins of width
w = (high - low) / bins. encode(a) = floor((a - low) / w), clamped to [0, bins - 1] (so `high`
itself falls in the last bin); decode(k) = low + (k + 0.5) * w, the bin centre. A round trip is
therefore within w / 2 of the clipped action. Token ids are the bin index (the decoder's vocabulary
puts action bins first); an action sequence [..., H, A] becomes H * A tokens in step-major order.
"""
from __future__ import annotations

import torch


class ActionTokenizer:
    def __init__(self, bins: int, low: float = -1.0, high: float = 1.0, action_dim: int = 2):
        if not (isinstance(bins, int) and bins >= 2):
            raise ValueError(f"ActionTokenizer: bins must be an int >= 2, got {bins!r}")
        if not low < high:
            raise ValueError(f"ActionTokenizer: high must be > low = {low}, got {high!r}")
        if not (isinstance(action_dim, int) and action_dim >= 1):
            raise ValueError(f"ActionTokenizer: action_dim must be an int >= 1, got {action_dim!r}")
        self.bins, self.low, self.high, self.action_dim = bins, float(low), float(high), action_dim
        self.width = (self.high - self.low) / bins

    @classmethod
    def from_config(cls, cfg) -> "ActionTokenizer":
        return cls(cfg.bins, cfg.low, cfg.high, cfg.action_dim)

    def encode(self, actions: torch.Tensor) -> torch.Tensor:
        """actions [..., H, A] float -> tokens [..., H * A] int64 in [0, bins)."""
        if actions.shape[-1] != self.action_dim:
            raise ValueError(f"ActionTokenizer.encode: actions must be [..., H, {self.action_dim}], "
                             f"got {list(actions.shape)}")
        idx = torch.floor((actions.clamp(self.low, self.high) - self.low) / self.width)
        return idx.clamp(0, self.bins - 1).long().flatten(-2)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [..., H * A] int -> actions [..., H, A] at the bin centres."""
        if tokens.shape[-1] % self.action_dim:
            raise ValueError(f"ActionTokenizer.decode: tokens must be [..., H * {self.action_dim}], "
                             f"got {list(tokens.shape)}")
        a = self.low + (tokens.clamp(0, self.bins - 1).float() + 0.5) * self.width
        return a.unflatten(-1, (-1, self.action_dim))
