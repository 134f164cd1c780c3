"""`jepa-engine demo`'s world-model section (budgets shrunk to seconds) and its place in the demo."""
from __future__ import annotations

import pytest
import torch

from jepa_engine import cli, demo
from jepa_engine.kernels import use_backend


@pytest.fixture(autouse=True)
def _reference_ops():
    torch.set_num_threads(1)
    with use_backend("reference"):
        yield


@pytest.fixture
def small_budgets(monkeypatch):
    monkeypatch.setattr(demo, "DEMO_WM_TRAIN", dict(preset="test", overrides=dict(steps=12, log_every=5,
                                                                                    max_minutes=1.0)))
    monkeypatch.setattr(demo, "DEMO_MPC", dict(demo.DEMO_MPC, samples=16, iterations=2, elites=4, max_steps=3))
    monkeypatch.setattr(demo, "DEMO_MPC_EPISODES", 2)


def test_demo_world_model_section_reports_probe_surprise_and_mpc(tmp_path, capsys, small_budgets):
    assert demo.world_model_section(str(tmp_path / "wm")) is True
    out = capsys.readouterr().out
    for text in ("training the 'test' world model", "trained 12 steps", "physics probe (embeddings): linear probe R^2",
                 "surprise at a teleport", "MPC with CEM: N=16 x I=2", "2 seeded episodes", "success ",
                 "plan latency median", "'two_rooms' world", "surprise at a wall", "world-model section:"):
        assert text in out, f"{text!r} missing from:\n{out}"
    assert (tmp_path / "wm" / "ckpt-00000012.json").is_file()


def test_demo_world_model_section_fails_on_a_real_failure(tmp_path, capsys, small_budgets, monkeypatch):
    import jepa_engine.training.world_model as train_wm

    def broken(*args, **kwargs):
        raise FloatingPointError("train_world_model: loss became nan at step 3")

    monkeypatch.setattr(train_wm, "train_world_model", broken)
    assert demo.world_model_section(str(tmp_path / "wm")) is False
    assert "world model: training FAILED" in capsys.readouterr().out


def test_demo_sections_run_in_order(tmp_path, capsys, monkeypatch):
    import jepa_engine.training.ijepa as train

    class FakeTrainer:
        def __init__(self, cfg, out, resume=False, overwrite=False):
            pass

        def run_probe(self):
            return {"r2_position": 0.95, "r2_velocity": 0.5}

        def fit(self):
            return {"step": 1, "checkpoint": None, "losses": [(0, 1.0)],
                    "probe": {"r2_position": 0.97, "r2_velocity": 0.6, "r2": {"x": 0.97}}}

        def close(self):
            pass

    import jepa_engine.selfcheck as selfcheck

    calls = []
    monkeypatch.setattr(train, "Trainer", FakeTrainer)
    monkeypatch.setattr(demo, "world_model_section", lambda out: calls.append(("wm", out)) or True)
    monkeypatch.setattr(demo, "demo_profile", lambda wm, out: calls.append(("profile", wm, out)) or ["headline"])
    monkeypatch.setattr(selfcheck, "run", lambda: calls.append(("selfcheck",)) or 0)
    assert cli.main(["demo", "--out", str(tmp_path)]) == 0
    assert calls == [("wm", str(tmp_path / "wm")), ("profile", str(tmp_path / "wm"), str(tmp_path / "profile")),
                     ("selfcheck",)]
    out = capsys.readouterr().out
    sections = ["== Action-conditioned world model ==", "== Planner vs token-by-token decoding", "headline",
                "== Kernel self-check =="]
    assert [out.index(s) for s in sections] == sorted(out.index(s) for s in sections)
    assert "whole demo:" in out
    calls.clear()
    monkeypatch.setattr(demo, "world_model_section", lambda out: False)   # a failed section fails the demo
    assert cli.main(["demo", "--out", str(tmp_path)]) == 1
    assert ("selfcheck",) in calls and not any(c[0] == "profile" for c in calls)   # no model: no profile
