"""Planning inside stable-worldmodel: our ``CEMSolver`` against stable-worldmodel's own ``CEMSolver`` on the
same ``Costable`` and budget, latency per solve.

The Costable is :class:`~jepa_engine.integrations.stable_worldmodel.WorldModelCost` over the CPU presets'
world model (``demo``: 64x64 frames, 0.35M parameters, history 1, action 2 x block 5 = 10), untrained from a
fixed seed (timing does not depend on the weights); the info dict holds one observed frame and one goal
frame per environment, as ``WorldModelPolicy`` passes it. Both solvers plan all E environments in one batch
(``batch_size=E``), start from zero mean and ``var_scale`` 1, and get the same solve: the history and goal
are encoded once per solve (cached in the info dict), then each iteration rolls out N candidates over H
model steps.

Budget: LeWorldModel's (N=300 candidates, I=30 iterations, K=30 elites, horizon H=5) on CUDA, at E=1 and
E=50 (an evaluation's 50 environments planned at once); on the CPU a reduced one (N=64, I=10, K=8, H=5,
E=1: a full 300 x 30 solve of this model takes about 0.7 s on one core, and the file is kept to a few
seconds), named in every row's group. ``BENCH_SWM_FULL=1`` runs the full budget on the CPU too.

Every row records the median latency per solve (the conftest adds ``speedup_vs``: stable-worldmodel's
median over ours) and the plan's cost under the same Costable (``plan_cost``: lower is better; both
solvers optimise the same cost, so these should be close), and the ratio is printed when the group ends.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

swm = pytest.importorskip("stable_worldmodel", reason="stable-worldmodel is not importable (`make envs` installs it)",
                          exc_type=ImportError)

from jepa_engine.integrations.stable_worldmodel import CEMSolver, WorldModelCost  # noqa: E402
from jepa_engine.models.world_model import WM_PRESETS, WorldModel, WorldModelConfig  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
FULL = dict(N=300, I=30, K=30, H=5)
BUDGET = FULL if CUDA or os.environ.get("BENCH_SWM_FULL") else dict(N=64, I=10, K=8, H=5)
ENVS = [1, 50] if CUDA else [1]
BLOCK, ENV_A = 5, 2
IMPLS = ["jepa_engine", "stable_worldmodel"]
_MEDIANS: dict[str, dict[str, float]] = {}


def build() -> WorldModelCost:
    torch.manual_seed(0)
    cfg = WorldModelConfig(**{**WM_PRESETS["demo"], "action_dim": ENV_A * BLOCK, "in_chans": 3, "history": 1})
    return WorldModelCost(WorldModel(cfg).to(DEVICE))


def info_dict(E: int, size: int) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"pixels": torch.randint(0, 256, (E, 1, size, size, 3), dtype=torch.uint8, generator=g),
            "goal": torch.randint(0, 256, (E, 1, size, size, 3), dtype=torch.uint8, generator=g)}


def plan_cost(cost: WorldModelCost, info: dict, actions: torch.Tensor) -> float:
    """The mean over environments of the Costable's cost of the returned plans ``[E, H, A]``."""
    one = {k: v.unsqueeze(1) for k, v in info.items()}                   # [E, 1, ...]: one candidate each
    with torch.no_grad():
        return float(cost.get_cost(one, actions.unsqueeze(1).to(cost.device)).mean())


@pytest.fixture(autouse=True)
def _threads():
    """One torch thread on the CPU: on 2 shared cores two threads made a solve several times slower and
    its timing erratic (the rows record the thread count)."""
    threads = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("E", ENVS)
def test_cem_solver(benchmark, run_bench, impl, E):
    N, I, K, H = BUDGET["N"], BUDGET["I"], BUDGET["K"], BUDGET["H"]
    cost = build()
    info = info_dict(E, cost.model.cfg.img_size)
    Solver = CEMSolver if impl == "jepa_engine" else swm.solver.CEMSolver
    solver = Solver(cost, batch_size=E, num_samples=N, var_scale=1.0, n_steps=I, topk=K, device=DEVICE, seed=0)
    import gymnasium as gym

    solver.configure(action_space=gym.spaces.Box(-1.0, 1.0, shape=(E, ENV_A), dtype=np.float32), n_envs=E,
                     config=swm.PlanConfig(horizon=H, receding_horizon=H, action_block=BLOCK))
    out = {}

    def solve():
        with torch.no_grad():
            out["actions"] = solver.solve(info)["actions"]

    label = "full" if BUDGET == FULL else "reduced (CPU)"
    group = f"swm CEMSolver on WorldModelCost(demo) N={N} I={I} K={K} H={H} E={E} [{label} budget]"
    run_bench(benchmark, solve, impl=impl, group=group, envs=E, budget=dict(BUDGET), budget_label=label,
              candidate_rollouts_per_solve=E * N * I, batch_size=E, threads=torch.get_num_threads(), warmup=2)
    benchmark.extra_info["plan_cost"] = plan_cost(cost, info, out["actions"])
    if getattr(benchmark, "stats", None) is None:          # --benchmark-disable: nothing timed
        return
    med = benchmark.stats.stats.median / benchmark.extra_info["calls_per_round"]
    mine = _MEDIANS.setdefault(group, {})
    mine[impl] = med
    benchmark.extra_info["solve_ms"] = 1e3 * med
    if len(mine) == len(IMPLS):
        ratio = mine["stable_worldmodel"] / mine["jepa_engine"]
        print(f"\n{group}: jepa_engine {1e3 * mine['jepa_engine']:.1f} ms, stable_worldmodel "
              f"{1e3 * mine['stable_worldmodel']:.1f} ms per solve: ratio (theirs / ours) {ratio:.2f}x")
