"""Exact resume of world-model training: interrupted + resumed == uninterrupted, bit for bit (CPU)."""
from __future__ import annotations

import json

import pytest
import torch

from jepa_engine.envs import TrajectoryStream, WorldConfig
from jepa_engine.kernels import use_backend
from jepa_engine.training import checkpoint as ckpt
from jepa_engine.training.world_model import WMTrainConfig, load_world_model, save_world_model, train_world_model


@pytest.fixture(autouse=True)
def _reference_ops():
    torch.set_num_threads(1)
    with use_backend("reference"):
        yield


def _cfg(**kw) -> WMTrainConfig:
    return WMTrainConfig.from_name("test", **{**dict(steps=7, checkpoint_every=3, log_every=1, keep_last=2), **kw})


def _interrupt_at(step: int):
    """A log callback that interrupts training right after step ``step`` is logged."""
    def log(msg: str) -> None:
        if msg.startswith(f"step {step:5d} "):
            raise KeyboardInterrupt
    return log


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"tensors differ: {diff[:5]}"


@pytest.mark.parametrize("anti_collapse", ["sigreg", "ema"])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, anti_collapse):
    cfg = _cfg(model_overrides={"anti_collapse": anti_collapse})
    straight = train_world_model(cfg, tmp_path / "a", log=None)
    with pytest.raises(KeyboardInterrupt):          # dies after step 4: checkpoint 3 is the newest
        train_world_model(cfg, tmp_path / "b", log=_interrupt_at(4))
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "b")] == [3]
    resumed = train_world_model(cfg, tmp_path / "b", log=None, resume=True)
    assert resumed["resumed_from"] == 3 and resumed["steps"] == straight["steps"] == 7
    # Every tensor of the final checkpoints: weights, EMA target, optimizer moments, RNG, stream state.
    ta, ma = ckpt.load_checkpoint(tmp_path / "a")
    tb, mb = ckpt.load_checkpoint(tmp_path / "b")
    _assert_same_tensors(ta, tb)
    assert ma == mb
    _assert_same_tensors(straight["model"].state_dict(), resumed["model"].state_dict())
    # metrics.jsonl: the rows logged after checkpoint 3 by the interrupted run are not kept twice.
    rows_a = (tmp_path / "a" / "metrics.jsonl").read_text()
    assert rows_a == (tmp_path / "b" / "metrics.jsonl").read_text()
    assert [json.loads(r)["step"] for r in rows_a.splitlines()] == list(range(1, 8))
    assert resumed["losses"] == straight["losses"]


def test_ctrl_c_checkpoints_the_finished_step_and_resumes_exactly(tmp_path):
    """SIGINT while step 5 is logged: the step finishes, checkpoint 5 is written, KeyboardInterrupt
    follows; resuming from it ends with the uninterrupted run's tensors. The handler is removed after."""
    import os
    import signal

    cfg = _cfg()
    train_world_model(cfg, tmp_path / "a", log=None)

    def log(msg: str) -> None:
        if msg.startswith(f"step {5:5d} "):
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train_world_model(cfg, tmp_path / "b", log=log)
    assert signal.getsignal(signal.SIGINT) is before
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "b")] == [3, 5]
    resumed = train_world_model(cfg, tmp_path / "b", log=None, resume=True)
    assert resumed["resumed_from"] == 5
    ta, ma = ckpt.load_checkpoint(tmp_path / "a")
    tb, mb = ckpt.load_checkpoint(tmp_path / "b")
    _assert_same_tensors(ta, tb)
    assert ma == mb


def test_resume_extends_a_finished_run_and_needs_a_checkpoint(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="holds no complete checkpoint"):
        train_world_model(_cfg(steps=3), tmp_path, log=None, resume=True)   # empty folder
    fresh = train_world_model(_cfg(steps=3), tmp_path, log=None)
    assert fresh["resumed_from"] is None and fresh["steps"] == 3
    more = train_world_model(_cfg(steps=5), tmp_path, log=None, resume=True)
    assert more["resumed_from"] == 3 and more["steps"] == 5
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 5]
    again = train_world_model(_cfg(steps=5), tmp_path, log=None, resume=True)   # nothing left to do
    assert again["resumed_from"] == 5 and again["steps"] == 5 and again["checkpoint"].endswith("ckpt-00000005.json")


def test_resume_refuses_a_checkpoint_without_training_state(tmp_path):
    cfg = _cfg(steps=2)
    model, _ = load_world_model(train_world_model(cfg, tmp_path / "a", log=None)["checkpoint"])
    save_world_model(tmp_path / "b", 2, model, cfg)                     # weights only
    with pytest.raises(ckpt.CheckpointError, match=r"cannot be resumed: it lacks the training state \['optim'"):
        train_world_model(cfg, tmp_path / "b", log=None, resume=True)
    with pytest.raises(ValueError, match="needs out_dir"):
        train_world_model(cfg, None, log=None, resume=True)


def test_trajectory_stream_position_round_trips():
    stream = TrajectoryStream(WorldConfig(image_size=16), batch_size=3, episode_len=4, policy="mixed", seed=5)
    it = iter(stream)
    next(it)
    state = it.state_dict()
    expected = [next(it) for _ in range(2)]
    again = iter(stream)
    again.load_state_dict({k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()})
    assert again.count == 1
    for want in expected:
        got = next(again)
        assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="must have key 'generator'"):
        iter(stream).load_state_dict({"count": 1})


def test_cli_train_wm_resume_reads_the_run_folders_config(tmp_path, capsys):
    from jepa_engine.cli import main

    cfg = _cfg(steps=6)
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(cfg.to_dict()))
    assert main(["train-wm", "--config", str(config), "--out", str(tmp_path / "a"), "--no-report"]) == 0
    with pytest.raises(KeyboardInterrupt):
        train_world_model(cfg, tmp_path / "b", log=_interrupt_at(4))
    capsys.readouterr()
    assert main(["train-wm", "--out", str(tmp_path / "b"), "--resume", "--no-report"]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {tmp_path / 'b' / 'ckpt-00000003.json'} (step 3)" in out, out
    assert "trained 6 steps (resumed at step 3)" in out, out
    _assert_same_tensors(ckpt.load_checkpoint(tmp_path / "a")[0], ckpt.load_checkpoint(tmp_path / "b")[0])
