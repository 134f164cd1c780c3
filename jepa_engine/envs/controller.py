"""`GoalController`: an analytic PD controller that drives the mass to its goal (an expert policy).

In "two_rooms" a mass in the other room than its goal first heads to a waypoint in front of the door,
then to a waypoint just past it on the goal's side, then to the goal. Gravity is compensated.
Everything is batched tensor arithmetic (no host syncs): state [B, 4], goal [B, 2] -> action [B, 2].
"""
from __future__ import annotations

import torch

from .config import WorldConfig
from .physics import door_band


class GoalController:
    def __init__(self, config: WorldConfig, kp: float = 6.0, kd: float = 4.0, door_margin: float = 0.06):
        self.config, self.kp, self.kd, self.door_margin = config, kp, kd, door_margin

    def waypoint(self, pos: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        """Where to head now: pos, goal [B, 2] -> target [B, 2]."""
        cfg = self.config
        if cfg.layout != "two_rooms":
            return goal
        c, h = cfg.arena_size / 2, cfg.wall_thickness / 2 + cfg.radius
        d_lo, d_hi = door_band(cfg)
        goal_side = torch.sign(goal[:, 0] - c)                       # [B] -1 left, +1 right
        past_wall = (pos[:, 0] - c) * goal_side > h                  # in the goal's room
        in_corridor = (pos[:, 0] - c).abs() <= h
        approach_x = c - goal_side * (h + self.door_margin)          # in front of the door, own side
        exit_x = c + goal_side * (h + self.door_margin)              # just past the door, goal side
        door_y = torch.full_like(pos[:, 1], cfg.door_center)
        aligned = ((pos[:, 1] - cfg.door_center).abs() < 0.35 * (d_hi - d_lo)) & \
                  ((pos[:, 0] - approach_x).abs() < 1.5 * self.door_margin)
        through = in_corridor | aligned
        target_x = torch.where(through, exit_x, approach_x)
        target = torch.stack([target_x, door_y], dim=1)
        return torch.where(past_wall.unsqueeze(1), goal, target)

    def __call__(self, state: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        """state [B, 4], goal [B, 2] -> action [B, 2] in [-1, 1]."""
        cfg = self.config
        pos, vel = state[:, :2], state[:, 2:]
        target = self.waypoint(pos, goal)
        accel = self.kp * (target - pos) - self.kd * vel + cfg.damping * vel
        if cfg.gravity:
            accel = torch.stack([accel[:, 0], accel[:, 1] + cfg.gravity], dim=1)
        if cfg.max_force == 0:
            return torch.zeros_like(accel)
        return (accel * cfg.mass / cfg.max_force).clamp(-1.0, 1.0)
