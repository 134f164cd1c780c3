"""jepa_engine inside stable-worldmodel: the Costable adapter, the solvers, the eval protocol.

Needs stable-worldmodel (`make envs`; `make test` installs it): skipped, with the reason, where it
cannot be imported. A TwoRoom dataset of 6 short expert episodes at 32x32 is collected once per module
(a few seconds); the model is the test-sized world model (untrained: these tests check the plumbing and
the planner's numbers, not a trained model's success).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

swm = pytest.importorskip("stable_worldmodel", reason="stable-worldmodel is not importable (`make envs` installs it)",
                          exc_type=ImportError)

from jepa_engine.integrations.stable_worldmodel import (  # noqa: E402
    CACHE_KEY, CEMSolver, MPPISolver, WorldModelCost, frames_for_model,
)
from jepa_engine.integrations import swm_eval  # noqa: E402
from jepa_engine.models.world_model import WM_PRESETS, WorldModel, WorldModelConfig  # noqa: E402
from jepa_engine.planning import CEMPlanner, MPPIPlanner, PlannerConfig  # noqa: E402
from jepa_engine.planning.latent_cost import latent_cost  # noqa: E402
from tests.helpers import reference_ops_one_thread  # noqa: E402

ENV = "swm/TwoRoom-v1"
BLOCK = 5                      # LeWorldModel's action block: a model action is 5 env actions (2-D each)


@pytest.fixture(autouse=True)
def _reference_ops():
    """The ops on their references, torch on one thread: these tests check the integration (the kernels
    are checked against the same references in tests/kernels)."""
    with reference_ops_one_thread():
        yield


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from jepa_engine.integrations.swm_data import collect

    out = tmp_path_factory.mktemp("tworoom") / "data"
    with reference_ops_one_thread():           # the env renders with torch ops: one thread on busy cores
        collect(ENV, "expert", episodes=6, steps=60, out=out, size=32, seed=0, log=None)
    return out


def tiny_model(action_dim: int = 2 * BLOCK, seed: int = 0) -> WorldModel:
    torch.manual_seed(seed)
    return WorldModel(WorldModelConfig(**{**WM_PRESETS["test"], "action_dim": action_dim, "in_chans": 3})).eval()


def plan_config(horizon: int = 5, receding: int = 5, block: int = BLOCK):
    return swm.PlanConfig(horizon=horizon, receding_horizon=receding, action_block=block)


class Box:
    """A batched 2-D Box as World's env pool exposes it (shape [n_envs, 2])."""

    def __init__(self, n: int, low: float = -1.0, high: float = 1.0):
        import gymnasium as gym

        self.space = gym.spaces.Box(low, high, shape=(n, 2), dtype=np.float32)


class Quadratic:
    """An analytic Costable: ``sum_{h, a} (x - target)^2`` with a per-environment target in the info dict;
    counts its calls and records every candidate it scores."""

    def __init__(self):
        self.calls, self.seen = 0, []

    def get_cost(self, info_dict, candidates):
        self.calls += 1
        self.seen.append(candidates.detach().clone())
        target = info_dict["target"][:, 0].to(candidates)                     # [B, H, A]
        return ((candidates - target[:, None]) ** 2).sum((2, 3)).float()


def quadratic_info(B: int, H: int, A: int, scale: float = 0.5, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"target": scale * torch.randn(B, H, A, generator=g)}


# --------------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------------
def test_cost_equals_latent_cost_and_encodes_once(dataset):
    from jepa_engine.integrations.swm_data import TrajectoryDataset

    model = tiny_model()
    data = TrajectoryDataset(dataset)
    frames = torch.from_numpy(np.stack([data.rows(e, 0, 1, ["pixels"])["pixels"][0] for e in range(3)]))  # [3,h,w,c]
    goals = torch.from_numpy(np.stack([data.rows(e, 20, 21, ["pixels"])["pixels"][0] for e in range(3)]))
    B, S, H, A = 3, 7, 4, 2 * BLOCK
    info = {"pixels": frames[:, None, None].expand(B, S, 1, *frames.shape[1:]),
            "goal": goals[:, None, None].expand(B, S, 1, *goals.shape[1:])}
    cand = torch.rand(B, S, H, A, generator=torch.Generator().manual_seed(1)) * 2 - 1
    cost = WorldModelCost(model)
    got = cost.get_cost(info, cand)
    with torch.no_grad():
        z = model.encode(frames_for_model(torch.cat([frames, goals]), model))
        want = latent_cost(model, z[:B, None], torch.zeros(B, 0, A), z[B:])(cand)
    assert got.shape == (B, S) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert CACHE_KEY in info and cost.encodes == 1
    cost.get_cost(info, cand)                           # a second iteration of the same solve: cached
    assert cost.encodes == 1
    # the model's input is the training's: uint8 HWC -> [0, 1] CHW
    from jepa_engine.training.trajectory_data import frames_to_obs

    torch.testing.assert_close(frames_for_model(frames, model), frames_to_obs(frames.numpy()))


