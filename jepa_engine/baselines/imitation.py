"""Imitation of the goal-reaching expert, and the decoder as an MPC policy on the built-in world.

Examples come from `TrajectoryStream(policy="goal")`: episodes of the `GoalController` with a little
correlated noise. One example is (frame at step t, goal frame, H action labels for steps t ... t+H-1:
by default the expert's law without its velocity term at the states visited, see `expert_examples`);
the goal frame is the world rendered with the mass at the goal. Training is
cross-entropy on the action tokens with teacher forcing (L = 0: there is nothing to imitate for the
reasoning tokens, which exist for the cost sweeps only).

The policy re-plans every step (receding horizon): `decide(obs, goal) -> actions [H, A]`, execute
the first action, repeat. The frames show positions only, so the decoder cannot see the velocity the
expert uses; the relabelled (observable) expert needs none, and the world's damping stops the mass.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from jepa_engine.envs import GoalController, PointMassWorld, TrajectoryStream, WorldConfig, render
from jepa_engine.schedules import warmup_cosine

from .decoder import Decoder
from .tokenizer import ActionTokenizer


LABELS = ("observable", "expert")


@dataclass
class ImitationConfig:
    steps: int = 2000
    batch_size: int = 64          # examples per step
    episodes: int = 16            # episodes generated per refill (each gives several examples)
    episode_len: int = 16
    lr: float = 1e-3              # after `warmup` steps; cosine to lr / 10 at the last step
    weight_decay: float = 0.01
    warmup: int = 50
    goal_noise: float = 0.1       # std of the noise the stream adds to the expert's actions
    reuse: int = 2                # passes over each generated pool of examples before a refill
    labels: str = "observable"    # "observable": the expert without its velocity term; "expert": its actions as run
    first_step_weight: float = 1.0  # loss weight of the first plan step's tokens (see imitation_loss)
    max_seconds: float = 0.0      # stop after this much training time (0: no limit)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "episodes", "episode_len", "reuse"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"ImitationConfig.{name} must be an int >= 1, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"ImitationConfig.lr must be > 0, got {self.lr!r}")
        if not (isinstance(self.warmup, int) and self.warmup >= 0):
            raise ValueError(f"ImitationConfig.warmup must be an int >= 0, got {self.warmup!r}")
        if self.labels not in LABELS:
            raise ValueError(f"ImitationConfig.labels must be one of {LABELS}, got {self.labels!r}")
        for name in ("goal_noise", "max_seconds"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"ImitationConfig.{name} must be a finite number >= 0, got {v!r}")
        if not (isinstance(self.first_step_weight, (int, float)) and math.isfinite(self.first_step_weight)
                and self.first_step_weight > 0):
            raise ValueError(f"ImitationConfig.first_step_weight must be a finite number > 0, "
                             f"got {self.first_step_weight!r}")


def goal_frames(goal: torch.Tensor, world_config: WorldConfig) -> torch.Tensor:
    """goal positions [B, 2] -> frames [B, C, H, W] of the world with the mass at the goal."""
    return render(goal, world_config)


def check_compatible(cfg, world_config: WorldConfig) -> None:
    if (cfg.image_size, cfg.channels) != (world_config.image_size, world_config.channels):
        raise ValueError(f"decoder config image_size/channels must match the world's "
                         f"({world_config.image_size}, {world_config.channels}), got ({cfg.image_size}, {cfg.channels})")
    if cfg.action_dim != 2:
        raise ValueError(f"decoder config action_dim must be 2 for the point-mass world, got {cfg.action_dim}")


def expert_examples(world_config: WorldConfig, tcfg: ImitationConfig, horizon: int, device="cpu"):
    """Endless batches of (obs [N, C, H, W], goal_obs [N, C, H, W], actions [N, H, 2]): the windows of
    each generated episode that start farther than `goal_radius` from the goal (N varies, at most
    episodes * (episode_len - horizon + 1)).

    Labels: with `tcfg.labels = "expert"` the actions the noisy expert took. Its PD law brakes on the
    velocity, which one frame does not show: at the same (position, goal) it pushes forwards or backwards
    depending on how fast the mass moves, so its first action agrees in sign with the goal direction
    only about two times in three, and a decoder fed one frame cannot fit it. "observable" (default)
    relabels each visited state with the same controller without its velocity term (kd = damping:
    the P part, a function of what the frames show), which is the policy a frame-fed imitator can
    represent; the states are still the ones the noisy expert visits."""
    if tcfg.episode_len < horizon:
        raise ValueError(f"ImitationConfig.episode_len must be >= horizon = {horizon}, got {tcfg.episode_len}")
    stream = TrajectoryStream(world_config, tcfg.episodes, tcfg.episode_len, policy="goal", seed=tcfg.seed,
                              device=device, goal_noise=tcfg.goal_noise)
    observable = GoalController(world_config, kd=world_config.damping)
    T, H = tcfg.episode_len, horizon
    for batch in stream:
        starts = T - H + 1
        obs = batch["obs"][:, :starts].flatten(0, 1)                                 # [E * starts, C, H, W]
        actions = batch["actions"]                                                   # [E, T, 2]
        if tcfg.labels == "observable":
            E = actions.shape[0]
            states = batch["states"][:, :T].flatten(0, 1)                            # [E * T, 4]
            goals = batch["goals"].repeat_interleave(T, dim=0)
            actions = observable(states, goals).view(E, T, 2)
        windows = actions.unfold(1, H, 1).permute(0, 1, 3, 2)                        # [E, starts, H, 2]
        goal = goal_frames(batch["goals"], world_config)                             # [E, C, H, W]
        goal = goal.unsqueeze(1).expand(-1, starts, -1, -1, -1).flatten(0, 1)
        # only decisions that are still open: once at the goal the expert hovers, and such windows
        # would make "no action" the mode of the data
        dist = (batch["states"][:, :starts, :2] - batch["goals"][:, None]).norm(dim=-1).flatten()
        keep = (dist > world_config.goal_radius).nonzero().squeeze(1)
        yield obs[keep], goal[keep], windows.flatten(0, 1)[keep]


def imitation_loss(model: Decoder, tokenizer: ActionTokenizer, obs, goal_obs, actions,
                   first_step_weight: float = 1.0) -> torch.Tensor:
    """Teacher-forced cross-entropy of the action tokens: inputs [BOS, a_1 .. a_{n-1}], targets a_1 .. a_n.

    `first_step_weight` scales the tokens of the plan's first step (the action MPC executes): under
    teacher forcing the later steps are mostly a copy of the step before, and only the first step's
    tokens need the frames."""
    targets = tokenizer.encode(actions)                                          # [N, n]
    bos = torch.full_like(targets[:, :1], model.config.bos_id)
    logits = model(obs, goal_obs, torch.cat([bos, targets[:, :-1]], dim=1))      # [N, n, V]
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view_as(targets)
    if first_step_weight == 1.0:
        return ce.mean()
    w = torch.ones(targets.shape[1], device=ce.device)
    w[: model.config.action_dim] = first_step_weight
    return (ce * w).sum(dim=1).mean() / w.sum()


def train_imitation(model: Decoder, world_config: WorldConfig, tcfg: Optional[ImitationConfig] = None,
                    device="cpu", log_every: int = 0) -> list[float]:
    """Train `model` by imitation of the expert; returns the loss of every step taken (fewer than
    `tcfg.steps` when `tcfg.max_seconds` ran out)."""
    tcfg = tcfg or ImitationConfig()
    cfg = model.config
    check_compatible(cfg, world_config)
    tok = ActionTokenizer.from_config(cfg)
    g = torch.Generator(device="cpu").manual_seed(tcfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)

    model.train()
    data = expert_examples(world_config, tcfg, cfg.horizon, device)
    pool, passes, pool_used = None, 0, 0
    losses: list[float] = []
    deadline = time.perf_counter() + tcfg.max_seconds if tcfg.max_seconds > 0 else math.inf
    for step in range(tcfg.steps):
        if time.perf_counter() > deadline:
            break
        if pool is None or pool_used + min(tcfg.batch_size, pool[0].shape[0]) > pool[0].shape[0]:
            if pool is None or passes >= tcfg.reuse:
                pool, passes = next(data), 0
            passes += 1
            pool_used = 0
            perm = torch.randperm(pool[0].shape[0], generator=g).to(pool[0].device)
            pool = tuple(t[perm] for t in pool)
        sl = slice(pool_used, pool_used + tcfg.batch_size)
        pool_used += tcfg.batch_size
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, tcfg.lr, 0.1 * tcfg.lr, tcfg.steps, tcfg.warmup)
        loss = imitation_loss(model, tok, *(t[sl] for t in pool), first_step_weight=tcfg.first_step_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if log_every and (step % log_every == 0 or step == tcfg.steps - 1):
            print(f"imitation step {step:5d}  loss {losses[-1]:.4f}")
    model.eval()
    return losses


class DecoderPolicy:
    """The decoder as a planner: ``decide(obs, goal) -> actions [H, A]`` (or [B, H, A] for batches).

    obs: a frame [C, H, W] or frames [B, C, H, W]; goal: a goal position [2] / [B, 2] (rendered into
    a goal frame) or a goal frame of the obs's shape.
    """

    def __init__(self, model: Decoder, world_config: WorldConfig, reasoning_tokens: int = 0, cache: str = "static",
                 compile: bool = False, greedy: bool = True, temperature: float = 1.0, seed: int = 0):
        check_compatible(model.config, world_config)
        self.model, self.world_config = model.eval(), world_config
        self.tokenizer = ActionTokenizer.from_config(model.config)
        self.reasoning_tokens, self.cache, self.compile = reasoning_tokens, cache, compile
        self.greedy, self.temperature = greedy, temperature
        self.generator = None if greedy else torch.Generator(device=model.head.weight.device).manual_seed(seed)

    @property
    def tokens_per_decision(self) -> int:
        return self.reasoning_tokens + self.model.config.action_tokens

    def decide(self, obs: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        single = obs.dim() == 3
        obs = obs.unsqueeze(0) if single else obs
        if goal.shape[-1] == 2 and goal.dim() <= 2:
            goal_obs = goal_frames(goal.reshape(-1, 2).float(), self.world_config)
        else:
            goal_obs = goal.unsqueeze(0) if goal.dim() == 3 else goal
        dev = self.model.head.weight.device
        tokens = self.model.generate(obs.to(dev), goal_obs.to(dev), self.reasoning_tokens, cache=self.cache,
                                     compile=self.compile, greedy=self.greedy, temperature=self.temperature,
                                     generator=self.generator)
        actions = self.tokenizer.decode(tokens[:, self.reasoning_tokens:])      # [B, H, A]
        return actions[0] if single else actions


@torch.no_grad()
def rollout_success(policy, world_config: WorldConfig, num_envs: int = 32, max_steps: int = 60, seed: int = 1,
                    starts: Optional[torch.Tensor] = None, goals: Optional[torch.Tensor] = None,
                    device="cpu") -> dict:
    """MPC episodes of `policy` (anything with `decide(obs [B, C, H, W], goal [B, 2]) -> [B, H, A]`):
    execute the first action, re-plan, until the goal is reached (success) or `max_steps`.
    starts [B, 4] and goals [B, 2] fix the decisions; otherwise they are drawn from `seed`."""
    world = PointMassWorld(world_config, num_envs, device, seed=seed)
    options = {}
    if starts is not None:
        options["state"] = starts
    if goals is not None:
        options["goal"] = goals
    obs, info = world.reset(options=options)
    reached = info["success"].clone()
    steps = torch.full((num_envs,), max_steps, dtype=torch.long, device=world.device)
    latencies = []
    for t in range(max_steps):
        t0 = time.perf_counter()
        actions = policy.decide(obs, world.goal)
        latencies.append(time.perf_counter() - t0)
        obs, _, terminated, _, info = world.step(actions[:, 0])
        newly = terminated & ~reached
        steps = torch.where(newly, torch.full_like(steps, t + 1), steps)
        reached |= terminated
        if bool(reached.all()):
            break
    return {"success_rate": float(reached.float().mean()), "success": reached.cpu(), "steps": steps.cpu(),
            "decide_seconds": latencies, "final_distance": (world.pos - world.goal).norm(dim=1).cpu()}
