"""Training state is never lost or silently replaced: resume with a new total, damaged checkpoints,
--resume without a checkpoint, clear messages, file modes and step numbers, a fresh run into a folder
that holds an earlier run's checkpoints, and kill -9 during a checkpoint write (20 trials).

Kernels run on their PyTorch reference and the models are the tests' tiny configurations, so each test
takes seconds on 2 CPU cores.
"""
from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jepa_engine.cli import main
from jepa_engine.kernels import use_backend
from jepa_engine.training import checkpoint as ckpt
from jepa_engine.training import ijepa as T
from jepa_engine.training.world_model import WMTrainConfig, train_world_model

TINY = dict(encoder="tiny", encoder_overrides=dict(embed_dim=32, depth=1, num_heads=2),
            predictor_overrides=dict(predictor_dim=32, depth=1, num_heads=2),
            world_overrides=dict(image_size=32), batch_size=8, episode_len=3, steps=6, warmup=2, lr=3e-3,
            checkpoint_every=2, keep_last=2, log_every=1, probe=False, device="cpu",
            collapse_std_min=0.0, collapse_rank_min=0.0)


@pytest.fixture(autouse=True)
def _reference_ops():
    torch.set_num_threads(1)
    with use_backend("reference"):
        yield


def tiny(**kw) -> T.TrainConfig:
    return T.TrainConfig(**{**TINY, **kw})


def wm_cfg(**kw) -> WMTrainConfig:
    return WMTrainConfig.from_name("test", **{**dict(steps=4, checkpoint_every=2, log_every=1, keep_last=2,
                                                      batch_size=4), **kw})


def _weights(tr: T.Trainer) -> dict[str, torch.Tensor]:
    return {**{f"model/{k}": v.clone() for k, v in tr.jepa.state_dict().items()},
            **{f"target/{k}": v.clone() for k, v in tr.target.state_dict().items()}}


def _assert_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{what}: {len(diff)} tensors differ, e.g. {diff[:3]}"


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _damage(folder: Path, step: int) -> str:
    """Cut ckpt-{step}'s tensors file to half; returns the expected "expected N bytes, got M" text."""
    tensors_path = ckpt.checkpoint_paths(folder, step)[0]
    blob = tensors_path.read_bytes()
    tensors_path.write_bytes(blob[: len(blob) // 2])
    return f"expected {len(blob)} bytes, got {len(blob) // 2}"


def _one_line(command: str, err: str) -> bool:
    """stderr is one line from ``jepa-engine COMMAND`` (no traceback)."""
    return err.startswith(f"jepa-engine {command}") and err.count("\n") == 1 and "Traceback" not in err


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---- 1. a resumed run's schedules follow the new total ------------------------------------------
def test_resume_with_a_larger_total_follows_the_new_schedules(tmp_path, capsys):
    straight = T.Trainer(tiny(steps=6), tmp_path / "a", progress=False)
    straight.fit()
    T.Trainer(tiny(steps=4), tmp_path / "b", progress=False).fit()
    capsys.readouterr()
    resumed = T.Trainer(tiny(steps=6), tmp_path / "b", resume=True, progress=False)
    out = capsys.readouterr().out
    assert (f"resumed from {tmp_path / 'b' / 'ckpt-00000004.json'} (step 4); total steps 4 -> 6: the LR, "
            f"weight-decay and EMA schedules follow the new total") in out, out
    assert resumed.ema.schedule.total_steps == 6 and resumed.ema.steps == 4
    target_at_4 = {k: v.clone() for k, v in resumed.target.state_dict().items()}
    resumed.fit()
    # Steps 5 and 6 ran with the 6-step run's LR, weight decay and EMA momentum (before the fix the
    # momentum was 1.0 there, the end of the 4-step schedule, and the target encoder froze).
    keys = ("lr", "weight_decay", "ema_momentum")
    want = {r["step"]: [r[k] for k in keys] for r in _rows(tmp_path / "a")}
    got = {r["step"]: [r[k] for k in keys] for r in _rows(tmp_path / "b")}
    assert got[5] == want[5] and got[6] == want[6]
    assert max(got[5][2], got[6][2]) < 1.0
    moved = [k for k, v in resumed.target.state_dict().items() if not torch.equal(v, target_at_4[k])]
    assert moved, "the target encoder did not change after the resume"
    assert ckpt.load_checkpoint(tmp_path / "b")[1]["ema"]["schedule"]["total_steps"] == 6


def test_resume_with_a_larger_total_equals_a_straight_run_when_schedules_do_not_depend_on_it(tmp_path):
    # Constant LR, weight decay and EMA momentum: 4 steps + resume to 6 is a straight 6-step run, exactly
    # (weights, EMA target, optimizer moments).
    flat = dict(warmup=0, min_lr=TINY["lr"], weight_decay=0.04, weight_decay_end=0.04, ema_schedule="constant")
    straight = T.Trainer(tiny(steps=6, **flat), tmp_path / "a", progress=False)
    straight.fit()
    T.Trainer(tiny(steps=4, **flat), tmp_path / "b", progress=False).fit()
    torch.manual_seed(123)   # the resume restores every RNG
    resumed = T.Trainer(tiny(steps=6, **flat), tmp_path / "b", resume=True, progress=False)
    resumed.fit()
    _assert_equal(_weights(straight), _weights(resumed), "straight 6 vs 4 + resume to 6")
    a, b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])


