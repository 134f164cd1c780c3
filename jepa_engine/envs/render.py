"""Rendering the world to images with batched tensor ops: float32 in [0, 1], shape [B, C, H, W].

Pixel (i, j) has its centre at x = (j + 0.5) * L / W, y = L - (i + 0.5) * L / H (row 0 is the top,
y points up). The mass is an anti-aliased disc: a smooth step of the signed distance to its edge over
one pixel. Walls are drawn with their exact pixel coverage; the goal is a dimmer disc under the mass.
"""
from __future__ import annotations

import functools

import torch

from .config import WorldConfig

# (grey, rgb) colours of each layer
_WALL = (0.5, (0.45, 0.45, 0.55))
_GOAL = (0.35, (0.1, 0.8, 0.2))
_MASS = (1.0, (1.0, 0.35, 0.1))


@functools.lru_cache(maxsize=64)
def _colour(layer, channels: int, device) -> torch.Tensor:
    """[C, 1, 1] colour of a layer (cached: no host-to-device copy per frame)."""
    value = [layer[0]] if channels == 1 else list(layer[1])
    return torch.tensor(value, device=device, dtype=torch.float32).view(channels, 1, 1)


def pixel_centres(cfg: WorldConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    """x of each column [W] and y of each row [H]."""
    n, L = cfg.image_size, cfg.arena_size
    centres = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) * (L / n)
    return centres, L - centres


def disc_alpha(centre: torch.Tensor, radius: float, cfg: WorldConfig) -> torch.Tensor:
    """Anti-aliased coverage of discs at centre [B, 2]: [B, H, W] in [0, 1]."""
    xs, ys = pixel_centres(cfg, centre.device)
    pixel = cfg.arena_size / cfg.image_size
    d2 = (xs.view(1, 1, -1) - centre[:, 0, None, None]) ** 2 + (ys.view(1, -1, 1) - centre[:, 1, None, None]) ** 2
    t = ((radius - d2.sqrt()) / pixel + 0.5).clamp(0.0, 1.0)
    return t * t * (3 - 2 * t)


def _box_coverage(x0: float, x1: float, y0: float, y1: float, cfg: WorldConfig, device) -> torch.Tensor:
    """Exact fraction of each pixel covered by the box [x0, x1] x [y0, y1]: [H, W]."""
    xs, ys = pixel_centres(cfg, device)
    half = cfg.arena_size / cfg.image_size / 2
    cover_x = ((torch.clamp(xs + half, max=x1) - torch.clamp(xs - half, min=x0)) / (2 * half)).clamp(0, 1)
    cover_y = ((torch.clamp(ys + half, max=y1) - torch.clamp(ys - half, min=y0)) / (2 * half)).clamp(0, 1)
    return cover_y.view(-1, 1) * cover_x.view(1, -1)


def render_background(cfg: WorldConfig, device="cpu") -> torch.Tensor:
    """The static scene (walls) as [C, H, W]; black where empty."""
    n, L = cfg.image_size, cfg.arena_size
    alpha = torch.zeros(n, n, device=device)
    if cfg.layout == "two_rooms":
        x0, x1 = L / 2 - cfg.wall_thickness / 2, L / 2 + cfg.wall_thickness / 2
        door0, door1 = cfg.door_center - cfg.door_width / 2, cfg.door_center + cfg.door_width / 2
        alpha = _box_coverage(x0, x1, 0.0, door0, cfg, device) + _box_coverage(x0, x1, door1, L, cfg, device)
    return alpha.clamp(0, 1).unsqueeze(0) * _colour(_WALL, cfg.channels, torch.device(device))


def render(pos: torch.Tensor, cfg: WorldConfig, goal: torch.Tensor | None = None,
           background: torch.Tensor | None = None) -> torch.Tensor:
    """Images of the world: pos [B, 2] (and goal [B, 2] when drawn) -> [B, C, H, W] float32 in [0, 1].

    `background` is `render_background(cfg)` ([C, H, W]); pass it to avoid recomputing it.
    """
    if background is None:
        background = render_background(cfg, pos.device)
    img = background.unsqueeze(0).expand(pos.shape[0], -1, -1, -1)
    if goal is not None and cfg.render_goal:
        a = disc_alpha(goal.float(), max(cfg.goal_radius, 1.5 * cfg.arena_size / cfg.image_size), cfg).unsqueeze(1)
        img = img * (1 - a) + a * _colour(_GOAL, cfg.channels, pos.device)
    a = disc_alpha(pos.float(), cfg.radius, cfg).unsqueeze(1)
    return (img * (1 - a) + a * _colour(_MASS, cfg.channels, pos.device)).contiguous()
