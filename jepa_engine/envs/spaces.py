"""`Box`: a Gymnasium-style bounded box space in torch (no gymnasium dependency)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Box:
    """Elements are tensors of `shape` and `dtype` with every entry in [low, high]."""
    low: float
    high: float
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    def sample(self, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """A uniform sample of `shape` in [low, high]."""
        u = torch.rand(self.shape, generator=generator, device=device, dtype=self.dtype)
        return self.low + (self.high - self.low) * u

    def contains(self, x) -> bool:
        """True when `x` has this shape and every entry lies in [low, high]."""
        x = torch.as_tensor(x)
        if tuple(x.shape) != tuple(self.shape) or not x.dtype.is_floating_point:
            return False
        return bool(((x >= self.low) & (x <= self.high)).all())
