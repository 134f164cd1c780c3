"""CEM planning iterations (sampling + cost + elite refit) against the textbook eager loop.

The cost is analytic (quadratic in the actions), so the rows measure the planner's own overhead:
what the fused ``sample_actions`` / ``elite_refit`` ops save over the loop published planners write.
"""
from __future__ import annotations

import pytest
import torch

from jepa_engine.planning import CEMPlanner, PlannerConfig
from jepa_engine.profiling.bench_shapes import CEM_BUDGET, CEM_ENVS

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
N, H, A, I, K = (CEM_BUDGET[k] for k in "NHAIK")  # LeWorldModel's CEM budget
ENVS = CEM_ENVS if CUDA else [1, 8]


def quadratic(actions):  # [E, N, H, A] -> [E, N]
    return (actions - 0.3).square().sum(dim=(2, 3))


def cem_eager(cost_fn, E, device):
    """The straightforward loop: randn, clamp, cost, topk, mean/std of the elites."""
    mean = torch.zeros(E, H, A, device=device)
    std = torch.ones(E, H, A, device=device)
    for _ in range(I):
        samples = (mean[:, None] + std[:, None] * torch.randn(E, N, H, A, device=device)).clamp(-1, 1)
        costs = cost_fn(samples)
        idx = costs.topk(K, dim=1, largest=False).indices
        elites = samples[torch.arange(E, device=device)[:, None], idx]
        mean, std = elites.mean(dim=1), elites.std(dim=1).clamp_min(0.05)
    return mean


@pytest.mark.parametrize("impl", ["jepa_engine", "eager_loop"])
@pytest.mark.parametrize("E", ENVS)
def test_cem_plan(benchmark, run_bench, impl, E):
    if impl == "jepa_engine":
        planner = CEMPlanner(PlannerConfig(horizon=H, action_dim=A, samples=N, iterations=I, elites=K))
        fn = lambda: planner.plan(quadratic, E, DEVICE)
    else:
        fn = lambda: cem_eager(quadratic, E, DEVICE)
    run_bench(benchmark, fn, impl=impl, group=f"CEM plan N={N} H={H} I={I} K={K} E={E}", envs=E,
              budget=dict(N=N, H=H, I=I, K=K))