def test_train_wm_resume_with_a_larger_total_moves_the_ema_target(tmp_path):
    cfg = wm_cfg(steps=2, model_overrides={"anti_collapse": "ema"})
    train_world_model(cfg, tmp_path, log=None)
    logged = []
    train_world_model(wm_cfg(steps=4, model_overrides={"anti_collapse": "ema"}), tmp_path, log=logged.append,
                      resume=True)
    assert (f"resumed from {tmp_path / 'ckpt-00000002.json'} (step 2); total steps 2 -> 4: the LR and EMA "
            f"schedules follow the new total") in logged, logged
    t2, _ = ckpt.load_checkpoint(ckpt.checkpoint_paths(tmp_path, 2)[1])
    t4, m4 = ckpt.load_checkpoint(ckpt.checkpoint_paths(tmp_path, 4)[1])
    assert m4["ema"]["schedule"]["total_steps"] == 4 and m4["ema"]["steps"] == 4
    moved = [k for k in t2 if k.startswith("target/") and not torch.equal(t2[k], t4[k])]
    assert moved, "momentum 1.0 after the resume: the EMA target did not change"


def test_resume_past_the_total_is_refused(tmp_path):
    T.Trainer(tiny(steps=4), tmp_path / "a", progress=False).fit()
    with pytest.raises(ckpt.CheckpointError, match=r"ckpt-00000004.json is at step 4, past TrainConfig.steps = 2"):
        T.Trainer(tiny(steps=2), tmp_path / "a", resume=True, progress=False)
    train_world_model(wm_cfg(steps=2), tmp_path / "w", log=None)
    with pytest.raises(ckpt.CheckpointError, match=r"at step 2, past WMTrainConfig.steps = 1"):
        train_world_model(wm_cfg(steps=1), tmp_path / "w", log=None, resume=True)


# ---- 2. a damaged newest checkpoint is reported, the intact one survives ----------------------------
def test_damaged_newest_checkpoint_is_reported_and_nothing_is_touched(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = tiny(steps=4, checkpoint_every=2, keep_last=2)
    T.Trainer(cfg, run, progress=False).fit()
    what = _damage(run, 4)
    before = _snapshot(run)
    with pytest.raises(ckpt.CheckpointError,
                       match=f"ckpt-00000004.safetensors: {what}.*newest intact one, .*ckpt-00000002.json \\(step 2\\)"):
        T.Trainer(tiny(steps=6), run, resume=True, progress=False)
    assert main(["train", "--out", str(run), "--resume", "--steps", "6"]) == 2
    err = capsys.readouterr().err
    assert _one_line("train", err) and f"checkpoint {run / 'ckpt-00000004.safetensors'}: {what}" in err, err
    assert _snapshot(run) == before, "a refused resume changed the run folder"
    # The way out the message gives: delete the damaged checkpoint, resume from the intact one.
    for p in ckpt.checkpoint_paths(run, 4):
        p.unlink()
    T.Trainer(tiny(steps=6), run, resume=True, progress=False).fit()
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [4, 6]
    assert ckpt.load_checkpoint(run)[1]["step"] == 6
    assert [r["step"] for r in _rows(run)] == [1, 2, 3, 4, 5, 6]      # no step logged twice


def test_rows_logged_after_the_checkpoint_are_not_duplicated(tmp_path):
    """A run killed after logging steps 3-4 but before checkpoint 4 resumes from 2: steps 3-4 appear once."""
    cfg = tiny(steps=4, checkpoint_every=2, keep_last=3)
    T.Trainer(cfg, tmp_path, progress=False).fit()
    for p in ckpt.checkpoint_paths(tmp_path, 4):        # as if killed before checkpoint 4
        p.unlink()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')                       # and a row cut short
    T.Trainer(cfg, tmp_path, resume=True, progress=False).fit()
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3, 4]
    wm = tmp_path / "wm"
    train_world_model(wm_cfg(steps=4, checkpoint_every=2), wm, log=None)
    for p in ckpt.checkpoint_paths(wm, 4):
        p.unlink()
    summary = train_world_model(wm_cfg(steps=4, checkpoint_every=2), wm, log=None, resume=True)
    assert [r["step"] for r in _rows(wm)] == [1, 2, 3, 4] == [row[0] for row in summary["losses"]]


