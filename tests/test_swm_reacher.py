"""Reacher (dm-control through stable-worldmodel): headless rendering, `collect` with the random policy and
`eval` with LeWorldModel's protocol, at test size.

Needs stable-worldmodel, dm-control and mujoco (`make envs`; `make test` installs them) and a MuJoCo that
renders headless (EGL or OSMesa): skipped, with the reason, where one of them is missing. The backend choice
itself is checked everywhere.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from jepa_engine.integrations import swm_data
from tests.helpers import reference_ops_one_thread

ENV = "swm/ReacherDMControl-v0"


def test_mujoco_gl_keeps_a_set_backend_and_picks_a_headless_one(monkeypatch):
    import ctypes.util
    import os

    monkeypatch.setattr(os, "environ", dict(os.environ))      # the process's own environment stays as it is
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    monkeypatch.delenv("PYOPENGL_PLATFORM", raising=False)
    assert swm_data.mujoco_gl() == "osmesa"
    assert os.environ["PYOPENGL_PLATFORM"] == "osmesa"
    for libs, want in (({"EGL", "OSMesa"}, "egl"), ({"OSMesa"}, "osmesa"), (set(), "glfw")):
        monkeypatch.delenv("MUJOCO_GL")
        monkeypatch.delenv("PYOPENGL_PLATFORM", raising=False)
        monkeypatch.setattr(ctypes.util, "find_library", lambda name, libs=libs: name if name in libs else None)
        assert swm_data.mujoco_gl() == want and os.environ["MUJOCO_GL"] == want
    assert swm_data.world_kwargs("swm/TwoRoom-v1", (32, 32)) == {}


@pytest.fixture(scope="module")
def reacher_env():
    """stable-worldmodel, dm-control and a MuJoCo that draws a frame headless, or a skip naming what is
    missing."""
    pytest.importorskip("stable_worldmodel", reason="stable-worldmodel is not importable (`make envs` installs it)",
                        exc_type=ImportError)
    gl = swm_data.mujoco_gl()            # before dm_control is imported: it reads MUJOCO_GL once
    pytest.importorskip("mujoco", reason="mujoco is not installed (`make envs` installs it)", exc_type=ImportError)
    pytest.importorskip("dm_control", reason="dm-control is not installed (`make envs` installs it)",
                        exc_type=ImportError)
    try:
        from dm_control import suite

        env = suite.load("reacher", "hard")
        env.reset()
        frame = env.physics.render(16, 16, camera_id=0)
        env.close()
    except Exception as e:  # noqa: BLE001 - any failure to draw is the reason to skip
        pytest.skip(f"MuJoCo cannot render headless here (MUJOCO_GL={gl}): {type(e).__name__}: {e}")
    assert frame.shape == (16, 16, 3) and frame.std() > 0
    return gl


@pytest.fixture(scope="module")
def reacher(reacher_env, tmp_path_factory):
    from jepa_engine.cli import main

    out = tmp_path_factory.mktemp("reacher") / "data"
    with reference_ops_one_thread():
        assert main(["collect", "--env", ENV, "--episodes", "4", "--steps", "40", "--size", "32", "--num-envs", "2",
                     "--seed", "3", "--out", str(out), "--no-progress"]) == 0
    return out


def test_collect_reacher_random(reacher):
    ds = swm_data.TrajectoryDataset(reacher)
    m = ds.manifest
    assert (m["env_id"], m["policy"], m["seed"], m["frame_size"], m["channels"]) == (ENV, "random", 3, [32, 32], 3)
    assert (m["action_dim"], m["action_low"], m["action_high"]) == (2, [-1.0, -1.0], [1.0, 1.0])
    assert m["episodes"] == 4 and ds.lengths.tolist() == [41] * 4 and m["transitions"] == 160
    assert {"pixels", "action", "qpos", "qvel"} <= set(ds.columns)
    assert m["columns"]["qpos"]["shape"] == [2] and m["columns"]["qvel"]["shape"] == [2]
    for e in range(4):
        ep = ds.episode(e)
        a = np.asarray(ep["action"])
        assert np.isnan(a[-1]).all() and np.isfinite(a[:-1]).all() and np.abs(a[:-1]).max() <= 1.0
        assert np.abs(a[:-1]).max() > 0.5                      # uniform random actions, not zeros
        px = np.asarray(ep["pixels"])
        assert px.dtype == np.uint8 and px.shape == (41, 32, 32, 3)
        assert px[0].std() > 5                                  # the arm on the floor, not a blank frame
        moved = np.abs(np.diff(np.asarray(ep["qpos"]), axis=0)).max()
        assert moved > 1e-3 and not np.array_equal(px[0], px[-1])
    # Episode e is reset with seed + e: different starts.
    assert not np.allclose(ds.episode(0)["qpos"][0], ds.episode(1)["qpos"][0])


def test_reacher_frames_follow_the_state_and_render_plain(reacher):
    """A dataset row's joint state set into a fresh env draws that row's frame exactly, at the frame size
    directly, with shadows and MSAA off."""
    import stable_worldmodel as swm

    ds = swm_data.TrajectoryDataset(reacher)
    world = swm.World(ENV, num_envs=1, image_shape=(32, 32), max_episode_steps=5,
                      **swm_data.world_kwargs(ENV, (32, 32)))
    try:
        world.reset(seed=[99])
        env = world.envs.envs[0]
        quality = env.unwrapped.env.physics.model.vis.quality
        assert (quality.shadowsize, quality.offsamples) == (0, 0)
        assert env.unwrapped._task_name == "qpos_match"
        ep = ds.episode(2)
        for t in (0, 17, 40):
            env.unwrapped.set_state(np.array(ep["qpos"][t]), np.array(ep["qvel"][t]))
            frame = env.render()
            assert frame.shape == (32, 32, 3)
            assert np.array_equal(frame, ep["pixels"][t]), f"row {t}"
    finally:
        world.close()


def test_reacher_collect_train_eval_cli(reacher, tmp_path, capsys):
    from jepa_engine.cli import main

    run = tmp_path / "run"
    with reference_ops_one_thread():
        assert main(["train-wm", "--config", "data-test", "--data", str(reacher), "--out", str(run), "--steps", "2",
                     "--no-report"]) == 0
        capsys.readouterr()
        assert main(["eval", "--env", ENV, "--checkpoint", str(run), "--episodes", "3", "--samples", "8",
                     "--iterations", "2", "--elites", "2", "--seed", "1"]) == 0
    report = json.loads((run / "eval" / "eval-ReacherDMControl-v0-cem.json").read_text())
    assert report["env"] == ENV and report["protocol"]["goal_offset"] == 25 and report["protocol"]["eval_budget"] == 50
    assert [r["policy"] for r in report["rows"]] == ["jepa cem 8x2", "random actions", "dataset replay"]
    # Success is the qpos_match task's `terminated` (both joints within 0.05 rad of the goal row's): the
    # dataset's own actions from the start row's state reach it, which needs the state and target setters.
    replay = report["rows"][2]
    assert replay["successes"] == 3, report["rows"]
    assert all(0 <= r["successes"] <= 3 for r in report["rows"])
    lat = report["rows"][0]["plan_ms"]
    assert lat["plans"] >= 1 and 0 < lat["median"] <= lat["p90"]
    assert report["budget"]["action_block"] == 2 and report["budget"]["candidate_rollouts_per_plan"] == 16
    assert "| dataset replay | 3/3 = 100% |" in (run / "eval" / "eval-ReacherDMControl-v0-cem.md").read_text()
