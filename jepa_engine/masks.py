"""I-JEPA multi-block masking, kept per sample: no truncation to the batch minimum.

For each sample of a batch, on a grid of ``h x w`` patches (flat index ``r * w + c``):

- ``npred`` target blocks, each with its own scale ``s ~ U(pred_scale)`` of the grid area and aspect
  ratio ``a = h_blk / w_blk ~ exp(U(log pred_aspect))``: ``k = int(s * h * w)``,
  ``h_blk = round(sqrt(k * a))``, ``w_blk = round(sqrt(k / a))``, clipped to ``[1, h]`` / ``[1, w]``,
  placed uniformly inside the grid. The targets are the union of the blocks.
- one context block (``enc_scale``, ``enc_aspect``) minus the targets (unless ``allow_overlap``),
  with at least ``min_keep`` patches; samples with fewer draw a new context block, and after a few
  failures new targets as well.

I-JEPA then cuts every sample to the smallest count in the batch; here each sample keeps all its
patches and the batch is padded to its largest count, with a validity mask that becomes the key
padding of the masked-attention op (padded slots are never attended).

All draws come from one ``torch.Generator`` in a fixed order, so a seed reproduces a batch exactly.
Sampling is vectorised over the batch (boolean ``[B, h, w]`` masks; no per-sample Python loop).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch

from jepa_engine.config import ConfigIO

__all__ = ["MaskConfig", "MaskBatch", "MultiBlockMaskCollator", "apply_index", "mask_to_index"]

# Resampling rounds for samples whose context is smaller than min_keep; targets are redrawn too
# from round _REDRAW_TARGETS_AFTER on (a context block can be impossible given its targets).
_MAX_ROUNDS = 100
_REDRAW_TARGETS_AFTER = 10


@dataclass
class MaskConfig(ConfigIO):
    """Multi-block mask parameters (defaults: I-JEPA). ``grid`` is ``(h, w)`` in patches."""

    grid: tuple[int, int] = (8, 8)
    npred: int = 4
    pred_scale: tuple[float, float] = (0.15, 0.2)
    pred_aspect: tuple[float, float] = (0.75, 1.5)
    enc_scale: tuple[float, float] = (0.85, 1.0)
    enc_aspect: tuple[float, float] = (1.0, 1.0)
    min_keep: int = 4
    allow_overlap: bool = False

    def __post_init__(self):
        for name in ("grid", "pred_scale", "pred_aspect", "enc_scale", "enc_aspect"):
            value = tuple(getattr(self, name))
            if len(value) != 2:
                raise ValueError(f"MaskConfig: {name} must have 2 entries, got {value}")
            setattr(self, name, value)
        h, w = self.grid
        if h < 1 or w < 1:
            raise ValueError(f"MaskConfig: grid must be positive, got {self.grid}")
        if self.npred < 1:
            raise ValueError(f"MaskConfig: npred must be >= 1, got {self.npred}")
        for name in ("pred_scale", "enc_scale"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"MaskConfig: {name} must satisfy 0 < lo <= hi <= 1, got {(lo, hi)}")
        for name in ("pred_aspect", "enc_aspect"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi:
                raise ValueError(f"MaskConfig: {name} must satisfy 0 < lo <= hi, got {(lo, hi)}")
        if not 1 <= self.min_keep <= h * w:
            raise ValueError(f"MaskConfig: min_keep must be in [1, {h * w}], got {self.min_keep}")



@dataclass
class MaskBatch:
    """Masks of one batch. Indices are flat patch indices into the ``h * w`` grid, sorted ascending
    per sample, padded with 0 past each sample's count (``*_valid`` is False there).

    - ``context_index`` long ``[B, Kc]``, ``context_valid`` bool ``[B, Kc]``, ``context_counts`` long ``[B]``
    - ``target_index`` long ``[B, Kt]``, ``target_valid`` bool ``[B, Kt]``, ``target_counts`` long ``[B]``
    - ``target_blocks`` long ``[B, npred, 4]`` and ``context_block`` long ``[B, 4]``: the blocks drawn,
      as ``(top, left, height, width)`` in patches (for statistics and pictures).

    ``Kc = context_counts.max()`` and ``Kt = target_counts.max()``.
    """

    context_index: torch.Tensor
    context_valid: torch.Tensor
    target_index: torch.Tensor
    target_valid: torch.Tensor
    context_counts: torch.Tensor
    target_counts: torch.Tensor
    target_blocks: torch.Tensor
    context_block: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> "MaskBatch":
        return MaskBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                            for f in fields(self)})

    @property
    def batch_size(self) -> int:
        return self.context_index.shape[0]


def mask_to_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boolean ``[B, N]`` -> (``index`` long ``[B, K]`` sorted, padded with 0; ``valid`` bool ``[B, K]``;
    ``counts`` long ``[B]``), with ``K`` the largest count (at least 1, so shapes never collapse)."""
    B, N = mask.shape
    counts = mask.sum(1)
    K = max(int(counts.max()) if B else 0, 1)
    # A stable sort of "not visible" puts the visible positions first, in ascending order.
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :K]
    valid = torch.arange(K, device=mask.device)[None, :] < counts[:, None]
    index = torch.where(valid, order, torch.zeros_like(order))
    return index, valid, counts


