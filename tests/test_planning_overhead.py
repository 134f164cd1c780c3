"""The sampling planners' native CPU loop: the C++ ops called directly, decided once per plan, with the
plans of the public-op loop bit for bit; the cost function's output checked at the entry of a plan.
(Speed is measured in benches/bench_planning.py, not here.)"""
from __future__ import annotations

import sys

import pytest
import torch

from jepa_engine.kernels import _native, use_backend
from jepa_engine.planning import CEMPlanner, MPPIPlanner, PlannerConfig

SAMPLING = sys.modules["jepa_engine.planning.sampling"]
H, A = 4, 2


def quadratic(actions: torch.Tensor) -> torch.Tensor:  # [E, N, H, A] -> [E, N]
    E = actions.shape[0]
    shift = 0.05 * torch.arange(E, dtype=actions.dtype).view(E, 1, 1, 1)
    return (actions - 0.3 - shift).square().sum(dim=(2, 3))


@pytest.fixture
def native_cpu(plain_cpu):
    """A user's CPU process with the native library: no Triton interpreter, so the C++ path is taken."""
    if not (_native.schema("sample_actions") and _native.schema("elite_refit")):
        pytest.skip(f"the native planning ops are not loaded: {_native.status()}")


def public_ops(*args):
    return SAMPLING._public_sample, SAMPLING._public_refit


def plans(cls, cfg, E, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        first = cls(cfg).plan(quadratic, E)
        return first, cls(cfg).plan(quadratic, E, warm_start=first)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("cls", [CEMPlanner, MPPIPlanner])
@pytest.mark.parametrize("E,kw", [
    (1, dict()),
    (3, dict(momentum=0.3, seed=7, min_std=0.1)),
    (8, dict(samples=300, elites=30, seed=11)),
    (12, dict(samples=300, elites=30, seed=5)),     # 36000 values: above the one-thread size
])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_loop_equals_public_op_loop(native_cpu, monkeypatch, cls, E, kw, threads):
    cfg = PlannerConfig(horizon=H, action_dim=A, **{"samples": 64, "elites": 8, "iterations": 5, **kw})
    got = plans(cls, cfg, E, threads)
    monkeypatch.setattr(SAMPLING, "_ops", public_ops)
    want = plans(cls, cfg, E, threads)
    for g, w in zip(got, want):
        for name in ("actions", "cost", "mean", "std"):
            assert torch.equal(getattr(g, name), getattr(w, name)), name


def test_native_loop_calls_no_public_op(native_cpu, monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a public op ran inside the native loop")
    monkeypatch.setattr(SAMPLING, "sample_actions", fail)
    monkeypatch.setattr(SAMPLING, "elite_refit", fail)
    threads = torch.get_num_threads()
    plan = CEMPlanner(PlannerConfig(horizon=H, action_dim=A, samples=64, elites=8, iterations=3)).plan(quadratic, 2)
    assert plan.actions.shape == (2, H, A)
    assert torch.get_num_threads() == threads


def test_a_forced_backend_takes_the_public_ops(monkeypatch):
    calls = []
    real = SAMPLING._public_sample
    monkeypatch.setattr(SAMPLING, "_public_sample", lambda *a: calls.append(1) or real(*a))
    cfg = PlannerConfig(horizon=H, action_dim=A, samples=32, elites=4, iterations=2)
    with use_backend("reference"):
        CEMPlanner(cfg).plan(quadratic, 1)
    assert len(calls) == 2


def test_rng_advances_in_place(native_cpu):
    planner = CEMPlanner(PlannerConfig(horizon=H, action_dim=A, samples=16, elites=4, iterations=3, seed=9))
    mean, std = planner.initial(2, "cpu", None)
    low, high = planner.bounds("cpu")
    rng = torch.tensor([9, 100], dtype=torch.int64)
    planner.iterate(quadratic, mean, std, low, high, rng)
    assert rng.tolist() == [9, 100 + 3 * 2 * 16 * H * A]


def test_cost_shape_checked_at_entry_and_by_the_op_later(native_cpu):
    cfg = PlannerConfig(horizon=H, action_dim=A, samples=16, elites=4, iterations=3)
    with pytest.raises(ValueError, match=r"CEMPlanner: cost_fn must return \[E, N\] = \[2, 16\], got \[2\]"):
        CEMPlanner(cfg).plan(lambda a: a.sum(dim=(1, 2, 3)), 2)
    calls = []

    def shrinks(a):  # right on the first iteration, wrong on the second
        calls.append(1)
        c = quadratic(a)
        return c if len(calls) == 1 else c[:, :-1]
    with pytest.raises(ValueError, match=r"elite_refit: costs must be \[E, N\] = \[2, 16\], got \[2, 15\]"):
        CEMPlanner(cfg).plan(shrinks, 2)
