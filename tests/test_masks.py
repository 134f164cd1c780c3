"""Multi-block mask collator: block statistics, disjointness, variable counts, padding, seeding."""
from __future__ import annotations

import math

import pytest
import torch

from jepa_engine.masks import MaskBatch, MaskConfig, MultiBlockMaskCollator, apply_index, mask_to_index


def _sample(cfg: MaskConfig, B: int = 512, seed: int = 0) -> MaskBatch:
    return MultiBlockMaskCollator(cfg).sample(B, torch.Generator().manual_seed(seed))


def _dense(index: torch.Tensor, valid: torch.Tensor, n: int) -> torch.Tensor:
    """[B, K] index + valid -> bool [B, n] membership."""
    out = torch.zeros(index.shape[0], n, dtype=torch.bool)
    rows = torch.arange(index.shape[0])[:, None].expand_as(index)
    out[rows[valid], index[valid]] = True
    return out


def _size_bounds(n_area: int, scale, aspect, limit: int, side: str) -> tuple[int, int]:
    """Smallest and largest block side I-JEPA's rule can give (height: sqrt(k a), width: sqrt(k / a))."""
    k_lo, k_hi = math.floor(scale[0] * n_area), math.floor(scale[1] * n_area)
    if side == "h":
        lo, hi = math.sqrt(k_lo * aspect[0]), math.sqrt(k_hi * aspect[1])
    else:
        lo, hi = math.sqrt(k_lo / aspect[1]), math.sqrt(k_hi / aspect[0])
    return max(1, min(limit, round(lo))), max(1, min(limit, round(hi)))


@pytest.mark.parametrize("grid", [(8, 8), (14, 14), (6, 10)])
def test_target_blocks_scale_and_aspect(grid):
    cfg = MaskConfig(grid=grid)
    m = _sample(cfg)
    H, W = grid
    top, left, h, w = m.target_blocks.unbind(-1)
    h_lo, h_hi = _size_bounds(H * W, cfg.pred_scale, cfg.pred_aspect, H, "h")
    w_lo, w_hi = _size_bounds(H * W, cfg.pred_scale, cfg.pred_aspect, W, "w")
    assert h.min() >= h_lo and h.max() <= h_hi, (h.min(), h.max(), h_lo, h_hi)
    assert w.min() >= w_lo and w.max() <= w_hi, (w.min(), w.max(), w_lo, w_hi)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    # Area within the scale range, up to the rounding of each side by at most 1/2 patch.
    area = (h * w).double()
    k_hi = cfg.pred_scale[1] * H * W
    side_hi = math.sqrt(k_hi * cfg.pred_aspect[1])
    slack = 0.5 * (side_hi + k_hi / side_hi) + 0.25 + 0.5 * side_hi
    assert area.max() <= k_hi + slack, (area.max(), k_hi + slack)
    assert area.min() >= math.floor(cfg.pred_scale[0] * H * W) - slack
    assert abs(area.mean() / (H * W) - sum(cfg.pred_scale) / 2) < 0.04, area.mean() / (H * W)


def test_target_block_statistics_on_a_fine_grid():
    """On a 32x32 grid rounding is small: scale and aspect ratio land in their ranges (5% slack)."""
    cfg = MaskConfig(grid=(32, 32))
    m = _sample(cfg, B=1024)
    h, w = m.target_blocks[..., 2].double(), m.target_blocks[..., 3].double()
    scale, ratio = h * w / 1024, h / w
    assert scale.min() >= cfg.pred_scale[0] * 0.93 and scale.max() <= cfg.pred_scale[1] * 1.07
    assert ratio.min() >= cfg.pred_aspect[0] * 0.93 and ratio.max() <= cfg.pred_aspect[1] * 1.07
    # log-uniform aspect: the mean of log(ratio) is the middle of the log range.
    mid = (math.log(cfg.pred_aspect[0]) + math.log(cfg.pred_aspect[1])) / 2
    assert abs(ratio.log().mean() - mid) < 0.03
    # both ends of the ranges are reached
    assert ratio.min() < cfg.pred_aspect[0] * 1.1 and ratio.max() > cfg.pred_aspect[1] * 0.9
    assert scale.min() < cfg.pred_scale[0] * 1.1 and scale.max() > cfg.pred_scale[1] * 0.9


