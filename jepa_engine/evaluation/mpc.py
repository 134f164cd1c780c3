"""Receding-horizon MPC in the built-in world with a trained world model and any planner.

Each control step for E environments at once::

    z_hist [E, h, D]   = encode(last h frames)            (fewer at the start of an episode)
    z_goal [E, D]      = encode(render(goal position))    (once per episode)
    cost_fn(a [E, N, H, A]) = dist(rollout(z_hist, a), z_goal)  [E, N]  (L1 / L2, final step or summed)
    plan               = planner.plan(cost_fn, E, device, warm_start=previous plan)
    world.step(plan.actions[:, 0])                         (execute the first action, re-plan)

An episode succeeds when the mass comes within the world's ``goal_radius`` of the goal within
``max_steps`` steps. Episodes are seeded one by one (episode i draws its start and goal from seed
``seed + i``), so the set of episodes does not depend on how many run at once.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from jepa_engine.envs import PointMassWorld, WorldConfig, render
from jepa_engine.kernels.precision import PRECISIONS, check_precision
from jepa_engine.models.world_model import WorldModel
from jepa_engine.planning import Plan, Planner, PlannerConfig
from jepa_engine.planning.graphs import GraphedPlanner
from jepa_engine.planning.latent_cost import COSTS, REDUCTIONS, latent_cost
from jepa_engine.planning.registry import PLANNERS
from jepa_engine.planning.sampling import _SamplingPlanner
from jepa_engine.runtime import progress_mininterval


def default_elites(samples: int) -> int:
    """CEM's elite count K when none is given: 10% of the samples, at least 2 (a spread to refit), at
    most ``samples``; 300 samples keep LeWorldModel's K = 30."""
    return min(samples, max(2, samples // 10))


@dataclass
class MPCConfig:
    planner: str = "cem"             # a key of jepa_engine.planning.registry.PLANNERS
    horizon: int = 5
    samples: int = 300
    iterations: int = 30
    elites: Optional[int] = None     # CEM's K; None: default_elites(samples) (30 for 300 samples)
    planner_overrides: dict = field(default_factory=dict)   # any other PlannerConfig field
    cost: str = "l2"                 # "l1" (sum |dz|) or "l2" (sum dz^2)
    reduce: str = "final"            # "final": last predicted step; "sum": every step of the horizon
    max_steps: int = 60              # control steps per episode
    warm_start: bool = True
    seed: int = 0
    precision: Optional[str] = None  # "fp32", "tf32", "bf16"; None: the device's (tf32 on CUDA, fp32 elsewhere)
    graphed: bool = True             # on CUDA, CEM / MPPI plans replay one CUDA graph (planning/graphs.py)

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"MPCConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        if self.planner not in PLANNERS:
            raise bad("planner", f"one of {sorted(PLANNERS)}")
        if self.cost not in COSTS:
            raise bad("cost", f"one of {COSTS}")
        if self.reduce not in REDUCTIONS:
            raise bad("reduce", f"one of {REDUCTIONS}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise bad("precision", f"one of {PRECISIONS} or None (the device's default)")
        for name in ("horizon", "max_steps", "samples", "iterations"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise bad(name, "an int >= 1")
        if self.elites is None:
            self.elites = default_elites(self.samples)
        elif not (isinstance(self.elites, int) and not isinstance(self.elites, bool)
                  and 1 <= self.elites <= self.samples):
            raise bad("elites", f"an int in [1, samples] = [1, {self.samples}]")
        self.planner_config(2)  # K > N, bad bounds ... raise here, before any episode runs

    def planner_config(self, action_dim: int) -> PlannerConfig:
        return PlannerConfig(**{**dict(horizon=self.horizon, samples=self.samples, iterations=self.iterations,
                                       elites=self.elites, action_dim=action_dim, seed=self.seed),
                                **self.planner_overrides})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MPCResult:
    success: list[bool]              # per episode
    steps_to_goal: list[int]         # per episode; -1 when the goal was not reached
    final_distance: list[float]      # per episode, at the end (or when the goal was reached)
    plan_ms: list[float]             # wall time of every plan call (E environments at once)
    num_envs: int
    precision: str = "fp32"          # the planning rollout's precision

    @property
    def success_rate(self) -> float:
        return sum(self.success) / max(1, len(self.success))

    def latency_ms(self) -> dict[str, float]:
        """Median and 20th / 80th percentiles of the plan wall time."""
        t = sorted(self.plan_ms)
        if not t:
            return {"p20": math.nan, "median": math.nan, "p80": math.nan}
        q = lambda f: t[min(len(t) - 1, int(f * (len(t) - 1) + 0.5))]  # noqa: E731
        return {"p20": q(0.2), "median": q(0.5), "p80": q(0.8)}

    def summary(self) -> str:
        lat = self.latency_ms()
        reached = [s for s in self.steps_to_goal if s >= 0]
        steps = f", {sum(reached) / len(reached):.1f} steps on average when reached" if reached else ""
        return (f"success {sum(self.success)}/{len(self.success)} = {self.success_rate:.0%}{steps}; plan latency "
                f"median {lat['median']:.1f} ms (p20 {lat['p20']:.1f}, p80 {lat['p80']:.1f}) for "
                f"{self.num_envs} env(s) per plan, {len(self.plan_ms)} plans; precision {self.precision}")


class MPC:
    """``MPC(model, world_config, config).run(episodes, num_envs) -> MPCResult``."""

    def __init__(self, model: WorldModel, world: Optional[WorldConfig] = None, config: Optional[MPCConfig] = None,
                 device="cpu", planner: Optional[Planner] = None):
        self.model, self.config, self.device = model, config or MPCConfig(), torch.device(device)
        mc = model.cfg
        world = world or WorldConfig(image_size=mc.img_size, channels=mc.in_chans)
        if world.image_size != mc.img_size or world.channels != mc.in_chans:
            raise ValueError(f"MPC: world renders {world.channels}x{world.image_size}x{world.image_size} frames, "
                             f"the model expects {mc.in_chans}x{mc.img_size}x{mc.img_size}")
        self.world_config = world
        self.planner = planner or PLANNERS[self.config.planner](self.config.planner_config(mc.action_dim))
        self.precision = check_precision("MPC", self.config.precision, self.device)
        # CUDA: one captured plan per (environments, history length), replayed with the history, the
        # goal and the warm start copied into its static inputs (no host sync inside a plan).
        self.graphed = (self.config.graphed and self.device.type == "cuda"
                        and isinstance(self.planner, _SamplingPlanner))
        self._graphs: dict = {}
        if self.planner.config.action_dim != mc.action_dim:
            raise ValueError(f"MPC: planner action_dim must be the model's {mc.action_dim}, "
                             f"got {self.planner.config.action_dim}")

    # ---- episodes
    def episode_starts(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """States [count, 4] (at rest) and goals [count, 2] of episodes first .. first+count-1."""
        states, goals = [], []
        for i in range(first, first + count):
            w = PointMassWorld(self.world_config, 1, self.device, seed=self.config.seed + i)
            _, info = w.reset()
            states.append(info["state"])
            goals.append(info["goal"])
        return torch.cat(states), torch.cat(goals)

    def run(self, episodes: int = 8, num_envs: int = 1, max_steps: Optional[int] = None,
            progress: bool = False) -> MPCResult:
        """Run ``episodes`` seeded episodes, ``num_envs`` at a time; ``progress`` draws a bar on stderr
        (episodes finished, the current control step and the successes so far)."""
        from tqdm.auto import tqdm

        for name, v in (("episodes", episodes), ("num_envs", num_envs)):
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"MPC.run: {name} must be an int >= 1, got {v!r}")
        if max_steps is not None and not (isinstance(max_steps, int) and max_steps >= 1):
            raise ValueError(f"MPC.run: max_steps must be an int >= 1 or None, got {max_steps!r}")
        steps = max_steps or self.config.max_steps
        result = MPCResult([], [], [], [], num_envs, self.precision)
        with tqdm(total=episodes, unit="episode", desc=f"MPC ({self.config.planner})", disable=not progress,
                  dynamic_ncols=True, mininterval=progress_mininterval()) as bar:
            def on_step(step: int, world: PointMassWorld) -> None:
                bar.set_postfix_str(f"step {step + 1}/{steps}, {sum(result.success)} reached", refresh=False)
                bar.update(0)                 # redraws at most every mininterval

            for first in range(0, episodes, num_envs):
                n = min(num_envs, episodes - first)
                states, goals = self.episode_starts(first, n)
                self.rollout_episodes(states, goals, result, max_steps, on_step=on_step if progress else None)
                bar.set_postfix_str(f"{sum(result.success)} reached", refresh=False)
                bar.update(n)
        return result

    def _graphed(self, z_hist: torch.Tensor, past: torch.Tensor, z_goal: torch.Tensor) -> GraphedPlanner:
        """The captured plan for these shapes, its static history and goal set to these values."""
        key = (z_hist.shape[0], z_hist.shape[1])
        if key not in self._graphs:
            static = (z_hist.clone(), past.clone(), z_goal.clone())
            cost_fn = latent_cost(self.model, *static, self.config.cost, self.config.reduce, precision=self.precision)
            self._graphs[key] = (GraphedPlanner(self.planner, cost_fn, key[0], self.device), static)
        graphed, static = self._graphs[key]
        for buf, value in zip(static, (z_hist, past, z_goal)):
            buf.copy_(value)
        return graphed

    @torch.no_grad()
    def encode_goal(self, goals: torch.Tensor) -> torch.Tensor:
        """goals [E, 2] -> z_goal [E, D]: the frame with the mass resting on the goal, encoded."""
        return self.model.encode(render(goals, self.world_config))

    def rollout_episodes(self, states: torch.Tensor, goals: torch.Tensor, result: Optional[MPCResult] = None,
                         max_steps: Optional[int] = None, on_step=None) -> MPCResult:
        """Control E environments from ``states [E, 4]`` towards ``goals [E, 2]``; append to ``result``.

        ``on_step(step, world)`` is called after every executed action (tests measure memory there).
        """
        if states.dim() != 2 or states.shape[1] != 4:
            raise ValueError(f"MPC: initial states must be [E, 4] (x, y, vx, vy), got {list(states.shape)}")
        E = states.shape[0]
        if tuple(goals.shape) != (E, 2):
            raise ValueError(f"MPC: goals must be [E, 2] = [{E}, 2], got {list(goals.shape)}")
        for name, t in (("initial state", states), ("goal", goals)):
            if not torch.isfinite(t).all():
                raise ValueError(f"MPC: the {name} must be finite, got NaN/inf in rows "
                                 f"{torch.nonzero(~torch.isfinite(t).all(1)).flatten().tolist()}")
        result = result or MPCResult([], [], [], [], E, self.precision)
        max_steps = max_steps or self.config.max_steps
        model, cfg, h = self.model, self.config, self.model.cfg.history
        was_training = model.training
        flags = [p.requires_grad for p in model.parameters()]
        model.eval().requires_grad_(False)   # the gradient planner differentiates w.r.t. actions only
        try:
            world = PointMassWorld(self.world_config, E, self.device, seed=cfg.seed)
            obs, info = world.reset(options={"state": states.to(self.device), "goal": goals.to(self.device)})
            with torch.no_grad():
                z_goal = self.encode_goal(world.goal)
                z_hist = model.encode(obs)[:, None]                               # [E, 1, D]
            past = torch.zeros(E, 0, model.cfg.action_dim, device=self.device)    # [E, h-1, A] at most
            reached = torch.full((E,), -1, dtype=torch.int64)
            final_dist = torch.zeros(E)
            warm: Optional[Plan] = None
            done = info["success"].cpu().clone()
            reached[done] = 0
            for step in range(max_steps):
                if bool(done.all()):
                    break
                t0 = time.perf_counter()
                with torch.no_grad():
                    if self.graphed:
                        plan = self._graphed(z_hist, past, z_goal).plan(warm_start=warm)
                    else:
                        cost_fn = latent_cost(model, z_hist, past, z_goal, cfg.cost, cfg.reduce,
                                              precision=self.precision)
                        plan = self.planner.plan(cost_fn, E, self.device, warm_start=warm)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                result.plan_ms.append(1e3 * (time.perf_counter() - t0))
                warm = plan if cfg.warm_start else None
                action = plan.actions[:, 0]                                       # [E, A]
                obs, _, terminated, _, info = world.step(action)
                with torch.no_grad():
                    z_new = model.encode(obs)
                z_hist = torch.cat([z_hist, z_new[:, None]], dim=1)[:, -h:]
                past = torch.cat([past, action[:, None]], dim=1)[:, -(h - 1):] if h > 1 else past
                hit = terminated.cpu() & ~done
                reached[hit] = step + 1
                final_dist[hit] = (world.pos - world.goal).norm(dim=1).cpu()[hit]
                done |= hit
                if on_step is not None:
                    on_step(step, world)
            left = ~done
            final_dist[left] = (world.pos - world.goal).norm(dim=1).cpu()[left]
        finally:
            model.train(was_training)
            for p, f in zip(model.parameters(), flags):
                p.requires_grad_(f)
        result.success.extend(bool(r >= 0) for r in reached)
        result.steps_to_goal.extend(int(r) for r in reached)
        result.final_distance.extend(float(d) for d in final_dist)
        return result