def test_adapter_and_solver_in_swm_world(dataset):
    """Our solver and cost inside stable-worldmodel's own World / WorldModelPolicy on a short TwoRoom
    evaluation (4 episodes): one encoder pass per solve, every executed action within the bounds."""
    from jepa_engine.integrations.swm_data import swm_dataset

    cost = WorldModelCost(tiny_model())
    solver = CEMSolver(cost, num_samples=16, n_steps=2, topk=4, seed=0)
    plans = []
    solve = solver.solve

    def recording_solve(info, init_action=None):
        out = solve(info, init_action)
        plans.append(out["actions"])
        return out

    solver.solve = recording_solve
    world = swm.World(ENV, num_envs=4, image_shape=(32, 32), max_episode_steps=100)
    try:
        world.set_policy(swm.policy.WorldModelPolicy(solver=solver, config=plan_config()))
        res = world.evaluate(dataset=swm_dataset(dataset), episodes_idx=[0, 1, 2, 3], start_steps=[0, 3, 6, 9],
                             goal_offset=25, eval_budget=50, callables=swm_eval.ENV_SETUP[ENV])
    finally:
        world.close()
    assert len(res["episode_successes"]) == 4 and 0.0 <= res["success_rate"] <= 100.0
    # 50 env steps, 25 per plan: a plan at step 0 for every env and one at step 25 for those still running
    assert len(plans) == 2 and plans[0].shape == (4, 5, 2 * BLOCK)
    assert 1 <= plans[1].shape[0] <= 4
    assert cost.encodes == len(solver.timings) == 2
    assert sum(e for _, e in solver.timings) == sum(p.shape[0] for p in plans)
    acts = torch.cat([p.flatten() for p in plans])
    assert bool(torch.isfinite(acts).all()) and float(acts.abs().max()) <= 1.0


# --------------------------------------------------------------------------------------------------
# The solver
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("Solver, Planner", [(CEMSolver, CEMPlanner), (MPPISolver, MPPIPlanner)])
def test_solver_gives_the_planners_plan(Solver, Planner):
    """Same seed, same cost: the solver's plan is jepa_engine's planner's, to the bit."""
    B, H, A, N = 3, 4, 2 * BLOCK, 64
    info = quadratic_info(B, H, A)
    solver = Solver(Quadratic(), num_samples=N, n_steps=5, topk=8, var_scale=0.7, seed=11)
    solver.configure(action_space=Box(B).space, n_envs=B, config=plan_config(horizon=H))
    out = solver.solve(info)
    ref_cost = Quadratic()
    planner = Planner(PlannerConfig(horizon=H, action_dim=A, samples=N, iterations=5, elites=8, init_std=0.7, seed=11))
    ref = planner.plan(lambda a: ref_cost.get_cost({"target": info["target"][:, None]}, a), B)
    assert out["actions"].shape == (B, H, A)
    assert torch.equal(out["actions"], ref.actions.cpu())
    torch.testing.assert_close(torch.tensor(out["costs"]), ref.cost.cpu())


