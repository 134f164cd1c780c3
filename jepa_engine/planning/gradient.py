"""Gradient planner: optimise the action sequence by backpropagation through the cost.

R restarts per environment (``config.samples``) start from the warm-start mean plus noise (restart 0
exactly at the mean); ``config.iterations`` Adam steps at ``config.lr`` minimise the summed cost, each
step followed by a projection onto the action bounds; the restart with the lowest final cost is the
plan. ``cost_fn`` must be differentiable in the actions (a world model's predictor is).
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import CostFn, Plan, Planner


class GradientPlanner(Planner):
    def plan(self, cost_fn: CostFn, num_envs: int = 1, device="cpu", warm_start: Optional[Plan] = None) -> Plan:
        c = self.config
        E, R, H, A = num_envs, c.samples, c.horizon, c.action_dim
        mean, std = self.initial(E, device, warm_start)
        g = torch.Generator(device=device).manual_seed(c.seed)
        noise = torch.randn((E, R, H * A), generator=g, device=device) * std[:, None, :]
        noise[:, 0] = 0.0
        actions = (mean[:, None, :] + noise).clamp(c.low, c.high).requires_grad_(True)
        opt = torch.optim.Adam([actions], lr=c.lr)
        for _ in range(c.iterations):
            with torch.enable_grad():
                costs = cost_fn(actions.view(E, R, H, A)).float()
                self.check_costs(costs, E, R)
                opt.zero_grad(set_to_none=True)
                costs.sum().backward()
            opt.step()
            with torch.no_grad():
                actions.clamp_(c.low, c.high)
        with torch.no_grad():
            costs = cost_fn(actions.view(E, R, H, A)).float()
            best_cost, best = costs.min(dim=1)
            plan = actions[torch.arange(E, device=device), best]
        return Plan(actions=plan.view(E, H, A).detach(), cost=best_cost, mean=plan.detach(), std=std)