def apply_index(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather tokens: ``x [B, N, D]``, ``index`` int ``[B, K]`` in ``[0, N)`` -> ``[B, K, D]``."""
    if x.dim() != 3:
        raise ValueError(f"apply_index: x must be [B, N, D], got shape {tuple(x.shape)}")
    if index.dim() != 2 or index.shape[0] != x.shape[0]:
        raise ValueError(f"apply_index: index must be [B, K] = [{x.shape[0]}, K], got {tuple(index.shape)}")
    return torch.gather(x, 1, index.long().unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class MultiBlockMaskCollator:
    """Draws I-JEPA multi-block masks (see the module docstring).

    ``sample(batch_size, generator)`` returns a :class:`MaskBatch`. ``collator(items)`` also works as a
    ``DataLoader`` ``collate_fn``: it returns ``(default_collate(items), masks)`` using the collator's
    own generator (seeded with ``seed``).
    """

    def __init__(self, cfg: MaskConfig, seed: Optional[int] = None):
        self.cfg = cfg
        self.height, self.width = cfg.grid
        self._generator = torch.Generator()
        if seed is not None:
            self._generator.manual_seed(seed)

    def __call__(self, items):
        from torch.utils.data import default_collate

        batch = default_collate(items)
        return batch, self.sample(len(items), self._generator)

    # ---------------------------------------------------------------------------------------------
    def _block_sizes(self, shape: tuple[int, ...], scale, aspect, g) -> tuple[torch.Tensor, torch.Tensor]:
        """Block heights and widths (long, ``shape``), I-JEPA's rule, clipped to the grid."""
        H, W = self.height, self.width
        s = scale[0] + torch.rand(shape, generator=g, dtype=torch.float64) * (scale[1] - scale[0])
        log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
        a = torch.exp(log_lo + torch.rand(shape, generator=g, dtype=torch.float64) * (log_hi - log_lo))
        k = torch.floor(s * (H * W))
        h = torch.round(torch.sqrt(k * a)).long().clamp(1, H)
        w = torch.round(torch.sqrt(k / a)).long().clamp(1, W)
        return h, w

    def _blocks(self, shape: tuple[int, ...], scale, aspect, g) -> torch.Tensor:
        """Random blocks ``[*shape, 4]`` = (top, left, height, width), placed uniformly in the grid."""
        h, w = self._block_sizes(shape, scale, aspect, g)
        u = torch.rand((*shape, 2), generator=g, dtype=torch.float64)
        top = torch.floor(u[..., 0] * (self.height - h + 1)).long()
        left = torch.floor(u[..., 1] * (self.width - w + 1)).long()
        return torch.stack([top, left, h, w], dim=-1)

    def _paint(self, blocks: torch.Tensor) -> torch.Tensor:
        """Blocks ``[B, M, 4]`` -> union mask bool ``[B, h * w]``."""
        rows = torch.arange(self.height)[None, None, :, None]
        cols = torch.arange(self.width)[None, None, None, :]
        top, left, h, w = (blocks[..., i, None, None] for i in range(4))
        inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)  # [B, M, H, W]
        return inside.any(1).flatten(1)

    def sample(self, batch_size: int, generator: Optional[torch.Generator] = None) -> MaskBatch:
        """Masks for ``batch_size`` samples (CPU tensors; move them with ``MaskBatch.to``)."""
        if batch_size < 1:
            raise ValueError(f"MultiBlockMaskCollator.sample: batch_size must be >= 1, got {batch_size}")
        cfg, g = self.cfg, generator
        B = batch_size
        target_blocks = self._blocks((B, cfg.npred), cfg.pred_scale, cfg.pred_aspect, g)
        context_block = self._blocks((B, 1), cfg.enc_scale, cfg.enc_aspect, g)
        target = self._paint(target_blocks)
        context = self._paint(context_block)
        if not cfg.allow_overlap:
            context &= ~target
        bad = context.sum(1) < cfg.min_keep
        rounds = 0
        while bool(bad.any()):
            rounds += 1
            if rounds > _MAX_ROUNDS:
                raise RuntimeError(
                    f"MultiBlockMaskCollator: could not keep min_keep={cfg.min_keep} context patches after "
                    f"{_MAX_ROUNDS} rounds with {cfg}; lower min_keep or the target scale")
            n = int(bad.sum())
            if rounds >= _REDRAW_TARGETS_AFTER:
                new_t = self._blocks((n, cfg.npred), cfg.pred_scale, cfg.pred_aspect, g)
                target_blocks[bad] = new_t
                target[bad] = self._paint(new_t)
            new_c = self._blocks((n, 1), cfg.enc_scale, cfg.enc_aspect, g)
            context_block[bad] = new_c
            ctx = self._paint(new_c)
            if not cfg.allow_overlap:
                ctx &= ~target[bad]
            context[bad] = ctx
            bad = context.sum(1) < cfg.min_keep
        c_index, c_valid, c_counts = mask_to_index(context)
        t_index, t_valid, t_counts = mask_to_index(target)
        return MaskBatch(context_index=c_index, context_valid=c_valid, target_index=t_index,
                         target_valid=t_valid, context_counts=c_counts, target_counts=t_counts,
                         target_blocks=target_blocks, context_block=context_block[:, 0])
