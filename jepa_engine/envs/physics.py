"""Batched point-mass physics: semi-implicit Euler with swept collisions against axis-aligned faces.

Every wall is described as a set of faces seen by the *centre* of the mass (walls inflated by the
radius). A face is a line `coord[axis] = a` with a free side (`sign` = +1 when the free side is
`coord > a`) and an extent `[lo, hi]` along the other axis. Each substep moves the centre along a
segment; the earliest face the segment crosses (within its extent) reflects the rest of the segment
and the normal velocity, a few times per substep. The mass therefore never tunnels through a wall,
at any speed: a crossing is found on the segment, not by testing the end point.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import WorldConfig

_MAX_BOUNCES = 4  # reflections resolved per substep; past this the mass stops at its last contact


@dataclass
class Faces:
    """F faces as tensors of shape [F]: axis (0 = x, 1 = y), position a, free-side sign, extent lo/hi."""
    axis: torch.Tensor   # [F] int64
    a: torch.Tensor      # [F]
    sign: torch.Tensor   # [F]
    lo: torch.Tensor     # [F]
    hi: torch.Tensor     # [F]


def build_faces(cfg: WorldConfig, device: torch.device | str = "cpu") -> Faces:
    """The arena borders (4 faces) and, for "two_rooms", the two door jambs (3 faces each)."""
    L, r, inf = cfg.arena_size, cfg.radius, float("inf")
    rows = [  # (axis, a, sign, lo, hi)
        (0, r, +1, -inf, inf), (0, L - r, -1, -inf, inf),
        (1, r, +1, -inf, inf), (1, L - r, -1, -inf, inf),
    ]
    if cfg.layout == "two_rooms":
        c, h = L / 2, cfg.wall_thickness / 2 + r
        d_lo, d_hi = door_band(cfg)
        rows += [
            (0, c - h, -1, -inf, d_lo), (0, c + h, +1, -inf, d_lo), (1, d_lo, +1, c - h, c + h),  # lower jamb
            (0, c - h, -1, d_hi, inf), (0, c + h, +1, d_hi, inf), (1, d_hi, -1, c - h, c + h),    # upper jamb
        ]
    cols = list(zip(*rows))
    f32 = dict(device=device, dtype=torch.float32)
    return Faces(torch.tensor(cols[0], device=device, dtype=torch.int64), torch.tensor(cols[1], **f32),
                 torch.tensor(cols[2], **f32), torch.tensor(cols[3], **f32), torch.tensor(cols[4], **f32))


def in_free_space(pos: torch.Tensor, cfg: WorldConfig, tol: float = 1e-6) -> torch.Tensor:
    """[B] True where centres pos [B, 2] lie in the arena and outside the (inflated) middle wall."""
    lo, hi = cfg.radius - tol, cfg.arena_size - cfg.radius + tol
    ok = ((pos >= lo) & (pos <= hi)).all(dim=1)
    if cfg.layout == "two_rooms":
        c, h = cfg.arena_size / 2, cfg.wall_thickness / 2 + cfg.radius
        d_lo, d_hi = door_band(cfg)
        in_wall = ((pos[:, 0] - c).abs() < h - tol) & ((pos[:, 1] < d_lo - tol) | (pos[:, 1] > d_hi + tol))
        ok = ok & ~in_wall
    return ok


def door_band(cfg: WorldConfig) -> tuple[float, float]:
    """The y-interval the centre must be in to pass the door (door shrunk by the radius)."""
    return (cfg.door_center - cfg.door_width / 2 + cfg.radius, cfg.door_center + cfg.door_width / 2 - cfg.radius)


def _first_hit(p0: torch.Tensor, p1: torch.Tensor, faces: Faces, ax: torch.Tensor):
    """Earliest face crossed by each segment p0 -> p1 [B, 2]: (t [B] in [0, 1] or inf, face index [B])."""
    q0, q1 = p0.gather(1, ax), p1.gather(1, ax)            # along each face's normal axis, [B, F]
    o0, o1 = p0.gather(1, 1 - ax), p1.gather(1, 1 - ax)    # along each face, [B, F]
    s0, s1 = (q0 - faces.a) * faces.sign, (q1 - faces.a) * faces.sign
    crosses = (s0 >= 0) & (s1 < 0)
    t = s0 / torch.where(crosses, s0 - s1, torch.ones_like(s0))
    o = o0 + t * (o1 - o0)
    hit = crosses & (o >= faces.lo) & (o <= faces.hi)
    t = torch.where(hit, t, torch.full_like(t, float("inf")))
    return t.min(dim=1)


def sweep(p0: torch.Tensor, p1: torch.Tensor, vel: torch.Tensor, faces: Faces, restitution: float):
    """Move centres from p0 to p1 [B, 2], bouncing off `faces`; returns (end [B, 2], velocity [B, 2])."""
    ax = faces.axis.unsqueeze(0).expand(p0.shape[0], -1)  # [B, F]
    for _ in range(_MAX_BOUNCES):
        t_min, f = _first_hit(p0, p1, faces, ax)
        any_hit = torch.isfinite(t_min).unsqueeze(1)                     # [B, 1]
        a = faces.a[f].unsqueeze(1)                                      # [B, 1]
        normal = torch.nn.functional.one_hot(faces.axis[f], 2).to(p0.dtype)  # [B, 2]
        t = torch.where(any_hit, t_min.unsqueeze(1), torch.zeros_like(a))
        contact = (p0 + t * (p1 - p0)) * (1 - normal) + a * normal
        reflected = p1 * (1 - normal) + (a + restitution * (a - p1)) * normal
        p0 = torch.where(any_hit, contact, p0)
        p1 = torch.where(any_hit, reflected, p1)
        vel = torch.where(any_hit, vel * (1 - normal * (1 + restitution)), vel)
    # A segment still crossing after _MAX_BOUNCES stops at its last contact point (always free space).
    pending = torch.isfinite(_first_hit(p0, p1, faces, ax)[0]).unsqueeze(1)
    return torch.where(pending, p0, p1), vel


def step_physics(pos: torch.Tensor, vel: torch.Tensor, force: torch.Tensor, cfg: WorldConfig, faces: Faces):
    """One environment step (cfg.substeps semi-implicit Euler substeps).

    pos, vel, force: [B, 2] (force already clipped and scaled). Returns (pos [B, 2], vel [B, 2]).
    """
    h = cfg.dt / cfg.substeps
    accel_ext = force / cfg.mass
    if cfg.gravity:
        accel_ext = torch.stack([accel_ext[:, 0], accel_ext[:, 1] - cfg.gravity], dim=1)
    for _ in range(cfg.substeps):
        vel = vel + h * (accel_ext - cfg.damping * vel)
        pos, vel = sweep(pos, pos + h * vel, vel, faces, cfg.restitution)
    return pos, vel
