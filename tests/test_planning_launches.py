"""Launches per CEM iteration on the Triton (CUDA) path of the planners' rollout.

The Triton kernels run under the interpreter here; every Triton launch and every aten op that launches
work (not views, not allocations) outside the kernels is counted, the way a CUDA device would see them.
The goal: at most 5 launches per predictor layer per rollout step, plus 10 for sampling, cost and refit.
One iteration's count is a two-iteration plan's less a one-iteration plan's, so the plan's setup and
the history's shared prefix (computed once per plan, cached across iterations) are not in it. The
whole plan reads no tensor value back to the host (what a CUDA graph capture requires)."""
from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from jepa_engine.kernels import interpreting
from jepa_engine.models.world_model import WorldModel, WorldModelConfig
from jepa_engine.planning import CEMPlanner, PlannerConfig, latent_cost

pytestmark = pytest.mark.skipif(not interpreting(), reason="counts the Triton path: needs TRITON_INTERPRET=1")


class _Launches(TorchDispatchMode):
    """Counts aten ops that launch work, and (through the interpreter's entry point) Triton kernels; the
    aten ops a Triton launch runs inside the interpreter are not counted."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.inside = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if not self.inside and not func.is_view and name.startswith("aten::") and "empty" not in name:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def launches(monkeypatch):
    from triton.runtime import interpreter

    mode = _Launches()
    run = interpreter.InterpretedFunction.run

    def counted(self, *args, **kwargs):
        mode.counts["triton:" + self.fn.__name__] += 1
        mode.inside += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            mode.inside -= 1

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", counted)
    return mode


def _plan_counts(mode: _Launches, model: WorldModel, iterations: int, horizon: int, h: int) -> collections.Counter:
    c = model.cfg
    g = torch.Generator().manual_seed(0)
    z_hist, past = torch.randn(1, h, c.embed_dim, generator=g), torch.rand(1, h - 1, c.action_dim, generator=g)
    cost = latent_cost(model, z_hist, past, torch.randn(1, c.embed_dim, generator=g))
    cfg = PlannerConfig(horizon=horizon, samples=4, iterations=iterations, elites=2, action_dim=c.action_dim)
    mode.counts.clear()
    with torch.no_grad(), mode:
        CEMPlanner(cfg).plan(cost, 1, "cpu")
    return collections.Counter(mode.counts)


# The test preset (2 layers), and LeWorldModel's 6 layers and history 3 at test width. Per step, 3 launches
# besides the layers' 4 each (positions, the next embedding, its copy into the window): a one-layer
# predictor takes 7 per step and misses the budget by one launch per step beyond the 10.
@pytest.mark.parametrize("overrides,horizon", [({}, 5), ({"pred_depth": 3, "history": 2}, 4),
                                               ({"pred_depth": 6, "history": 3}, 5)])
def test_one_cem_iteration_launches_at_most_5_per_layer_per_step_plus_10(launches, overrides, horizon):
    torch.manual_seed(0)
    model = WorldModel(WorldModelConfig.from_name("test", **overrides)).eval().requires_grad_(False)
    h = model.cfg.history
    one = _plan_counts(launches, model, 1, horizon, h)
    two = _plan_counts(launches, model, 2, horizon, h)
    per_iteration = two - one
    assert sum(one.values()) + sum(per_iteration.values()) == sum(two.values())   # no op ran fewer times
    budget = 5 * model.cfg.pred_depth * horizon + 10
    assert sum(per_iteration.values()) <= budget, dict(per_iteration)
    # the kernels, not the torch pieces they replace
    assert per_iteration["triton:_window_attention_kernel"] == model.cfg.pred_depth * horizon
    assert per_iteration["triton:_fused_mlp_kernel"] == model.cfg.pred_depth * horizon
    for op in ("aten::cat", "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::gelu"):
        assert per_iteration[op] == 0, (op, dict(per_iteration))
    # no host synchronisation anywhere in the plan (a CUDA graph capture would fail on one): no tensor
    # value is read back to Python
    for op in ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero"):
        assert two[op] == 0, (op, dict(two))