# ---- 3. the only checkpoint is damaged: no silent restart ----------------------------------------
@pytest.mark.parametrize("trainer", ["train", "train-wm"])
def test_only_checkpoint_damaged_refuses_to_restart(tmp_path, capsys, trainer):
    run = tmp_path / "run"
    if trainer == "train":
        T.Trainer(tiny(steps=2, checkpoint_every=2), run, progress=False).fit()
    else:
        train_world_model(wm_cfg(steps=2), run, log=None)
    what = _damage(run, 2)
    before = _snapshot(run)
    capsys.readouterr()
    assert main([trainer, "--out", str(run), "--resume", "--steps", "3"] + (["--no-report"] if trainer == "train-wm"
                                                                          else [])) == 2
    err = capsys.readouterr().err
    assert _one_line(trainer, err) and f"{run / 'ckpt-00000002.safetensors'}: {what}" in err, err
    assert "no earlier checkpoint there is intact" in err, err
    assert _snapshot(run) == before     # metrics.jsonl neither overwritten nor appended to


# ---- 4. --resume without a checkpoint: one behaviour for both trainers -----------------------------
def test_resume_without_checkpoint_is_one_clear_error(tmp_path, capsys):
    config = tmp_path / "tiny.json"
    tiny().to_json(config)
    wm_config = tmp_path / "wm.json"
    wm_config.write_text(json.dumps(wm_cfg().to_dict()))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(wm_cfg().to_dict()))     # a run killed before checkpoint 1
    for folder, reason in ((tmp_path / "missing", "does not exist"), (empty, "holds no complete checkpoint (ckpt-*.json)")):
        for argv in (["train", "--config", str(config)], ["train"], ["train-wm", "--config", str(wm_config)],
                     ["train-wm"]):
            assert main(argv + ["--out", str(folder), "--resume"]) == 2, argv
            err = capsys.readouterr().err
            assert _one_line(argv[0], err), (argv, err)
            assert err.rstrip().endswith(f"resume: run folder {folder} {reason}, so there is nothing to resume; "
                                         f"start a new run (without --resume)"
                                         + (" or name the folder of an existing run" if folder.name == "missing"
                                            else "")), (argv, err)
    assert not (tmp_path / "missing").exists()
    for call in (lambda: T.Trainer(tiny(), empty, resume=True, progress=False),
                 lambda: train_world_model(wm_cfg(), empty, log=None, resume=True)):
        with pytest.raises(ckpt.CheckpointError, match="holds no complete checkpoint"):
            call()


# ---- 5. messages name the file and what is wrong with it -----------------------------------------
def test_plan_on_a_folder_gives_the_files_message(tmp_path, capsys):
    train_world_model(wm_cfg(steps=2), tmp_path, log=None)
    what = _damage(tmp_path, 2)
    args = ["--episodes", "1", "--device", "cpu"]
    assert main(["plan", "--checkpoint", str(ckpt.checkpoint_paths(tmp_path, 2)[1])] + args) == 2
    file_err = capsys.readouterr().err
    assert main(["plan", "--checkpoint", str(tmp_path)] + args) == 2
    folder_err = capsys.readouterr().err
    head = f"checkpoint {tmp_path / 'ckpt-00000002.safetensors'}: {what} (truncated or overwritten)"
    assert head in file_err and head in folder_err, (file_err, folder_err)
    assert "no complete checkpoint" not in folder_err


