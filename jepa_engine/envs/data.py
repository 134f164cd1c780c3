"""`TrajectoryStream`: batches of fresh episodes generated on the fly (never a stored data set).

Each batch resets `batch_size` environments and rolls them `episode_len` (T) steps:
    obs     [B, T+1, C, H, W] float32 in [0, 1]   (obs[:, 0] is the reset observation)
    actions [B, T, 2]         in [-1, 1]          (actions[:, t] leads from obs[:, t] to obs[:, t+1])
    states  [B, T+1, 4]       x, y, vx, vy
    goals   [B, 2]
Policies: "random" (temporally correlated AR(1) / Ornstein-Uhlenbeck-like noise, so episodes explore),
"goal" (the PD `GoalController` plus a little correlated noise), "mixed" (each episode draws one of the two).

``iter(stream)`` is a :class:`TrajectoryBatches`: its ``state_dict()`` (batches drawn, the world's
generator state) restores the position exactly, so a resumed training run sees the same next batch.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

from .config import WorldConfig
from .controller import GoalController
from .world import PointMassWorld

POLICIES = ("random", "goal", "mixed")


class TrajectoryStream:
    def __init__(self, config: WorldConfig | None, batch_size: int, episode_len: int, policy: str = "random",
                 seed: int = 0, device: torch.device | str = "cpu", num_batches: int | None = None,
                 action_corr: float = 0.9, goal_noise: float = 0.1, goal_fraction: float = 0.5):
        """action_corr: correlation of random actions between steps (0 = white noise);
        goal_noise: std of the noise added to the controller's actions; goal_fraction: share of "goal"
        episodes under "mixed"; num_batches: stop after this many (None = endless)."""
        def bad(field, expected, actual):
            return ValueError(f"TrajectoryStream: {field} must be {expected}, got {actual!r}")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise bad("batch_size", "an int >= 1", batch_size)
        if not (isinstance(episode_len, int) and episode_len >= 1):
            raise bad("episode_len", "an int >= 1", episode_len)
        if policy not in POLICIES:
            raise bad("policy", f"one of {POLICIES}", policy)
        if not 0.0 <= action_corr < 1.0:
            raise bad("action_corr", "in [0, 1)", action_corr)
        self.config = config if config is not None else WorldConfig()
        self.batch_size, self.episode_len, self.policy = batch_size, episode_len, policy
        self.seed, self.device, self.num_batches = seed, torch.device(device), num_batches
        self.action_corr, self.goal_noise, self.goal_fraction = action_corr, goal_noise, goal_fraction

    def __iter__(self) -> "TrajectoryBatches":
        """Every new iteration restarts from `seed`, so two passes yield identical batches."""
        return TrajectoryBatches(self)

    def _episode(self, world: PointMassWorld) -> dict[str, torch.Tensor]:
        B, T, g, dev = self.batch_size, self.episode_len, world.generator, self.device
        obs0, info = world.reset()
        obs = torch.empty((B, T + 1, *obs0.shape[1:]), device=dev)
        states = torch.empty((B, T + 1, 4), device=dev)
        actions = torch.empty((B, T, 2), device=dev)
        obs[:, 0], states[:, 0] = obs0, info["state"]
        controller = GoalController(self.config)
        use_goal = torch.full((B, 1), self.policy == "goal", device=dev)
        if self.policy == "mixed":
            use_goal = torch.rand(B, 1, generator=g, device=dev) < self.goal_fraction
        rho = self.action_corr
        noise = torch.randn(B, 2, generator=g, device=dev)
        for t in range(T):
            noise = rho * noise + math.sqrt(1 - rho * rho) * torch.randn(B, 2, generator=g, device=dev)
            expert = controller(world.state, world.goal) + self.goal_noise * noise
            action = torch.where(use_goal, expert, noise).clamp(-1.0, 1.0)
            o, _, _, _, info = world.step(action)
            obs[:, t + 1], states[:, t + 1], actions[:, t] = o, info["state"], action
        return {"obs": obs, "actions": actions, "states": states, "goals": world.goal.clone()}


class TrajectoryBatches(Iterator[dict]):
    """One pass over a :class:`TrajectoryStream`, with a resumable position.

    ``state_dict()`` -> ``{"count": batches drawn, "generator": uint8 tensor}``; ``load_state_dict`` puts
    a fresh pass at that position (the next batch is the one the saved pass would have drawn next).
    """

    def __init__(self, stream: TrajectoryStream):
        self.stream = stream
        self.world = PointMassWorld(stream.config, stream.batch_size, stream.device, seed=stream.seed)
        self.count = 0

    def __iter__(self) -> "TrajectoryBatches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.stream.num_batches is not None and self.count >= self.stream.num_batches:
            raise StopIteration
        batch = self.stream._episode(self.world)
        self.count += 1
        return batch

    def state_dict(self) -> dict:
        return {"count": self.count, "generator": self.world.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        for key in ("count", "generator"):
            if key not in state:
                raise ValueError(f"TrajectoryBatches.load_state_dict: state must have key {key!r}, "
                                 f"got keys {sorted(state)}")
        self.world.generator.set_state(state["generator"].to(torch.uint8).cpu())
        self.count = int(state["count"])
