"""Planners on an analytic cost with a known optimum; fused path vs reference path; memory."""
from __future__ import annotations

import resource

import pytest
import torch

from jepa_engine.kernels import use_backend
from jepa_engine.planning import CEMPlanner, GradientPlanner, MPPIPlanner, PlannerConfig

H, A = 4, 2
TARGET = torch.tensor([[0.5, -0.3], [0.2, 0.7], [-0.6, 0.1], [0.0, 0.9]])  # [H, A], inside the bounds


def quadratic(actions: torch.Tensor) -> torch.Tensor:
    """[E, N, H, A] -> [E, N]: squared distance to TARGET, env e's target shifted by 0.05 * e."""
    E = actions.shape[0]
    shift = 0.05 * torch.arange(E, dtype=actions.dtype, device=actions.device).view(E, 1, 1, 1)
    return (actions - (TARGET.to(actions.device) + shift).clamp(-1, 1)).square().sum(dim=(2, 3))


def optimum(E: int) -> torch.Tensor:
    return (TARGET + 0.05 * torch.arange(E, dtype=torch.float32).view(E, 1, 1)).clamp(-1, 1)


@pytest.mark.parametrize("planner,cfg,tol", [
    (CEMPlanner, dict(samples=200, iterations=12, elites=20), 0.05),
    (MPPIPlanner, dict(samples=200, iterations=30, temperature=0.01, init_std=0.1, momentum=0.5), 0.05),
    (GradientPlanner, dict(samples=4, elites=1, iterations=100, lr=0.05), 1e-2),
])
def test_converges_to_known_optimum(planner, cfg, tol):
    with use_backend("reference"):
        plan = planner(PlannerConfig(horizon=H, action_dim=A, **cfg)).plan(quadratic, num_envs=3)
    err = (plan.actions - optimum(3)).abs().max().item()
    assert err < tol, f"{planner.__name__}: max |plan - optimum| = {err:.4f} (tolerance {tol})"
    assert plan.actions.shape == (3, H, A) and plan.cost.shape == (3,)


def test_bounds_are_respected():
    far = lambda a: (a - 5.0).square().sum(dim=(2, 3))  # optimum outside the box: plan sits on the bound
    for planner in (CEMPlanner, MPPIPlanner, GradientPlanner):
        with use_backend("reference"):
            plan = planner(PlannerConfig(horizon=H, action_dim=A, samples=64, iterations=10, elites=8)).plan(far, 2)
        assert plan.actions.max().item() <= 1.0 and plan.actions.min().item() >= -1.0


@pytest.mark.parametrize("planner", [CEMPlanner, MPPIPlanner])
def test_fused_path_equals_reference_path(kernel_device, planner):
    cfg = PlannerConfig(horizon=H, action_dim=A, samples=64, iterations=4, elites=8, seed=3)
    plans = []
    for backend in ("triton", "reference"):
        with use_backend(backend):
            plans.append(planner(cfg).plan(quadratic, num_envs=2, device=kernel_device))
    torch.testing.assert_close(plans[0].actions, plans[1].actions, atol=1e-4, rtol=1e-4)


@use_backend("reference")
def test_warm_start_shifts_the_previous_plan():
    cfg = PlannerConfig(horizon=H, action_dim=A, samples=100, iterations=5, elites=10)
    planner = CEMPlanner(cfg)
    first = planner.plan(quadratic, 2)
    mean, _ = planner.initial(2, "cpu", first)
    assert torch.equal(mean[:, :-A], first.mean[:, A:]) and torch.equal(mean[:, -A:], first.mean[:, -A:])
    with pytest.raises(ValueError, match=r"warm_start.mean must be \[E, H\*A\] = \[3, 8\], got \[2, 8\]"):
        planner.plan(quadratic, 3, warm_start=first)


@use_backend("reference")
def test_memory_flat_across_replans():
    planner = CEMPlanner(PlannerConfig(horizon=H, action_dim=A, samples=300, iterations=5, elites=30))
    plan = planner.plan(quadratic, 4)
    for _ in range(3):
        plan = planner.plan(quadratic, 4, warm_start=plan)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(20):
        plan = planner.plan(quadratic, 4, warm_start=plan)
    grew_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    assert grew_kb < 20_000, f"peak RSS grew by {grew_kb} kB over 20 re-plans"


@pytest.mark.parametrize("kw,match", [
    (dict(horizon=0), r"PlannerConfig.horizon must be >= 1, got 0"),
    (dict(samples=10, elites=11), r"PlannerConfig.elites must be in \[1, samples\] = \[1, 10\], got 11"),
    (dict(low=1.0, high=-1.0), r"PlannerConfig.high must be > low = 1.0, got -1.0"),
    (dict(temperature=0.0), r"PlannerConfig.temperature must be > 0, got 0.0"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        PlannerConfig(**kw)


def test_cost_fn_shape_is_checked():
    with pytest.raises(ValueError, match=r"cost_fn must return \[E, N\] = \[2, 16\], got \[2\]"):
        CEMPlanner(PlannerConfig(samples=16, elites=4, iterations=1)).plan(lambda a: a.sum(dim=(1, 2, 3)), 2)
