"""The CUDA-graphed plan: same results as the plain planner (CPU here; graph replay on CUDA),
and the MPC cost through the fused latent_cost op equals the cost written out."""
from __future__ import annotations

import pytest
import torch

from jepa_engine.kernels import use_backend
from jepa_engine.models.world_model import WorldModel, WorldModelConfig
from jepa_engine.planning import CEMPlanner, GradientPlanner, MPPIPlanner, PlannerConfig, latent_cost
from jepa_engine.planning.graphs import GraphedPlanner
from tests.helpers import assert_close

CFG = dict(horizon=4, action_dim=2, samples=40, iterations=5, elites=6, seed=7)


def quadratic(actions):  # [E, N, H, A] -> [E, N]
    return (actions - 0.3).square().sum(dim=(2, 3))


@pytest.mark.parametrize("cls", [CEMPlanner, MPPIPlanner])
@pytest.mark.parametrize("E", [1, 3])
def test_cpu_wrapper_equals_plain_planner(cls, E):
    planner = cls(PlannerConfig(**CFG))
    graphed = GraphedPlanner(planner, quadratic, E, "cpu")
    assert not graphed.uses_graph
    a, b = planner.plan(quadratic, E, "cpu"), graphed.plan()
    for name in ("actions", "cost", "mean", "std"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    # warm start: the same shifted distribution on both paths
    a2, b2 = planner.plan(quadratic, E, "cpu", warm_start=a), graphed.plan(warm_start=b)
    assert torch.equal(a2.mean, b2.mean) and torch.equal(a2.cost, b2.cost)


def test_offset_changes_the_stream():
    graphed = GraphedPlanner(CEMPlanner(PlannerConfig(**CFG)), quadratic, 1, "cpu")
    assert not torch.equal(graphed.plan(offset=0).mean, graphed.plan(offset=10_000).mean)


def test_bad_input():
    with pytest.raises(TypeError, match="CEMPlanner or MPPIPlanner"):
        GraphedPlanner(GradientPlanner(PlannerConfig(**CFG)), quadratic, 1, "cpu")
    with pytest.raises(ValueError, match="num_envs must be an int >= 1"):
        GraphedPlanner(CEMPlanner(PlannerConfig(**CFG)), quadratic, 0, "cpu")
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        GraphedPlanner(CEMPlanner(PlannerConfig(**CFG)), quadratic, 1, "cpu").capture()


@pytest.mark.parametrize("cost,reduce", [("l2", "final"), ("l1", "sum")])
def test_mpc_cost_through_fused_op(kernel_device, cost, reduce):
    torch.manual_seed(0)
    model = WorldModel(WorldModelConfig.from_name("test")).eval()
    E, N, H, h = 2, 3, 2, 2
    D, A = model.cfg.embed_dim, model.cfg.action_dim
    z_hist, past, z_goal = torch.randn(E, h, D), torch.randn(E, h - 1, A), torch.randn(E, D)
    actions = torch.rand(E, N, H, A) * 2 - 1
    model = model.to(kernel_device)     # drawn on CPU (the same numbers everywhere), run on the kernel device
    z_hist, past, z_goal, actions = (t.to(kernel_device) for t in (z_hist, past, z_goal, actions))
    with torch.no_grad():
        with use_backend("triton"):
            got = latent_cost(model, z_hist, past, z_goal, cost, reduce, precision="fp32")(actions)
            z = model.rollout(z_hist[:, None].expand(E, N, h, D).reshape(E * N, h, D), actions.reshape(E * N, H, A),
                              past_actions=past[:, None].expand(E, N, h - 1, A).reshape(E * N, h - 1, A))
    diff = z.view(E, N, H, D) - z_goal[:, None, None]
    d = diff.abs().sum(-1) if cost == "l1" else diff.square().sum(-1)
    want = d[..., -1] if reduce == "final" else d.sum(-1)
    assert_close(got, want, torch.float32, what=f"MPC cost {cost}/{reduce}", scale=10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (none on this machine)")
@pytest.mark.parametrize("cls", [CEMPlanner, MPPIPlanner])
def test_cuda_graph_replay_equals_eager_plan(cls):
    planner = cls(PlannerConfig(**{**CFG, "samples": 300, "iterations": 10, "elites": 30}))
    goal = torch.full((4, 1, 1), 0.3, device="cuda")

    def cost(actions):  # reads a device tensor: captured with the graph, updated in place
        return (actions - goal[:, :, :, None]).square().sum(dim=(2, 3))

    graphed = GraphedPlanner(planner, cost, 4, "cuda")
    eager = planner.plan(cost, 4, "cuda")
    first, again = graphed.plan(), graphed.plan()
    assert graphed.graph is not None
    for name in ("mean", "std", "cost"):
        assert_close(getattr(first, name), getattr(eager, name), torch.float32, what=f"replay vs eager {name}")
        assert torch.equal(getattr(first, name), getattr(again, name)), f"two replays differ: {name}"
    # inputs updated in place are seen by the next replay
    goal.fill_(-0.2)
    moved = graphed.plan()
    assert_close(moved.mean, planner.plan(cost, 4, "cuda").mean, torch.float32, what="replay after goal update")
    warm = graphed.plan(warm_start=moved)
    assert_close(warm.mean, planner.plan(cost, 4, "cuda", warm_start=moved).mean, torch.float32, what="warm start")
