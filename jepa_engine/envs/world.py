"""The point-mass world with a Gymnasium-style API: `PointMassWorld` (batched) and `PointMassEnv` (one env).

Task: reach a goal position. reward = -distance to the goal; terminated when the distance is below
`goal_radius`; truncated after `max_episode_steps`. The batched world does not reset by itself: call
`reset` (or keep stepping: the physics stays valid after termination).
"""
from __future__ import annotations

import os

import torch

from .config import WorldConfig
from .physics import build_faces, in_free_space, step_physics
from .render import render, render_background
from .spaces import Box


class PointMassWorld:
    """`num_envs` point masses simulated at once on `device`, seeded by one torch.Generator.

    obs: [B, C, H, W] float32 in [0, 1]; action: [B, 2] in [-1, 1] (clipped); info: state [B, 4]
    (x, y, vx, vy), goal [B, 2], success [B] bool.
    """

    def __init__(self, config: WorldConfig | None = None, num_envs: int = 1, device: torch.device | str = "cpu",
                 seed: int | None = None):
        if not (isinstance(num_envs, int) and num_envs >= 1):
            raise ValueError(f"PointMassWorld: num_envs must be an int >= 1, got {num_envs!r}")
        self.config = cfg = config if config is not None else WorldConfig()
        self.num_envs, self.device = num_envs, torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        self.faces = build_faces(cfg, self.device)
        self.background = render_background(cfg, self.device)
        n, C = cfg.image_size, cfg.channels
        self.single_observation_space = Box(0.0, 1.0, (C, n, n))
        self.single_action_space = Box(-1.0, 1.0, (2,))
        self.observation_space = Box(0.0, 1.0, (num_envs, C, n, n))
        self.action_space = Box(-1.0, 1.0, (num_envs, 2))
        zeros = torch.zeros(num_envs, 2, device=self.device)
        self.pos, self.vel, self.goal = zeros.clone(), zeros.clone(), zeros.clone()
        self.steps = torch.zeros(num_envs, dtype=torch.int64, device=self.device)

    # ---- sampling
    def sample_free_positions(self, n: int) -> torch.Tensor:
        """n centres uniform over the free space (inside the arena, outside the middle wall): [n, 2]."""
        cfg, g = self.config, self.generator
        lo, hi = cfg.radius, cfg.arena_size - cfg.radius
        u = torch.rand(n, 2, generator=g, device=self.device)
        y = lo + (hi - lo) * u[:, 1]
        if cfg.layout == "open":
            return torch.stack([lo + (hi - lo) * u[:, 0], y], dim=1)
        # x uniform over [lo, c - h] U [c + h, hi] without rejection
        c, h = cfg.arena_size / 2, cfg.wall_thickness / 2 + cfg.radius
        left = (c - h) - lo
        s = u[:, 0] * 2 * left
        x = torch.where(s < left, lo + s, c + h + (s - left))
        return torch.stack([x, y], dim=1)

    # ---- Gymnasium-style API
    def reset(self, seed: int | None = None, options: dict | None = None):
        """New starts (at rest) and goals; options may give "state" [B, 4] and/or "goal" [B, 2].

        Returns (obs [B, C, H, W], info).
        """
        if seed is not None:
            self.generator.manual_seed(seed)
        options = options or {}
        B = self.num_envs
        pos, goal = self.sample_free_positions(B), self.sample_free_positions(B)
        vel = torch.zeros(B, 2, device=self.device)
        if "state" in options:
            state = self._as_tensor(options["state"], (B, 4), "options['state']")
            pos, vel = state[:, :2].clone(), state[:, 2:].clone()
            outside = int((~in_free_space(pos, self.config)).sum())
            if outside:
                raise ValueError(f"PointMassWorld.reset: options['state'] positions must lie in the free space "
                                 f"(inside the arena, outside the middle wall), got {outside} of {B} outside")
        if "goal" in options:
            goal = self._as_tensor(options["goal"], (B, 2), "options['goal']").clone()
        self.pos, self.vel, self.goal = pos, vel, goal
        self.steps.zero_()
        return self.render(), self._info(self._distance())

    def step(self, action):
        """action [B, 2] -> (obs [B, C, H, W], reward [B], terminated [B], truncated [B], info)."""
        cfg = self.config
        action = self._as_tensor(action, (self.num_envs, 2), "action").clamp(-1.0, 1.0)
        self.pos, self.vel = step_physics(self.pos, self.vel, action * cfg.max_force, cfg, self.faces)
        self.steps += 1
        dist = self._distance()
        terminated = dist < cfg.goal_radius
        truncated = self.steps >= cfg.max_episode_steps
        return self.render(), -dist, terminated, truncated, self._info(dist)

    def render(self) -> torch.Tensor:
        """Current observation [B, C, H, W]."""
        return render(self.pos, self.config, self.goal, self.background)

    @property
    def state(self) -> torch.Tensor:
        """True state [B, 4]: x, y, vx, vy."""
        return torch.cat([self.pos, self.vel], dim=1)

    # ---- helpers
    def _distance(self) -> torch.Tensor:
        return (self.pos - self.goal).norm(dim=1)

    def _info(self, dist: torch.Tensor) -> dict:
        return {"state": self.state, "goal": self.goal.clone(), "success": dist < self.config.goal_radius}

    def _as_tensor(self, x, shape: tuple[int, ...], name: str) -> torch.Tensor:
        x = torch.as_tensor(x, device=self.device, dtype=torch.float32)
        if tuple(x.shape) != shape:
            raise ValueError(f"PointMassWorld: {name} must be {list(shape)}, got {list(x.shape)}")
        return x


class PointMassEnv:
    """One environment with the same API, unbatched: obs [C, H, W], action [2], python reward/flags."""

    def __init__(self, config: WorldConfig | None = None, device: torch.device | str = "cpu",
                 seed: int | None = None):
        self.world = PointMassWorld(config, num_envs=1, device=device, seed=seed)
        self.config = self.world.config
        self.observation_space = self.world.single_observation_space
        self.action_space = self.world.single_action_space

    def reset(self, seed: int | None = None, options: dict | None = None):
        """Returns (obs [C, H, W], info); options may give "state" [4] and/or "goal" [2]."""
        options = {k: torch.as_tensor(v, dtype=torch.float32).reshape(1, -1) for k, v in (options or {}).items()}
        obs, info = self.world.reset(seed=seed, options=options)
        return obs[0], self._unbatch(info)

    def step(self, action):
        """action [2] -> (obs [C, H, W], reward float, terminated bool, truncated bool, info)."""
        action = torch.as_tensor(action, dtype=torch.float32, device=self.world.device).reshape(1, 2)
        obs, reward, terminated, truncated, info = self.world.step(action)
        return obs[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]), self._unbatch(info)

    def render(self) -> torch.Tensor:
        return self.world.render()[0]

    @staticmethod
    def _unbatch(info: dict) -> dict:
        return {"state": info["state"][0], "goal": info["goal"][0], "success": bool(info["success"][0])}