def test_solver_vs_swm_cemsolver_on_one_costable():
    """Our CEMSolver and stable-worldmodel's on the same Costable and budget: both find the minimum
    where it lies inside the bounds; where the target leaves them, only ours stays inside (the plan
    clipped to the box) and its cost is the bounded optimum."""
    B, H, A, N, I, K = 4, 5, 2, 128, 10, 16          # action block 1: a 10-dimensional search per env
    info = quadratic_info(B, H, A, scale=0.3)
    results = {}
    for name, Solver in (("ours", CEMSolver), ("swm", swm.solver.CEMSolver)):
        q = Quadratic()
        s = Solver(q, num_samples=N, n_steps=I, topk=K, seed=5)
        s.configure(action_space=Box(B).space, n_envs=B, config=plan_config(horizon=H, block=1))
        out = s.solve(info)
        results[name] = (out["actions"], q)
    target = info["target"]
    for name, (act, q) in results.items():
        err = float((act - target).abs().max())
        # ours keeps a std floor (min_std 0.05), which bounds its last refinement: 0.02 measured
        assert err < 0.08, f"{name}: plan is {err:.3f} from the in-bounds minimum"
        # ours plans the B environments in one batch; stable-worldmodel's (batch_size=1) one at a time
        assert q.calls == (I if name == "ours" else B * I)
    # a target outside the box: ours clips every candidate, swm's samples leave the box
    far = {"target": torch.full((B, H, A), 1.6)}
    q_ours, q_swm = Quadratic(), Quadratic()
    ours = CEMSolver(q_ours, num_samples=N, n_steps=I, topk=K, seed=5)
    theirs = swm.solver.CEMSolver(q_swm, num_samples=N, n_steps=I, topk=K, seed=5)
    for s in (ours, theirs):
        s.configure(action_space=Box(B).space, n_envs=B, config=plan_config(horizon=H, block=1))
    a_ours, a_swm = ours.solve(far)["actions"], theirs.solve(far)["actions"]
    assert max(float(c.abs().max()) for c in q_ours.seen) <= 1.0
    assert max(float(c.abs().max()) for c in q_swm.seen) > 1.0
    assert float(a_ours.max()) <= 1.0 and float(a_swm.max()) > 1.0
    torch.testing.assert_close(a_ours, torch.ones_like(a_ours), atol=0.05, rtol=0)


def test_solver_warm_start_and_fresh_draws():
    """``init_action`` (the rest of the previous plan) starts the mean; consecutive solves draw new
    candidates (the Philox offset advances), and a solver rebuilt with the seed repeats them."""
    B, H, A = 2, 3, 2 * BLOCK
    info = quadratic_info(B, H, A)

    def solver():
        s = CEMSolver(Quadratic(), num_samples=8, n_steps=1, topk=2, seed=3)
        s.configure(action_space=Box(B).space, n_envs=B, config=plan_config(horizon=H))
        return s

    s = solver()
    init = torch.full((B, 1, A), 0.25)
    s.solve(info, init_action=init)
    first = s.model.seen[0]
    assert torch.equal(first[:, 0, 0], init[:, 0])               # candidate 0 is the mean: init, then zeros
    assert torch.equal(first[:, 0, 1:], torch.zeros(B, H - 1, A))
    s.solve(info, init_action=init)
    assert not torch.equal(s.model.seen[1][:, 1:], first[:, 1:])
    t = solver()
    t.solve(info, init_action=init)
    assert torch.equal(t.model.seen[0], first)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def test_action_dimension_mismatch_is_named():
    cost = WorldModelCost(tiny_model(action_dim=2))               # a model of 2-D actions, planned with block 5
    s = CEMSolver(cost, num_samples=8, n_steps=1, topk=2)
    with pytest.raises(ValueError, match=r"action_dim must be .* = 2 x 5 = 10, got 2"):
        s.configure(action_space=Box(2).space, n_envs=2, config=plan_config())
    info = {"pixels": torch.zeros(1, 4, 1, 32, 32, 3, dtype=torch.uint8),
            "goal": torch.zeros(1, 4, 1, 32, 32, 3, dtype=torch.uint8)}
    with pytest.raises(ValueError, match=r"action_candidates must be \[B, S, H, A\] with A = .* 2 .*got \[1, 4, 5, 10\]"):
        cost.get_cost(info, torch.zeros(1, 4, 5, 10))
    with pytest.raises(ValueError, match=r"init_action must be \[B, t, A\] .* A = 10, got \[2, 1, 3\]"):
        s2 = CEMSolver(Quadratic(), num_samples=8, n_steps=1, topk=2)
        s2.configure(action_space=Box(2).space, n_envs=2, config=plan_config())
        s2.solve(quadratic_info(2, 5, 10), init_action=torch.zeros(2, 1, 3))
    with pytest.raises(TypeError, match="must be a Costable"):
        CEMSolver(object())


