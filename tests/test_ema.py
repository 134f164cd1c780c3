"""The EMA of the target encoder: schedules, modules with buffers, state_dict resume, errors."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import jepa_engine
from jepa_engine.schedules import MOMENTUM_PRESETS as PRESETS, MomentumSchedule
from jepa_engine.training.ema import EMA


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.GELU(), nn.Linear(10, 3))


def _train_step(model, seed):
    """Change the online model's parameters and BatchNorm statistics like a training step would."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    model(torch.randn(8, 6, generator=g))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g), alpha=0.1)


@pytest.mark.parametrize("kind,values", [
    ("constant", {0: 0.99925, 50: 0.99925, 100: 0.99925, 250: 0.99925}),
    ("linear", {0: 0.996, 50: 0.998, 100: 1.0, 250: 1.0}),
    ("cosine", {0: 0.996, 50: 0.998, 100: 1.0, 250: 1.0}),
])
def test_schedule_values_start_middle_end(kind, values):
    start = 0.99925 if kind == "constant" else 0.996
    sched = MomentumSchedule(kind, start, 1.0, 100)
    for step, m in values.items():
        assert math.isclose(sched(step), m, rel_tol=0, abs_tol=1e-12), f"{kind} at step {step}: {sched(step)} != {m}"
    if kind == "cosine":  # slower than linear at first, faster at the end
        assert sched(25) < MomentumSchedule("linear", 0.996, 1.0, 100)(25)


def test_presets():
    ema = EMA(_model(), _model().requires_grad_(False), schedule="ijepa", total_steps=10)
    assert (ema.schedule.kind, ema.schedule.start, ema.schedule.end) == PRESETS["ijepa"]
    assert EMA(_model(), _model().requires_grad_(False), schedule="vjepa2").momentum == 0.99925


def test_from_model_frozen_copy_and_update():
    online = _model()
    ema = EMA.from_model(online, momentum=0.9)
    target = ema.module
    assert target is not online
    assert all(not p.requires_grad for p in target.parameters())
    assert all(p.requires_grad for p in online.parameters())
    before = {k: v.clone() for k, v in target.state_dict().items()}
    _train_step(online, 1)
    ema.step()
    online_sd = online.state_dict()
    for name, t in target.state_dict().items():
        o = online_sd[name]
        if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(t, o), f"buffer {name} must be copied"
        else:
            torch.testing.assert_close(t, 0.9 * before[name] + 0.1 * o, rtol=1e-5, atol=1e-6)
    assert ema.steps == 1


def test_state_dict_round_trip_resumes_schedule_exactly():
    online_a, online_b = _model(), _model()
    a = EMA.from_model(online_a, momentum=0.996, schedule="cosine", total_steps=20)
    for i in range(7):
        _train_step(online_a, i)
        a.step()
    state = a.state_dict()
    b = EMA(online_b, _model().requires_grad_(False), momentum=0.5)  # schedule replaced by the loaded one
    b.target.load_state_dict(a.target.state_dict())
    online_b.load_state_dict(online_a.state_dict())
    b.load_state_dict(state)
    assert b.steps == 7 and b.momentum == a.momentum and b.schedule == a.schedule
    for i in range(7, 12):
        _train_step(online_a, i)
        _train_step(online_b, i)
        a.step()
        b.step()
    for (n, x), y in zip(a.target.state_dict().items(), b.target.state_dict().values()):
        assert torch.equal(x, y), f"resumed EMA differs at {n}"
    assert a.momentum == b.momentum


def test_lists_of_tensors_and_distance():
    online = [torch.randn(5, 3), torch.randn(7)]
    target = [torch.zeros(5, 3), torch.zeros(7)]
    ema = EMA(online, target, momentum=0.75, return_distance=True)
    d = ema.step()
    expected = sum(float(o.square().sum()) for o in online)
    assert math.isclose(float(d), expected, rel_tol=1e-5)
    for t, o in zip(target, online):
        torch.testing.assert_close(t, 0.25 * o)


def test_device_momentum_override():
    online, target = [torch.ones(9)], [torch.zeros(9)]
    ema = EMA(online, target, momentum=0.9)
    ema.step(torch.tensor([0.5]))
    torch.testing.assert_close(target[0], torch.full((9,), 0.5))


def test_lazy_top_level_export():
    assert jepa_engine.EMA is EMA


def test_errors():
    online = _model()
    with pytest.raises(ValueError, match=r"target parameter '0.weight' must not require grad"):
        EMA(online, _model())
    with pytest.raises(ValueError, match=r"targets\[1\] must not require grad"):
        EMA([torch.ones(2), torch.ones(3)], [torch.zeros(2), torch.zeros(3, requires_grad=True)]).step()
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got 1.2"):
        MomentumSchedule("constant", 1.2)
    with pytest.raises(ValueError, match=r"linear schedule needs total_steps > 0, got 0"):
        EMA.from_model(online, schedule="linear")
    with pytest.raises(TypeError, match="must both be nn.Modules or both lists of tensors, got Sequential and list"):
        EMA(online, [torch.zeros(3)])
    with pytest.raises(ValueError, match="must match the online parameters by name"):
        EMA(online, nn.Sequential(nn.Linear(6, 10)))
    with pytest.raises(ValueError, match=r"state must have key 'schedule'"):
        EMA.from_model(online).load_state_dict({"steps": 3})