@pytest.mark.parametrize("grid", [(8, 8), (14, 14)])
def test_context_and_targets_are_disjoint_and_match_the_blocks(grid):
    cfg = MaskConfig(grid=grid)
    m = _sample(cfg)
    H, W = grid
    N = H * W
    ctx = _dense(m.context_index, m.context_valid, N)
    tgt = _dense(m.target_index, m.target_valid, N)
    assert not (ctx & tgt).any(), "context and targets overlap"
    # Targets are exactly the union of the drawn blocks; context is its block minus the targets.
    rows, cols = torch.arange(H)[:, None], torch.arange(W)[None, :]

    def paint(b):
        return ((rows >= b[0]) & (rows < b[0] + b[2]) & (cols >= b[1]) & (cols < b[1] + b[3])).flatten()

    for i in range(0, m.batch_size, 37):
        union = torch.stack([paint(b) for b in m.target_blocks[i]]).any(0)
        assert torch.equal(tgt[i], union)
        assert torch.equal(ctx[i], paint(m.context_block[i]) & ~union)
    # Context block: scale 0.85-1.0 of the grid, square.
    cb = m.context_block
    assert (cb[:, 2] == cb[:, 3]).all() or grid[0] != grid[1]
    assert (cb[:, 2] * cb[:, 3]).min() >= 0.7 * N


def test_allow_overlap_keeps_the_whole_context_block():
    m = _sample(MaskConfig(grid=(8, 8), allow_overlap=True), B=256)
    ctx = _dense(m.context_index, m.context_valid, 64)
    tgt = _dense(m.target_index, m.target_valid, 64)
    assert (ctx & tgt).any()
    assert torch.equal(m.context_counts, m.context_block[:, 2] * m.context_block[:, 3])


def test_counts_vary_and_min_keep_is_respected():
    cfg = MaskConfig(grid=(8, 8), min_keep=10)
    m = _sample(cfg, B=1024)
    assert m.context_counts.min() >= cfg.min_keep
    assert m.context_counts.unique().numel() > 10, "context counts should vary across samples"
    assert m.target_counts.unique().numel() > 10, "target counts should vary across samples"
    assert m.target_counts.min() >= 1
    # A strict min_keep forces resampling, and is still met.
    strict = MaskConfig(grid=(8, 8), min_keep=30)
    s = _sample(strict, B=512, seed=3)
    assert s.context_counts.min() >= 30


def test_impossible_min_keep_raises():
    cfg = MaskConfig(grid=(4, 4), min_keep=16, pred_scale=(0.5, 0.5))
    with pytest.raises(RuntimeError, match="min_keep"):
        _sample(cfg, B=4)


def test_index_valid_counts_consistent_and_sorted():
    m = _sample(MaskConfig(grid=(8, 8)), B=300)
    for index, valid, counts in ((m.context_index, m.context_valid, m.context_counts),
                                 (m.target_index, m.target_valid, m.target_counts)):
        assert index.dtype == torch.long and valid.dtype == torch.bool and counts.dtype == torch.long
        assert index.shape == valid.shape == (300, int(counts.max()))
        assert torch.equal(valid.sum(1), counts)
        # valid entries come first, padding after, padding holds index 0
        pos = torch.arange(index.shape[1])[None, :]
        assert torch.equal(valid, pos < counts[:, None])
        assert (index[~valid] == 0).all()
        assert ((index >= 0) & (index < 64)).all()
        # strictly increasing over the valid entries (sorted, no duplicates)
        step = index[:, 1:] - index[:, :-1]
        assert (step[valid[:, 1:]] > 0).all()


def test_reproducible_with_the_same_seed():
    c = MultiBlockMaskCollator(MaskConfig(grid=(8, 8)))
    a = c.sample(64, torch.Generator().manual_seed(123))
    b = c.sample(64, torch.Generator().manual_seed(123))
    d = c.sample(64, torch.Generator().manual_seed(124))
    for f in ("context_index", "context_valid", "target_index", "target_valid", "target_blocks"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert not torch.equal(a.target_blocks, d.target_blocks)


def test_collate_fn_returns_batch_and_masks():
    c = MultiBlockMaskCollator(MaskConfig(grid=(8, 8)), seed=0)
    items = [torch.full((1, 4, 4), float(i)) for i in range(5)]
    batch, masks = c(items)
    assert batch.shape == (5, 1, 4, 4) and masks.batch_size == 5


def test_mask_to_index_and_apply_index():
    mask = torch.tensor([[True, False, True, False], [False, False, False, True]])
    index, valid, counts = mask_to_index(mask)
    assert index.tolist() == [[0, 2], [3, 0]]
    assert valid.tolist() == [[True, True], [True, False]]
    assert counts.tolist() == [2, 1]
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    out = apply_index(x, index)
    assert out.shape == (2, 2, 3)
    assert torch.equal(out[0, 1], x[0, 2]) and torch.equal(out[1, 0], x[1, 3])
    with pytest.raises(ValueError, match="index must be"):
        apply_index(x, index[:1])


def test_config_validation_and_round_trip():
    cfg = MaskConfig(grid=(6, 10), npred=3)
    assert MaskConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="pred_scale"):
        MaskConfig(pred_scale=(0.3, 0.2))
    with pytest.raises(ValueError, match="unknown fields"):
        MaskConfig.from_dict({"gird": (8, 8)})
