"""Physics probes of a world model: linear read-out of the state, and surprise at impossible events.

- :func:`physics_probe`: the ridge probe of :mod:`jepa_engine.evaluation.probe` on the world model's
  embeddings (features ``[z_t, z_{t+1}]`` -> ``x, y, vx, vy``), R^2 on held-out episodes.
- :func:`surprise`: the prediction error of every transition, ``|predict(z_<=t, a_<=t) - z_{t+1}|^2``
  (mean over the latent), using the same window of ``history`` frames as planning.
- :func:`impossible_trajectories`: held-out episodes with one physically impossible transition at
  ``event_step`` — "teleport" (the mass jumps to a far free position) or "wall" (in "two_rooms", the
  mass next to the middle wall, away from the door, appears mirrored on the other side: it went
  through the wall) — and the same episodes without it. The physics continues normally after the event.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from jepa_engine.envs import WorldConfig, build_faces, door_band, render, step_physics
from jepa_engine.models.world_model import WorldModel

from .probe import ProbeResult, linear_probe

EVENTS = ("teleport", "wall")


class _TokenView(nn.Module):
    """``images -> [B, 1, D]``: the world model's embedding as the one token the probe pools."""

    def __init__(self, model: WorldModel):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode(images)[:, None]


def physics_probe(model: WorldModel, world: WorldConfig, **kwargs) -> ProbeResult:
    """Linear probe of position and velocity from the embeddings (kwargs: see ``linear_probe``)."""
    return linear_probe(_TokenView(model), world, **kwargs)


@torch.no_grad()
def surprise(model: WorldModel, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Prediction error per transition: obs [B, T+1, C, H, W], actions [B, T, A] -> [B, T]."""
    if obs.dim() != 5:
        raise ValueError(f"surprise: obs must be [B, T+1, C, H, W], got {list(obs.shape)}")
    B, T1 = obs.shape[:2]
    if actions.dim() != 3 or tuple(actions.shape[:2]) != (B, T1 - 1):
        raise ValueError(f"surprise: actions must be [B, T, A] = [{B}, {T1 - 1}, A], got {list(actions.shape)}")
    was_training = model.training
    model.eval()
    try:
        z = model.encode_frames(obs)                                   # [B, T+1, D]
        h, errs = model.cfg.history, []
        for t in range(T1 - 1):
            s = max(0, t - h + 1)
            pred = model.predict(z[:, s:t + 1], actions[:, s:t + 1])[:, -1]
            errs.append((pred - z[:, t + 1]).square().mean(-1))
    finally:
        model.train(was_training)
    return torch.stack(errs, dim=1)


def impossible_trajectories(world: WorldConfig, batch_size: int, episode_len: int, kind: str = "teleport",
                            event_step: Optional[int] = None, seed: int = 0, device="cpu") -> dict:
    """Pairs of episodes, normal and with one impossible transition ``event_step -> event_step + 1``.

    Returns obs / obs_impossible [B, T+1, C, H, W], states / states_impossible [B, T+1, 4],
    actions [B, T, 2] (shared) and event_step.
    """
    if kind not in EVENTS:
        raise ValueError(f"impossible_trajectories: kind must be one of {EVENTS}, got {kind!r}")
    if kind == "wall" and world.layout != "two_rooms":
        raise ValueError(f"impossible_trajectories: kind 'wall' needs the 'two_rooms' layout, got {world.layout!r}")
    T = episode_len
    event_step = T // 2 if event_step is None else event_step
    if not 0 <= event_step < T:
        raise ValueError(f"impossible_trajectories: event_step must be in [0, episode_len) = [0, {T}), "
                         f"got {event_step}")
    g = torch.Generator(device=device).manual_seed(seed)
    B, L, r = batch_size, world.arena_size, world.radius
    faces = build_faces(world, device)
    u = lambda *shape: torch.rand(*shape, generator=g, device=device)  # noqa: E731
    if kind == "teleport":
        pos = r + (L - 2 * r) * u(B, 2)
        push = torch.zeros(B, 2, device=device)
    else:  # next to the left side of the wall, above or below the door, pushed towards the wall
        c, hw = L / 2, world.wall_thickness / 2 + r
        d_lo, d_hi = door_band(world)
        below = u(B) < 0.5
        y_lo = torch.where(below, torch.full((B,), r + 0.05, device=device), torch.full((B,), d_hi + 0.1, device=device))
        y_hi = torch.where(below, torch.full((B,), d_lo - 0.1, device=device), torch.full((B,), L - r - 0.05, device=device))
        y = y_lo + (y_hi - y_lo) * u(B)
        x = c - hw - 0.02 - 0.1 * u(B)
        pos = torch.stack([x, y], dim=1)
        push = torch.tensor([0.6, 0.0], device=device).expand(B, 2)
    # temporally correlated random actions (as the training stream), plus the push for "wall"
    rho, noise, acts = 0.9, torch.randn(B, 2, generator=g, device=device), []
    for _ in range(T):
        noise = rho * noise + math.sqrt(1 - rho * rho) * torch.randn(B, 2, generator=g, device=device)
        acts.append((noise * (0.3 if kind == "wall" else 1.0) + push).clamp(-1, 1))
    actions = torch.stack(acts, dim=1)                                      # [B, T, 2]
    teleport_to = r + (L - 2 * r) * u(B, 2)

    def simulate(impossible: bool) -> torch.Tensor:
        p, v, states = pos.clone(), torch.zeros(B, 2, device=device), []
        states.append(torch.cat([p, v], 1))
        for t in range(T):
            p, v = step_physics(p, v, actions[:, t] * world.max_force, world, faces)
            if impossible and t == event_step:
                if kind == "teleport":
                    p = teleport_to
                else:
                    p = torch.stack([L - p[:, 0], p[:, 1]], dim=1)          # mirrored through the wall
            states.append(torch.cat([p, v], 1))
        return torch.stack(states, dim=1)                                    # [B, T+1, 4]

    def frames(states: torch.Tensor) -> torch.Tensor:
        imgs = render(states[..., :2].flatten(0, 1), world)
        return imgs.view(B, T + 1, *imgs.shape[1:])

    normal, odd = simulate(False), simulate(True)
    return {"obs": frames(normal), "obs_impossible": frames(odd), "states": normal, "states_impossible": odd,
            "actions": actions, "event_step": event_step}
