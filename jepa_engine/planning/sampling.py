"""CEM and MPPI: sample candidates, score them, refit the Gaussian; repeat. Fused ops on the hot path.

One iteration for E environments (all on the device, no host synchronisation)::

    samples [E, N, H*A] = sample_actions(mean, std, bounds, rng, N)     (candidate 0 = current mean)
    costs   [E, N]      = cost_fn(samples.view(E, N, H, A))
    mean, std, best     = elite_refit(costs, samples, mean, std, mode)   (CEM top-K or MPPI softmax)
    rng[1] += E * N * H * A                                              (advance the Philox stream)

``sample_actions`` and ``elite_refit`` run as Triton kernels on CUDA and as their references on CPU,
drawing the same random stream for the same seed. On CPU tensors with the native library loaded the
loop calls its C++ ops directly: which ops run is decided once, at the entry of a plan, and the C++
kernels check their own arguments, so no Python dispatch or argument check runs per iteration.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from jepa_engine.kernels import _native, elite_refit, sample_actions

from .base import CostFn, Plan, Planner


def _public_sample(mean, std, low, high, rng, n, include_mean):
    return sample_actions(mean, std, low, high, rng, n, include_mean=include_mean)


def _public_refit(costs, samples, mean, std, mode, k, temperature, momentum, min_std):
    return elite_refit(costs, samples, mean, std, mode=mode, k=k, temperature=temperature, momentum=momentum,
                       min_std=min_std)


def _ops(planner: _SamplingPlanner, mean, std, low, high, rng) -> tuple[Callable, Callable]:
    """``(sample, refit)`` for one plan: the C++ ops when its tensors and config take the native CPU path
    (the path the public ``sample_actions`` / ``elite_refit`` would take), else the public ops."""
    c = planner.config
    if not (_native.schema("sample_actions") and _native.schema("elite_refit")
            and _native.cpu_kernel_runs(mean, std, low, high, rng)
            and isinstance(c.samples, int) and isinstance(c.elites, int) and isinstance(planner.mode, str)
            and all(isinstance(v, (int, float)) for v in (c.temperature, c.momentum, c.min_std))):
        return _public_sample, _public_refit
    return torch.ops.jepa_engine.sample_actions.default, torch.ops.jepa_engine.elite_refit.default


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
        offset = rng[1:]   # a view: advancing it advances rng[1] in place
        sample, refit = _ops(self, mean, std, low, high, rng)
        mode, k, temperature, momentum, min_std = self.mode, c.elites, c.temperature, c.momentum, c.min_std
        best = None
        for i in range(c.iterations):
            samples = sample(mean, std, low, high, rng, N, True)
            costs = cost_fn(samples.view(E, N, H, A)).float()
            if i == 0:   # the caller's cost function, checked once (elite_refit checks the costs' shape too)
                self.check_costs(costs, E, N)
            mean, std, best, _ = refit(costs, samples, mean, std, mode, k, temperature, momentum, min_std)
            offset += step
        return mean, std, best


class CEMPlanner(_SamplingPlanner):
    """Cross-entropy method: refit mean/std to the K lowest-cost candidates each iteration."""

    mode = "cem"


class MPPIPlanner(_SamplingPlanner):
    """Model-predictive path integral: the mean moves to the softmax(-cost / temperature)-weighted
    average of the candidates; the sampling noise keeps its level."""

    mode = "mppi"