# ---- 6. file modes, one step numbering, "resumed from" -------------------------------------------
def test_checkpoint_files_have_the_mode_of_config_json(tmp_path):
    old = os.umask(0o022)
    try:
        T.Trainer(tiny(steps=2, checkpoint_every=2), tmp_path / "a", progress=False).fit()
        train_world_model(wm_cfg(steps=2), tmp_path / "w", log=None)
    finally:
        os.umask(old)
    for run in (tmp_path / "a", tmp_path / "w"):
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in run.iterdir()}
        assert set(modes.values()) == {0o644}, modes
        assert {"config.json", "metrics.jsonl", "ckpt-00000002.json", "ckpt-00000002.safetensors"} <= modes.keys()


def test_both_trainers_count_steps_as_checkpoints_name_them(tmp_path, capsys):
    T.Trainer(tiny(steps=4, checkpoint_every=2, log_every=2), tmp_path / "a", progress=False).fit()
    logged = []
    train_world_model(wm_cfg(steps=4, checkpoint_every=2, log_every=2), tmp_path / "w", log=logged.append)
    for run in (tmp_path / "a", tmp_path / "w"):
        steps = [r["step"] for r in _rows(run)]
        assert [s for s, _ in ckpt.list_checkpoints(run)] == [2, 4]
        assert steps[-2:] == [2, 4] and steps[-1] == ckpt.load_checkpoint(run)[1]["step"], (run, steps)
    assert [m.split()[1] for m in logged if m.startswith("step")] == ["1", "2", "4"]
    # The resumed runs say where they come from, with the same numbering.
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "a"), "--resume", "--steps", "6"]) == 0
    assert f"train: resumed from {tmp_path / 'a' / 'ckpt-00000004.json'} (step 4)" in capsys.readouterr().out
    assert main(["train-wm", "--out", str(tmp_path / "w"), "--resume", "--steps", "6", "--no-report"]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {tmp_path / 'w' / 'ckpt-00000004.json'} (step 4)" in out and "step     6 " in out, out
    assert [r["step"] for r in _rows(tmp_path / "w")] == [1, 2, 4, 6]


# ---- 7. a fresh run never mixes with the checkpoints of an earlier run in its folder -------------------
def _fresh(trainer: str, run: Path, steps: int, **kw):
    """A fresh run of ``steps`` steps into ``run`` through the library; returns its trained weights."""
    if trainer == "train":
        tr = T.Trainer(tiny(steps=steps), run, progress=False, **kw)
        tr.fit()
        return tr.jepa.state_dict()
    return train_world_model(wm_cfg(steps=steps), run, log=None, **kw)["model"].state_dict()


@pytest.mark.parametrize("trainer", ["train", "train-wm"])
def test_a_fresh_run_into_a_folder_with_checkpoints_is_refused_unless_overwrite(tmp_path, capsys, trainer):
    run, config = tmp_path / "run", tmp_path / "config.json"
    config.write_text(tiny(steps=2).to_json() if trainer == "train" else json.dumps(wm_cfg(steps=2).to_dict()))
    _fresh(trainer, run, 4)                     # checkpoints 2 and 4 of the earlier run
    before = _snapshot(run)
    who = "train" if trainer == "train" else "train_world_model"
    # Before the guard, a 2-step run there kept the earlier step-4 checkpoint as the newest: a resume or a
    # load went on from the old run, and its config.json and metrics.jsonl were replaced.
    with pytest.raises(ckpt.CheckpointError) as e:
        _fresh(trainer, run, 2)
    assert str(e.value) == (f"{who}: run folder {run} already holds 2 checkpoint(s) of a run (newest "
                            f"{run / 'ckpt-00000004.json'}, step 4); a fresh run there would mix with them. Continue "
                            f"that run with resume=True (--resume), write to another folder, or delete them and "
                            f"start afresh with overwrite=True (--overwrite)")
    argv = [trainer, "--config", str(config), "--out", str(run)] + (["--no-report"] if trainer == "train-wm" else [])
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert _one_line(trainer, err) and "already holds 2 checkpoint(s)" in err and "(--overwrite)" in err, err
    assert _snapshot(run) == before             # nothing written, nothing deleted
    assert main(argv + ["--resume", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert _one_line(trainer, err) and "argument --overwrite: not allowed with argument --resume" in err, err
    with pytest.raises(ValueError, match="pass one of them"):
        _fresh(trainer, run, 2, resume=True, overwrite=True)
    assert _snapshot(run) == before

    # --overwrite: the folder holds the new run alone, equal to the same run into an empty folder.
    assert main(argv + ["--overwrite"]) == 0
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2]
    assert sorted(p.name for p in run.iterdir()) == ["ckpt-00000002.json", "ckpt-00000002.safetensors",
                                                     "config.json", "metrics.jsonl"]
    assert [r["step"] for r in _rows(run)] == [1, 2]
    straight = _fresh(trainer, tmp_path / "straight", 2)
    saved = ckpt.load_checkpoint(run)[0]
    _assert_equal({k: saved[f"model/{k}"] for k in straight}, dict(straight), "overwritten run vs straight run")


def test_the_demo_replaces_only_its_own_earlier_run(tmp_path):
    from jepa_engine.demo import replaces_own_run

    run = tmp_path / "wm"
    assert not replaces_own_run(run, wm_cfg(steps=2))       # no folder, no checkpoint: nothing to replace
    train_world_model(wm_cfg(steps=2), run, log=None)
    assert replaces_own_run(run, wm_cfg(steps=2))
    assert not replaces_own_run(run, wm_cfg(steps=3))        # another run: it stays, the trainer refuses
    with pytest.raises(ckpt.CheckpointError, match="already holds 1 checkpoint"):
        train_world_model(wm_cfg(steps=3), run, log=None, overwrite=replaces_own_run(run, wm_cfg(steps=3)))
    train_world_model(wm_cfg(steps=2), run, log=None, overwrite=replaces_own_run(run, wm_cfg(steps=2)))
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2]


# ---- kill -9 during checkpoint writes ------------------------------------------------------------
# A process that imports torch once, then for every line "FOLDER PROGRESS" forks a writer that saves
# checkpoints 1, 2, 3, ... of a ~2 MB state (keep_last=2) until it is killed, noting "begin s" / "end s"
# around each save; it answers the writer's pid, then its wait status.
_WRITER = r"""
import os, sys
import torch
torch.set_num_threads(1)
from jepa_engine.training import checkpoint as ckpt

def write(folder, progress):
    fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    step = 0
    while True:
        step += 1
        os.write(fd, b"begin %d\n" % step)
        tensors = {"w": torch.full((500_000,), float(step)), "i": torch.arange(1000) * step}
        ckpt.save_checkpoint(folder, step, tensors, {"copy_of_step": step}, keep_last=2)
        os.write(fd, b"end %d\n" % step)

for line in sys.stdin:
    folder, progress = line.split()
    pid = os.fork()
    if pid == 0:
        try:
            write(folder, progress)
        finally:
            os._exit(1)
    print(pid, flush=True)
    print(os.waitpid(pid, 0)[1], flush=True)
"""


def test_kill_9_during_checkpoint_writes_loses_at_most_the_interrupted_step(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    rng = random.Random(14)
    mid_save = 0
    try:
        for trial in range(20):
            folder, progress = tmp_path / f"run{trial}", tmp_path / f"progress{trial}.txt"
            proc.stdin.write(f"{folder} {progress}\n")
            proc.stdin.flush()
            pid = int(proc.stdout.readline())
            deadline = time.monotonic() + 60
            while not (progress.exists() and b"end 1\n" in progress.read_bytes()):   # one save done
                assert time.monotonic() < deadline, "the writer saved nothing in 60 s"
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.25))
            os.kill(pid, signal.SIGKILL)
            status = int(proc.stdout.readline())
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status

            notes = progress.read_text().split("\n")[:-1]
            last_end = max(int(n.split()[1]) for n in notes if n.startswith("end "))
            last_begin = max(int(n.split()[1]) for n in notes if n.startswith("begin "))
            mid_save += last_begin > last_end
            # Resume finds an intact checkpoint of the last finished save, or of the interrupted one if
            # its JSON was already written.
            latest = ckpt.resume_checkpoint(folder)
            tensors, meta = ckpt.load_checkpoint(latest)
            step = meta["step"]
            assert step in (last_end, last_begin), (trial, step, notes[-2:])
            assert meta["copy_of_step"] == step and torch.equal(tensors["w"], torch.full((500_000,), float(step)))
            assert torch.equal(tensors["i"], torch.arange(1000) * step)
            # The resumed run's next save cleans up what the kill left and keeps the two newest.
            ckpt.save_checkpoint(folder, step + 1, {"w": torch.zeros(1)}, {}, keep_last=2)
            names = sorted(p.name for p in folder.iterdir())
            assert names == sorted(p.name for s in (step, step + 1) for p in ckpt.checkpoint_paths(folder, s)), names
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    # The kills landed inside save_checkpoint (the writer does little else), not only between saves.
    assert mid_save >= 10, f"only {mid_save} of 20 kills hit a save in progress"
