"""CEM and MPPI: sample candidates, score them, refit the Gaussian; repeat. Fused ops on the hot path.

One iteration for E environments (all on the device, no host synchronisation)::

    samples [E, N, H*A] = sample_actions(mean, std, bounds, rng, N)     (candidate 0 = current mean)
    costs   [E, N]      = cost_fn(samples.view(E, N, H, A))
    mean, std, best     = elite_refit(costs, samples, mean, std, mode)   (CEM top-K or MPPI softmax)
    rng[1] += E * N * H * A                                              (advance the Philox stream)

``sample_actions`` and ``elite_refit`` run as Triton kernels on CUDA and as their references on CPU,
drawing the same random stream for the same seed.
"""
from __future__ import annotations

from typing import Optional

import torch

from jepa_engine.kernels import elite_refit, sample_actions

from .base import CostFn, Plan, Planner


class _SamplingPlanner(Planner):
    mode = "cem"

    def plan(self, cost_fn: CostFn, num_envs: int = 1, device="cpu", warm_start: Optional[Plan] = None) -> Plan:
        c = self.config
        E, H, A = num_envs, c.horizon, c.action_dim
        mean, std = self.initial(E, device, warm_start)
        low, high = self.bounds(device)
        rng = torch.tensor([c.seed, 0], dtype=torch.int64, device=device)
        mean, std, best = self.iterate(cost_fn, mean, std, low, high, rng)
        actions = mean.clamp(c.low, c.high).view(E, H, A)
        return Plan(actions=actions, cost=best, mean=mean, std=std)

    def iterate(self, cost_fn: CostFn, mean: torch.Tensor, std: torch.Tensor, low: torch.Tensor,
                high: torch.Tensor, rng: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All ``config.iterations`` iterations from ``mean, std [E, H*A]``; advances ``rng`` in place.
        Fixed shapes and no host synchronisation: the body a CUDA graph captures (planning/graphs.py)."""
        c = self.config
        E, N, H, A = mean.shape[0], c.samples, c.horizon, c.action_dim
        step = E * N * H * A
        best = None
        for _ in range(c.iterations):
            samples = sample_actions(mean, std, low, high, rng, N)
            costs = cost_fn(samples.view(E, N, H, A)).float()
            self.check_costs(costs, E, N)
            mean, std, best, _ = elite_refit(costs, samples, mean, std, mode=self.mode, k=c.elites,
                                             temperature=c.temperature, momentum=c.momentum, min_std=c.min_std)
            rng[1] += step
        return mean, std, best


class CEMPlanner(_SamplingPlanner):
    """Cross-entropy method: refit mean/std to the K lowest-cost candidates each iteration."""

    mode = "cem"


class MPPIPlanner(_SamplingPlanner):
    """Model-predictive path integral: the mean moves to the softmax(-cost / temperature)-weighted
    average of the candidates; the sampling noise keeps its level."""

    mode = "mppi"
