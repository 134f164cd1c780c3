"""The launch/tile-work ledger of the benchmark groups (jepa_engine/ledger.py, `jepa-engine ledger`): every
kernel launches at most MAX_RATIO times its useful work at every benchmark shape, or is declared with its
reason; the planning group's launches are the fused rollout's."""
from __future__ import annotations

import fnmatch
import json
from collections import Counter

import pytest
import torch

from jepa_engine import cli
from jepa_engine import ledger
from jepa_engine.kernels import interpreting
from jepa_engine.kernels import ledger as kl


@pytest.fixture(scope="module")
def result():
    return ledger.ledger()


def test_every_kernel_within_budget_at_every_benchmark_shape(result):
    over = [f"{r.group} | {r.case} | {r.kernel}: {r.ratio:.2f}x"
            for cases in result.values() for _, rows in cases for r in rows
            if r.counted and r.ratio > ledger.MAX_RATIO and ledger.over_budget_key(r) is None]
    assert not over, "launched > {}x useful work, not declared in OVER_BUDGET:\n".format(ledger.MAX_RATIO) + \
        "\n".join(over)


def test_declared_exceptions_still_exceed(result):
    """Each OVER_BUDGET entry covers a row that is over budget (a fix must remove its entry)."""
    rows = [r for cases in result.values() for _, rs in cases for r in rs if r.counted]
    for key in ledger.OVER_BUDGET:
        group, case, kernel = key
        matched = [r for r in rows if r.group == group and fnmatch.fnmatchcase(r.case, case)
                   and fnmatch.fnmatchcase(r.kernel, kernel)]
        assert matched, f"OVER_BUDGET entry {key} matches no row"
        assert any(r.ratio > ledger.MAX_RATIO for r in matched), f"OVER_BUDGET entry {key}: every row is within budget"


def test_groups_cover_the_benchmarks(result):
    assert tuple(result) == ledger.GROUPS
    kernels = {r.kernel for cases in result.values() for _, rows in cases for r in rows}
    # latent_cost is the gradient planner's cost (the differentiable rollout): no benchmark launches it.
    assert set(kl.KERNEL_WORK) - kernels == {"latent_cost"}
    for cases in result.values():
        assert cases and all(rows for _, rows in cases)
        for _, rows in cases:
            for r in rows:
                assert not r.counted or (r.useful_flops > 0 and r.bytes > 0 and r.roofline_s > 0), r


def _record_rollout(monkeypatch):
    """The rollout's kernel calls recorded (each call runs its op's reference): a Counter of their shapes."""
    from jepa_engine.kernels import use_backend
    from jepa_engine.planning import rollout

    calls: Counter = Counter()

    def recorded(name, key):
        op = getattr(rollout, name)

        def call(*args, **kwargs):
            calls[key(*args, **kwargs)] += 1
            with use_backend("reference"):
                return op(*args, **kwargs)
        monkeypatch.setattr(rollout, name, call)

    recorded("fused_linear", lambda x, w, *a, **k: ("fused_linear", x.shape[0], x.shape[1], w.shape[0]))
    recorded("linear_goal_cost", lambda x, w, *a, **k: ("linear_goal_cost", x.shape[0], x.shape[1], w.shape[0]))
    recorded("fused_mlp", lambda x, w1, *a, **k: ("fused_mlp", x.shape[0], x.shape[1], w1.shape[0]))
    recorded("window_attention", lambda qkv, pre, heads, window, last_only=False, **k: (
        "window_attention", qkv.shape[0] // window, window, 0 if pre is None else pre.shape[1], heads, last_only))
    attention = rollout._Block.attention

    def sdpa(self, *args, **kwargs):
        calls[ledger.SDPA] += 1
        return attention(self, *args, **kwargs)

    monkeypatch.setattr(rollout._Block, "attention", sdpa)
    return calls


def _expected(launches) -> Counter:
    out: Counter = Counter()
    for x in launches:
        s = x.shape
        if x.kernel == ledger.SDPA:
            key = ledger.SDPA
        elif x.kernel == "fused_mlp":
            key = ("fused_mlp", s["M"], s["C"], s["F"])
        elif x.kernel == "window_attention":
            key = ("window_attention", s["B"], s["L"], s["P"], s["H"], s.get("last_only", False))
        elif x.kernel == "linear_goal_cost":
            key = ("linear_goal_cost", s["M"], s["K"], s["D"])
        else:
            key = (x.kernel, s["M"], s["K"], s["N"])
        out[key] += x.count
    return out


@pytest.mark.skipif(not interpreting(), reason="the rollout takes its Triton path under TRITON_INTERPRET=1")
@pytest.mark.parametrize("observed", [1, 2, 3])
def test_planning_launches_are_the_rollouts_calls(monkeypatch, observed):
    """ROLLOUT_CALLS describes FusedRollout's Triton path: the calls recorded from a run equal the ledger's
    launches, the first call's (history computed) and a second one's (history cached)."""
    from jepa_engine.models.world_model import WorldModel, WorldModelConfig
    from jepa_engine.planning.rollout import FusedRollout

    torch.manual_seed(0)
    model = WorldModel(WorldModelConfig.from_name("test")).eval().requires_grad_(False)
    c = model.cfg
    E, N, H = 2, 3, 4
    z_hist, past = torch.randn(E, observed, c.embed_dim), torch.randn(E, observed - 1, c.action_dim)
    actions, goal = torch.randn(E, N, H, c.action_dim), torch.randn(E, c.embed_dim)
    calls = _record_rollout(monkeypatch)
    fused = FusedRollout(model)
    hint = "the rollout's kernel calls changed: update jepa_engine.ledger.ROLLOUT_CALLS (or define KERNEL_CALLS " \
           "in jepa_engine/planning/rollout.py)"
    for cached in (False, True):
        calls.clear()
        fused.cost(z_hist, past, actions, goal)
        assert calls == _expected(ledger.rollout_launches("test", E, N, H, observed, history_cached=cached)), hint


def test_rollout_launches_bad_observed():
    with pytest.raises(ValueError, match=r"observed must be in \[1, 3\] \(the lewm window\), got 4"):
        ledger.rollout_launches("lewm", 1, 300, 5, observed=4)


# ---- the command
def test_cli_prints_a_group(capsys):
    assert cli.main(["ledger", "--group", "planning"]) == 0
    out = capsys.readouterr().out
    assert "== planning (bench_plan.py) ==" in out and "lewm CEM iteration N=300 H=5 E=1 tf32" in out
    for column in ledger.HEADER:
        assert column in out
    for kernel in ("fused_linear", "window_attention", "fused_mlp", "linear_goal_cost", "sample_actions",
                   "elite_refit", ledger.SDPA):
        assert kernel in out
    assert "roofline on H100 SXM" in out


def test_cli_json(capsys):
    assert cli.main(["ledger", "--group", "cem", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["max_ratio"] == ledger.MAX_RATIO and doc["roofline"]["tflops_16bit"] == 989.0
    rows = [r for case in doc["groups"]["cem"] for r in case["rows"]]
    assert {r["kernel"] for r in rows} == {"sample_actions", "elite_refit"}
    assert all(r["ratio"] <= ledger.MAX_RATIO and r["tensor_cores"] is False for r in rows)


def test_cli_bad_group(capsys):
    assert cli.main(["ledger", "--group", "plan"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("jepa-engine ledger: error: argument --group: must be one of planning, cem, masked_attention, "
                   "encoders, ema, latent_loss, train, got 'plan'")
