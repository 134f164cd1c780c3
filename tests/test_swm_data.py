"""On-disk trajectory datasets: `collect` from stable-worldmodel's TwoRoom, the reader, the training stream,
`train-wm --data` with exact resume, and the errors of bad input (unknown env, empty / interrupted /
truncated dataset, action dimension mismatch).

The tests that collect need stable-worldmodel (`make envs`) and skip without it; the format, stream and
training tests write their datasets with `write_dataset` and always run."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from jepa_engine.integrations.swm_data import TrajectoryDataset, TrajectoryDatasetError, write_dataset
from jepa_engine.kernels import use_backend
from jepa_engine.training import checkpoint as ckpt
from jepa_engine.training.trajectory_data import DiskTrajectoryStream, config_for_dataset
from jepa_engine.training.world_model import WMTrainConfig, train_world_model


@pytest.fixture(autouse=True)
def _reference_ops():
    torch.set_num_threads(1)
    with use_backend("reference"):
        yield


def _episodes(lengths, size=32, action_dim=2, seed=0):
    """Synthetic episodes whose values name their place: action[t] = (e, t, ...), state[t] = t,
    pixels[t] filled with (7 e + t) mod 256."""
    rng = np.random.default_rng(seed)
    eps = []
    for e, L in enumerate(lengths):
        t = np.arange(L)
        action = np.stack([np.full(L, e), t] + [rng.uniform(-1, 1, L) for _ in range(action_dim - 2)], 1)
        pixels = np.broadcast_to(((7 * e + t) % 256).astype(np.uint8)[:, None, None, None], (L, size, size, 3)).copy()
        eps.append({"pixels": pixels, "action": action.astype(np.float32), "state": t[:, None].astype(np.float32)})
    return eps


@pytest.fixture
def synthetic(tmp_path):
    path = tmp_path / "synthetic"
    write_dataset(path, _episodes([13, 11, 4, 15]), "synthetic-v0", shard_episodes=3)
    return path


# --------------------------------------------------------------------------------------------------
# The format and its reader (no stable-worldmodel needed)
# --------------------------------------------------------------------------------------------------
def test_reader_returns_what_was_written(synthetic):
    ds = TrajectoryDataset(synthetic)
    m = ds.manifest
    assert (ds.num_episodes, ds.num_rows, ds.frame_size, ds.channels, ds.action_dim) == (4, 43, (32, 32), 3, 2)
    assert (m["episodes"], m["rows"], m["transitions"]) == (4, 43, 39)
    assert [s["episodes"] for s in m["shards"]] == [3, 1]
    assert m["episode_len"] == {"min": 4, "mean": 43 / 4, "max": 15}
    assert ds.lengths.tolist() == [13, 11, 4, 15] and ds.offsets.tolist() == [0, 13, 24, 28]
    for e, want in enumerate(_episodes([13, 11, 4, 15])):
        got = ds.episode(e)
        assert np.array_equal(got["pixels"], want["pixels"]) and np.array_equal(got["state"], want["state"])
        assert np.array_equal(got["action"][:-1], want["action"][:-1]) and np.isnan(got["action"][-1]).all()
    with pytest.raises(IndexError, match=r"episode must be in \[0, 4\), got 4"):
        ds.episode(4)


def test_windows_cover_every_start_and_block_the_actions(synthetic):
    ds = TrajectoryDataset(synthetic)
    # 3 model steps of 2 env steps: 6 transitions, so an episode of L rows has L - 6 starts.
    episodes, starts = ds.window_starts(3, 2)
    assert len(episodes) == (13 - 6) + (11 - 6) + 0 + (15 - 6)
    assert episodes.tolist()[:8] == [0] * 7 + [1] and starts.tolist()[:8] == [0, 1, 2, 3, 4, 5, 6, 0]
    frames, actions = ds.windows(np.array([1, 3]), np.array([4, 8]), 3, 2)
    assert frames.shape == (2, 4, 32, 32, 3) and actions.shape == (2, 3, 4)
    assert frames[0, :, 0, 0, 0].tolist() == [7 + 4, 7 + 6, 7 + 8, 7 + 10]          # every 2nd frame from row 4
    assert frames[1, :, 0, 0, 0].tolist() == [21 + 8, 21 + 10, 21 + 12, 21 + 14]    # up to the last row, 14
    assert actions[1, :, 1::2].tolist() == [[8, 9], [10, 11], [12, 13]]             # the two env steps' t
    assert np.isfinite(actions).all()


def test_stream_batches_and_resumes_its_position(synthetic):
    stream = DiskTrajectoryStream(synthetic, batch_size=5, episode_len=3, action_block=2, seed=3)
    it = iter(stream)
    first = next(it)
    assert first["obs"].shape == (5, 4, 3, 32, 32) and first["obs"].dtype == torch.float32
    assert first["actions"].shape == (5, 3, 4)
    assert 0.0 <= float(first["obs"].min()) and float(first["obs"].max()) <= 1.0
    # frame t of a window is start + 2t: its pixel value grows by 2/255 per model step
    steps = (first["obs"][:, 1:, 0, 0, 0] - first["obs"][:, :-1, 0, 0, 0]) * 255
    assert torch.allclose(steps, torch.full_like(steps, 2.0), atol=1e-3)
    state = it.state_dict()
    expected = [next(it) for _ in range(2)]
    again = iter(stream)
    again.load_state_dict({k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()})
    for want in expected:
        got = next(again)
        assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(TrajectoryDatasetError, match=r"no window of episode_len 8 model steps x action_block 2 = 16 "
                                                     r"transitions: its longest episode has 14"):
        DiskTrajectoryStream(synthetic, batch_size=2, episode_len=8, action_block=2)


def test_empty_interrupted_and_truncated_datasets_are_named(tmp_path, synthetic):
    with pytest.raises(TrajectoryDatasetError, match=r"has no manifest.json \(an empty or foreign folder\)"):
        TrajectoryDataset(tmp_path)
    with pytest.raises(TrajectoryDatasetError, match="got nothing there"):
        TrajectoryDataset(tmp_path / "absent")
    interrupted = tmp_path / "interrupted"
    shutil.copytree(synthetic, interrupted)
    (interrupted / "manifest.json").unlink()
    (interrupted / "collect.json").write_text("{}")
    with pytest.raises(TrajectoryDatasetError, match="an interrupted collection: rerun `jepa-engine collect` with the "
                                                     "same arguments"):
        TrajectoryDataset(interrupted)
    # A truncated frame file: the file, the expected shape and the bytes on disk.
    pixels = synthetic / "shard-00001" / "pixels.npy"
    size = pixels.stat().st_size
    with open(pixels, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(TrajectoryDatasetError, match=rf"shard-00001/pixels.npy is damaged or truncated .*expected "
                                                     rf"\[15, 32, 32, 3\] uint8, {size - 1000} bytes on disk"):
        TrajectoryDataset(synthetic)
    # write_dataset checks its episodes.
    with pytest.raises(ValueError, match=r"episodes\[1\] must be a dict with the columns \['action', 'pixels'\]"):
        write_dataset(tmp_path / "bad", [{"pixels": np.zeros((2, 8, 8, 3), np.uint8), "action": np.zeros((2, 2))},
                                         {"pixels": np.zeros((2, 8, 8, 3), np.uint8)}], "x")
    with pytest.raises(ValueError, match="episodes must be a non-empty list of episodes, got"):
        write_dataset(tmp_path / "none", [], "x")


def test_action_dimension_mismatch_names_expected_and_actual(synthetic):
    cfg = WMTrainConfig.from_name("data-test", model_overrides={"history": 2, "action_dim": 3})
    with pytest.raises(TrajectoryDatasetError, match=r"model_overrides.action_dim must be 4 \(the dataset's action_dim "
                                                     r"2 x action_block 2, dataset .*\), got 3"):
        config_for_dataset(cfg, synthetic)
    fitted = config_for_dataset(WMTrainConfig.from_name("data-test"), synthetic)
    mc = fitted.model_config()
    assert (mc.img_size, mc.in_chans, mc.action_dim, mc.history) == (32, 3, 4, 2)
    # A config that names the dataset directly but another action dim fails before training starts.
    wrong = WMTrainConfig.from_dict({**fitted.to_dict(), "action_block": 3})
    with pytest.raises(TrajectoryDatasetError, match=r"the world model's action_dim must be 6 = action_dim 2 x "
                                                     r"action_block 3 \(dataset .*\), got 4"):
        train_world_model(wrong, None, log=None)


# --------------------------------------------------------------------------------------------------
# Training from disk: exact resume
# --------------------------------------------------------------------------------------------------
def _interrupt_at(step: int):
    def log(msg: str) -> None:
        if msg.startswith(f"step {step:5d} "):
            raise KeyboardInterrupt
    return log


def _same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"tensors differ: {diff[:5]}"


def test_train_from_disk_resumes_exactly(tmp_path, synthetic):
    cfg = config_for_dataset(WMTrainConfig.from_name("data-test", steps=6, checkpoint_every=3, log_every=1), synthetic)
    straight = train_world_model(cfg, tmp_path / "a", log=None)
    with pytest.raises(KeyboardInterrupt):
        train_world_model(cfg, tmp_path / "b", log=_interrupt_at(4))
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "b")] == [3]
    resumed = train_world_model(cfg, tmp_path / "b", log=None, resume=True)
    assert resumed["resumed_from"] == 3 and resumed["steps"] == 6
    ta, ma = ckpt.load_checkpoint(tmp_path / "a")
    tb, mb = ckpt.load_checkpoint(tmp_path / "b")
    _same_tensors(ta, tb)
    assert ma == mb and ma["config"]["data"] == str(synthetic.resolve())
    assert resumed["losses"] == straight["losses"]
    assert [row[0] for row in straight["losses"]] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite([row[1] for row in straight["losses"]]))


def test_resume_refuses_another_dataset_at_the_same_path(tmp_path, synthetic):
    """A dataset re-collected at the run's --data path (other episodes) is not the one the run trained on:
    resuming would continue on other data, so it raises, naming both."""
    cfg = config_for_dataset(WMTrainConfig.from_name("data-test", steps=4, checkpoint_every=2, log_every=1), synthetic)
    with pytest.raises(KeyboardInterrupt):
        train_world_model(cfg, tmp_path / "run", log=_interrupt_at(3))
    shutil.rmtree(synthetic)
    write_dataset(synthetic, _episodes([14, 12, 9, 15], seed=1), "synthetic-v0", shard_episodes=3)
    with pytest.raises(ckpt.CheckpointError, match=r"cannot be resumed on this data: it was trained on the dataset "
                                                   r"with manifest sha256 [0-9a-f]{16}\.\.\., but the run now reads "
                                                   r"the dataset with manifest sha256 [0-9a-f]{16}"):
        train_world_model(cfg, tmp_path / "run", log=None, resume=True)


def test_cli_train_wm_data_errors_are_one_line(tmp_path, synthetic, capsys):
    from jepa_engine.cli import main

    assert main(["train-wm", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jepa-engine train-wm: error: argument --data: dataset ") and "got nothing there" in err
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(WMTrainConfig.from_name("data-test", model_overrides={"history": 2,
                                                                                       "img_size": 64}).to_dict()))
    assert main(["train-wm", "--data", str(synthetic), "--config", str(config), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "argument --data: model_overrides.img_size must be 32 (the dataset's frame size" in err and "got 64" in err


# --------------------------------------------------------------------------------------------------
# Collection from stable-worldmodel's TwoRoom
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def swm():
    return pytest.importorskip("stable_worldmodel", reason="stable-worldmodel is not installed (make envs)")


COLLECT = ["--env", "swm/TwoRoom-v1", "--policy", "expert", "--episodes", "4", "--steps", "12", "--size", "32",
           "--num-envs", "2", "--shard-episodes", "2", "--seed", "5", "--no-progress"]


@pytest.fixture(scope="module")
def tworoom(swm, tmp_path_factory):
    from jepa_engine.cli import main

    out = tmp_path_factory.mktemp("tworoom") / "data"
    torch.set_num_threads(1)
    assert main(["collect", *COLLECT, "--out", str(out)]) == 0
    return out


def test_collect_tworoom_writes_a_readable_dataset(tworoom):
    ds = TrajectoryDataset(tworoom)
    m = ds.manifest
    assert (m["env_id"], m["policy"], m["seed"], m["frame_size"], m["channels"]) == ("swm/TwoRoom-v1", "expert", 5,
                                                                                     [32, 32], 3)
    assert (m["action_dim"], m["action_low"], m["action_high"]) == (2, [-1.0, -1.0], [1.0, 1.0])
    assert m["episodes"] == 4 and m["rows"] == int(ds.lengths.sum()) and m["transitions"] == m["rows"] - 4
    assert [s["episodes"] for s in m["shards"]] == [2, 2] and m["collect"]["steps"] == 12
    assert all(2 <= L <= 13 for L in ds.lengths.tolist())
    assert {"pixels", "action", "state", "goal_state"} <= set(ds.columns) and "render_time" not in ds.columns
    for e in range(4):
        ep = ds.episode(e)
        assert ep["pixels"].dtype == np.uint8 and ep["pixels"].shape[1:] == (32, 32, 3)
        a = ep["action"]
        assert np.isnan(a[-1]).all() and np.isfinite(a[:-1]).all() and np.abs(a[:-1]).max() <= 1.0
        # the agent moves at most `speed` per step along each axis, and the frames change with it
        moved = np.abs(np.diff(ep["state"], axis=0))
        assert moved.max() <= 10.5 * 1.5, moved.max()
        if moved.max() > 1.0:
            assert not np.array_equal(ep["pixels"][0], ep["pixels"][-1])


def test_collect_resumes_an_interrupted_collection_exactly(tworoom, tmp_path, capsys):
    from jepa_engine.cli import main

    part = tmp_path / "part"
    shutil.copytree(tworoom, part)
    (part / "manifest.json").unlink()                       # killed while collecting shard 1
    shutil.rmtree(part / "shard-00001")
    (part / "shard-00001.tmp-12345").mkdir()
    (part / "shard-00001.tmp-12345" / "pixels.npy").write_bytes(b"half")
    with pytest.raises(TrajectoryDatasetError, match="interrupted collection"):
        TrajectoryDataset(part)
    capsys.readouterr()
    assert main(["collect", *COLLECT, "--out", str(part)]) == 0
    assert "resuming" in capsys.readouterr().out
    assert not list(part.glob("*.tmp-*"))
    a, b = TrajectoryDataset(tworoom), TrajectoryDataset(part)
    for e in range(4):
        ea, eb = a.episode(e), b.episode(e)
        for c in a.columns:
            assert np.array_equal(ea[c], eb[c], equal_nan=ea[c].dtype.kind == "f"), (e, c)
    # done: the same arguments return it, others are refused
    assert main(["collect", *COLLECT, "--out", str(part)]) == 0
    assert "is complete" in capsys.readouterr().out
    other = [("64" if a == "32" else a) for a in COLLECT]          # --size 64
    assert main(["collect", *other, "--out", str(part)]) == 2
    assert "argument --out: must be an empty folder or one holding this collection" in capsys.readouterr().err


def test_collect_with_worker_processes_gives_the_same_data(tworoom, tmp_path):
    from jepa_engine.cli import main

    assert main(["collect", *COLLECT, "--workers", "2", "--out", str(tmp_path / "w")]) == 0
    a, b = TrajectoryDataset(tworoom), TrajectoryDataset(tmp_path / "w")
    assert a.lengths.tolist() == b.lengths.tolist() and a.columns == b.columns
    for e in range(4):
        ea, eb = a.episode(e), b.episode(e)
        for c in a.columns:
            assert np.array_equal(ea[c], eb[c], equal_nan=ea[c].dtype.kind == "f"), (e, c)


def test_collect_bad_env_and_policy(swm, tmp_path, capsys):
    from jepa_engine.cli import main

    assert main(["collect", "--env", "swm/TwoRoom-v2", "--episodes", "1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "argument --env: must be a registered stable-worldmodel environment id" in err
    assert "got 'swm/TwoRoom-v2' (did you mean 'swm/TwoRoom-v1'" in err
    assert main(["collect", "--env", "swm/TwoRoom-v1", "--policy", "weak", "--episodes", "1",
                 "--out", str(tmp_path / "x")]) == 2
    assert ("argument --policy: must be one of ['expert', 'random'] for swm/TwoRoom-v1, got 'weak'"
            in capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def test_swm_reads_the_dataset(tworoom):
    """stable-worldmodel's dataset API over the same files: clips, chunks and the evaluation's start/goal."""
    from stable_worldmodel.world.world import _extract_init_goal

    from jepa_engine.integrations.swm_data import swm_dataset

    ds, ref = swm_dataset(tworoom, num_steps=3, frameskip=2), TrajectoryDataset(tworoom)
    assert len(ds) == sum(max(0, L - 6 + 1) for L in ref.lengths.tolist())
    clip = ds[0]
    assert clip["pixels"].shape == (3, 3, 32, 32) and clip["action"].shape == (3, 4)
    assert torch.equal(clip["pixels"][1].permute(1, 2, 0), torch.from_numpy(np.array(ref.episode(0)["pixels"][2])))
    init, goal, _ = _extract_init_goal(swm_dataset(tworoom), [0, 1], [0, 1], 5)
    assert np.array_equal(init["state"][1], ref.episode(1)["state"][1])
    assert np.array_equal(goal["goal_state"][0], ref.episode(0)["state"][5])
    assert goal["goal"].shape == (2, 32, 32, 3)


def test_collect_train_resume_from_the_command_line(tworoom, tmp_path, capsys):
    from jepa_engine.cli import main

    args = ["train-wm", "--data", str(tworoom), "--config", "data-test", "--steps", "4"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("data: swm/TwoRoom-v1 (expert, seed 5): 4 episodes") and "trained 4 steps" in out
    cfg = WMTrainConfig.from_dict(json.loads((tmp_path / "a" / "config.json").read_text()))
    assert cfg.data == str(tworoom.resolve()) and cfg.model_config().action_dim == 4
    # Interrupted after step 3 (checkpoint 2), then `--resume` from the run folder's config, which names
    # the dataset: the final weights, optimizer and stream state are the uninterrupted run's.
    with pytest.raises(KeyboardInterrupt):
        train_world_model(WMTrainConfig.from_dict({**cfg.to_dict(), "checkpoint_every": 2, "log_every": 1}),
                          tmp_path / "b", log=_interrupt_at(3))
    capsys.readouterr()
    assert main(["train-wm", "--resume", "--out", str(tmp_path / "b")]) == 0
    assert "trained 4 steps (resumed at step 2)" in capsys.readouterr().out
    _same_tensors(ckpt.load_checkpoint(tmp_path / "a")[0], ckpt.load_checkpoint(tmp_path / "b")[0])
