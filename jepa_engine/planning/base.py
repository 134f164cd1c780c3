"""What every planner shares: its config, its result, and the cost-function contract.

A planner searches action sequences ``a [E, N, H, A]`` (E environments planned at once, N candidates,
horizon H, action dim A) that minimise a cost computed by a caller-supplied function::

    cost_fn(actions [E, N, H, A]) -> costs [E, N]        (fp32; lower is better)

For a JEPA world model the cost function rolls the candidates through the predictor in embedding
space and measures the distance to the goal embedding; for tests it can be any analytic function.
The planners keep their state on the device and never read a tensor back to the host inside a plan.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from jepa_engine.config import ConfigIO

CostFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PlannerConfig(ConfigIO):
    """Search budget and action bounds (defaults: the LeWorldModel-scale CEM budget)."""

    horizon: int = 5
    action_dim: int = 2
    samples: int = 300          # N candidates per iteration (CEM, MPPI); restarts for the gradient planner
    iterations: int = 30        # I
    elites: int = 30            # K (CEM)
    temperature: float = 0.5    # MPPI softmax temperature
    momentum: float = 0.0       # weight of the previous mean/std in the refit
    init_std: float = 1.0
    min_std: float = 0.05
    low: float = -1.0
    high: float = 1.0
    lr: float = 0.1             # gradient planner (Adam)
    seed: int = 0

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"PlannerConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        need(self.horizon >= 1, "horizon", ">= 1")
        need(self.action_dim >= 1, "action_dim", ">= 1")
        need(self.samples >= 1, "samples", ">= 1")
        need(self.iterations >= 1, "iterations", ">= 1")
        need(1 <= self.elites <= self.samples, "elites", f"in [1, samples] = [1, {self.samples}]")
        need(self.temperature > 0, "temperature", "> 0")
        need(0.0 <= self.momentum <= 1.0, "momentum", "in [0, 1]")
        need(self.init_std > 0, "init_std", "> 0")
        need(self.min_std >= 0, "min_std", ">= 0")
        need(self.low < self.high, "high", f"> low = {self.low}")
        need(self.lr > 0, "lr", "> 0")



@dataclass
class Plan:
    """A planner's answer for E environments.

    actions: ``[E, H, A]`` the plan (execute ``actions[:, 0]``, re-plan: receding horizon).
    cost: ``[E]`` the cost of the best candidate evaluated in the last iteration.
    mean, std: ``[E, H * A]`` the final sampling distribution (the warm start of the next plan).
    """

    actions: torch.Tensor
    cost: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


class Planner:
    """Base class: ``plan(cost_fn, num_envs, device, warm_start=None) -> Plan``."""

    def __init__(self, config: Optional[PlannerConfig] = None):
        self.config = config or PlannerConfig()

    # ---------------------------------------------------------------------------------------------
    def initial(self, num_envs: int, device, warm_start: Optional[Plan]) -> tuple[torch.Tensor, torch.Tensor]:
        """Starting mean/std ``[E, H*A]``: zeros/init_std, or the previous plan shifted by one step."""
        c = self.config
        P = c.horizon * c.action_dim
        std = torch.full((num_envs, P), c.init_std, device=device)
        if warm_start is None:
            return torch.zeros(num_envs, P, device=device), std
        prev = warm_start.mean
        if prev.shape != (num_envs, P):
            raise ValueError(f"{type(self).__name__}: warm_start.mean must be [E, H*A] = [{num_envs}, {P}], "
                             f"got {list(prev.shape)}")
        # drop the executed first action, repeat the last one
        mean = torch.cat([prev[:, c.action_dim:], prev[:, -c.action_dim:]], dim=1)
        return mean, std

    def bounds(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        return (torch.full((c.action_dim,), c.low, device=device), torch.full((c.action_dim,), c.high, device=device))

    def check_costs(self, costs: torch.Tensor, E: int, N: int) -> None:
        if costs.shape != (E, N):
            raise ValueError(f"{type(self).__name__}: cost_fn must return [E, N] = [{E}, {N}], got {list(costs.shape)}")

    def plan(self, cost_fn: CostFn, num_envs: int = 1, device="cpu", warm_start: Optional[Plan] = None) -> Plan:
        raise NotImplementedError