def test_eval_bad_input(dataset):
    model = tiny_model()
    with pytest.raises(ValueError, match=r"env must be .*got 'swm/TwoRooms-v1'"):
        swm_eval.evaluate(model, dataset, swm_eval.EvalConfig(env="swm/TwoRooms-v1", episodes=2))
    with pytest.raises(ValueError, match=r"action_dim must be the env's action dim x action_block = 2 x 3 = 6, got 10"):
        swm_eval.evaluate(model, dataset, swm_eval.EvalConfig(episodes=2, action_block=3))
    with pytest.raises(ValueError, match=r"episodes must be <= the \d+ start rows"):
        swm_eval.evaluate(model, dataset, swm_eval.EvalConfig(episodes=100_000))
    with pytest.raises(ValueError, match=r"EvalConfig.planner must be one of \['cem', 'mppi'\], got 'grad'"):
        swm_eval.EvalConfig(planner="grad")


def test_sample_starts_leave_room_for_the_goal():
    lengths = np.array([30, 26, 10, 40])
    ep, start = swm_eval.sample_starts(lengths, 25, 15, seed=0)
    assert len(set(zip(ep.tolist(), start.tolist()))) == 15
    assert np.all(start + 25 < lengths[ep]) and 2 not in ep.tolist()
    ep2, start2 = swm_eval.sample_starts(lengths, 25, 15, seed=0)
    assert np.array_equal(ep, ep2) and np.array_equal(start, start2)


# --------------------------------------------------------------------------------------------------
# The command, end to end at test size
# --------------------------------------------------------------------------------------------------
def test_collect_train_eval_cli(dataset, tmp_path, capsys):
    from jepa_engine.cli import main

    run = tmp_path / "run"
    assert main(["train-wm", "--config", "data-test", "--data", str(dataset), "--out", str(run), "--steps", "2",
                 "--no-report"]) == 0
    capsys.readouterr()
    assert main(["eval", "--env", ENV, "--checkpoint", str(run), "--episodes", "3", "--samples", "8",
                 "--iterations", "2", "--elites", "2", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    report = json.loads((run / "eval" / "eval-TwoRoom-v1-cem.json").read_text())
    assert [r["policy"] for r in report["rows"]] == ["jepa cem 8x2", "random actions", "dataset replay"]
    replay = report["rows"][2]
    assert replay["successes"] == 3, "replaying the dataset's own actions reaches its own goal frame"
    lat = report["rows"][0]["plan_ms"]
    assert lat["plans"] >= 1 and 0 < lat["median"] <= lat["p90"]
    assert report["budget"] == {"planner": "cem", "samples": 8, "iterations": 2, "elites": 2, "horizon": 5,
                                "receding": 5, "action_block": 2, "candidate_rollouts_per_plan": 16, "precision": "fp32"}
    assert report["protocol"]["history"] == 2, "the data-test preset's model is planned from its 2 frames"
    assert "| dataset replay | 3/3 = 100% |" in (run / "eval" / "eval-TwoRoom-v1-cem.md").read_text()
    assert "dataset replay" in out
    assert main(["eval", "--env", "swm/Nope-v1", "--checkpoint", str(run), "--episodes", "2"]) == 2
    assert "env must be" in capsys.readouterr().err


def test_world_model_cost_runs_at_the_asked_precision():
    """The Costable's rollout at tf32 (emulated on the CPU) and bf16 stays close to fp32; a bad precision
    names itself."""
    model = tiny_model()
    with pytest.raises(ValueError, match="WorldModelCost: precision must be one of"):
        WorldModelCost(model, precision="fp8")
    B, S, H = 2, 5, 3
    g = torch.Generator().manual_seed(0)
    frames = (torch.rand(2 * B, 32, 32, 3, generator=g) * 255).to(torch.uint8)
    info = {"pixels": frames[:B, None, None].expand(B, S, 1, 32, 32, 3),
            "goal": frames[B:, None, None].expand(B, S, 1, 32, 32, 3)}
    cand = torch.rand(B, S, H, model.cfg.action_dim, generator=g) * 2 - 1
    costs = {p: WorldModelCost(model, precision=p).get_cost(dict(info), cand) for p in ("fp32", "tf32", "bf16")}
    scale = costs["fp32"].abs().max()
    assert (costs["tf32"] - costs["fp32"]).abs().max() < 2e-3 * scale
    assert (costs["bf16"] - costs["fp32"]).abs().max() < 5e-2 * scale
