"""Trajectory datasets from stable-worldmodel's environments: collection (``jepa-engine collect``), the
reader, and the bridges back to stable-worldmodel.

The format (``"jepa-trajectories"`` v1; :mod:`jepa_engine.training.trajectory_data` holds the reader,
which needs numpy only)::

    DIR/
      manifest.json        written last, atomically: the dataset is complete if and only if it exists
      collect.json         the collection's arguments, written first (a resumed collection must match them)
      shard-00000/         up to `shard_episodes` whole episodes, written as shard-00000.tmp-<pid> and renamed
        ep_len.npy         int64 [E]              rows of each episode
        pixels.npy         uint8 [R, H, W, C]     frames, channels last (R = sum of ep_len)
        action.npy         float32 [R, A]         row t: the action taken at frame t; NaN in an episode's last row
        state.npy ...      [R, ...]               every other numeric column the env reports at that frame
      shard-00001/ ...

One row per frame, as stable-worldmodel's own datasets: an episode of L rows holds L frames and L - 1
transitions. ``manifest.json`` records env id, policy, seed, frame size, channels, action dim and bounds,
counts (episodes, rows, transitions, episode lengths), the columns' dtypes and shapes, the shards, bytes,
collection time and package versions.

Public API:
    collect(env_id, policy, episodes, steps, out, size=64, seed=0, ...) -> manifest   (resumable)
    TrajectoryDataset(path)        .episode(i), .rows(i, start, end), .window_starts(T, k), .windows(...),
                                   .lengths, .offsets, .frame_size, .action_dim, .manifest
    DiskTrajectoryStream(path, batch_size, episode_len, action_block, seed)   training batches
    swm_dataset(path, num_steps=1, frameskip=1)   a stable_worldmodel.data.Dataset over the same files
                                   (``World.evaluate(dataset=...)`` reads it as it reads its own)
    export(path, out, format="lance"|"folder"|"hdf5")   the dataset in one of stable-worldmodel's formats
    write_dataset(out, episodes, env_id, ...)   trajectories from elsewhere, written in this format
    POLICIES                       {env id: {policy name: description}}
    world_kwargs(env_id, (H, W))   the World arguments an env needs (MuJoCo: headless GL, plain frames, task)

stable_worldmodel is imported inside the functions that need it: the reader works without it.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from jepa_engine.training.checkpoint import atomic_write_text
from jepa_engine.training.trajectory_data import (
    ACTIONS, COLLECT, FORMAT, FRAMES, MANIFEST, VERSION, DiskTrajectoryStream, TrajectoryDataset,
    TrajectoryDatasetError, dataset_bytes, frames_to_obs, read_manifest, shard_name, summary_line,
)

__all__ = ["collect", "TrajectoryDataset", "DiskTrajectoryStream", "TrajectoryDatasetError", "swm_dataset",
           "export", "write_dataset", "read_manifest", "frames_to_obs", "summary_line", "POLICIES", "CollectError",
           "check_env_id", "world_kwargs", "mujoco_gl", "MUJOCO_ENVS"]

# Collection policies by env id: LeWorldModel's (TwoRoom: the scripted expert with action noise 2.0;
# PushT: the weak policy, pushes sampled near the block) and uniform random actions everywhere.
# Reacher's expert is a SAC policy that needs its trained checkpoint: not offered.
POLICIES: dict[str, dict[str, str]] = {
    "swm/TwoRoom-v1": {"expert": "the scripted expert through the door, action noise 2.0",
                       "random": "uniform random actions"},
    "swm/PushT-v1": {"weak": "PushT's weak collection policy (pushes sampled near the block)",
                     "random": "uniform random actions"},
    "swm/ReacherDMControl-v0": {"random": "uniform random actions"},
}
# Info columns not stored: wall-clock timings and the wrapper's random episode ids (a dataset depends
# on its arguments only), and images other than the frame (e.g. PushT's goal image: the goal of an
# evaluation is a later frame of the dataset).
_SKIP_COLUMNS = ("render_time", "id")
DEFAULT_SHARD_BYTES = 128 * 2**20     # a shard is assembled in memory before it is written


# MuJoCo (dm-control) envs: rendered headless (:func:`mujoco_gl`), at the frame size with shadows and MSAA
# off (:class:`MujocoFrames`). Reacher runs its "qpos_match" task, whose `terminated` is the joints within
# 0.05 rad of a target set by `set_target_qpos` (the evaluation's goal); its physics and frames are those
# of the default task (the target is not drawn).
MUJOCO_ENVS: dict[str, dict[str, Any]] = {"swm/ReacherDMControl-v0": {"task": "qpos_match"}}


class CollectError(ValueError):
    """Bad arguments to :func:`collect` (unknown env or policy, a folder holding another collection)."""


def _bad(arg: str, expected: str, got: Any) -> CollectError:
    return CollectError(f"{arg} must be {expected}, got {got!r}")


def check_env_id(env_id: str) -> None:
    """``env_id`` must be a registered stable-worldmodel environment (:class:`CollectError` names the
    closest ones)."""
    import difflib

    import stable_worldmodel as swm

    if env_id not in swm.envs.WORLDS:
        close = difflib.get_close_matches(env_id, sorted(swm.envs.WORLDS), n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise CollectError(f"env must be a registered stable-worldmodel environment id such as {sorted(POLICIES)}, "
                           f"got {env_id!r}{hint}")


def mujoco_gl() -> str:
    """MuJoCo's OpenGL backend for headless rendering, chosen before dm_control is imported: ``MUJOCO_GL``
    when set, else ``egl`` where libEGL loads (a GPU's, or Mesa's software one), else ``osmesa`` where
    libOSMesa loads, else ``glfw`` (needs a display). Sets ``MUJOCO_GL`` (and ``PYOPENGL_PLATFORM`` with
    it) and returns the backend."""
    import ctypes.util

    gl = os.environ.get("MUJOCO_GL")
    if not gl:
        gl = next((name for name, lib in (("egl", "EGL"), ("osmesa", "OSMesa")) if ctypes.util.find_library(lib)),
                  "glfw")
        os.environ["MUJOCO_GL"] = gl
    if gl in ("egl", "osmesa"):
        os.environ.setdefault("PYOPENGL_PLATFORM", gl)
    return gl


def _mujoco_frames_class():
    import gymnasium as gym

    class MujocoFrames(gym.Wrapper):
        """A dm-control env's frames rendered at ``(height, width)`` with shadows and MSAA off: its own
        render draws 224 x 224 with a 2048-px shadow map and 4x MSAA, about 10x slower on a software GL and
        resized down anyway. Each new physics (a reset may recompile the model) is set before it is first
        drawn."""

        def __init__(self, env, height: int, width: int):
            super().__init__(env)
            self.height, self.width = int(height), int(width)
            self._physics = None

        def _plain(self) -> None:
            physics = self.env.unwrapped.env.physics
            if physics is not self._physics:
                quality = physics.model.vis.quality
                quality.shadowsize, quality.offsamples = 0, 0
                self._physics = physics

        def reset(self, **kwargs):
            out = self.env.reset(**kwargs)
            self._plain()
            return out

        def render(self):
            self._plain()
            return self.env.unwrapped.render(width=self.width, height=self.height)

    return MujocoFrames


def world_kwargs(env_id: str, frame_size) -> dict[str, Any]:
    """Extra ``stable_worldmodel.World`` arguments for ``env_id`` at ``frame_size`` ``(H, W)`` (the same in
    collection and evaluation): for a MuJoCo env, the headless backend (set here), :class:`MujocoFrames`
    and its task (:data:`MUJOCO_ENVS`); nothing for the others."""
    if env_id not in MUJOCO_ENVS:
        return {}
    from functools import partial

    mujoco_gl()
    H, W = frame_size
    return {"pre_wrappers": [partial(_mujoco_frames_class(), height=H, width=W)], **MUJOCO_ENVS[env_id]}


def _check_policy(env_id: str, policy: str) -> None:
    offered = POLICIES.get(env_id, {"random": "uniform random actions"})
    if policy not in offered:
        raise _bad("policy", f"one of {sorted(offered)} for {env_id}", policy)


def _make_policy(env_id: str, policy: str):
    import stable_worldmodel as swm

    _check_policy(env_id, policy)
    if policy == "random":
        return swm.policy.RandomPolicy()
    if env_id == "swm/TwoRoom-v1":
        from stable_worldmodel.envs.two_room import ExpertPolicy

        return ExpertPolicy(action_noise=2.0, action_repeat_prob=0.05)
    from stable_worldmodel.envs.pusht import WeakPolicy

    return WeakPolicy()


def _seed_policy(policy, seed: int) -> None:
    """Seed the policy's own randomness (each shard from its own seed, so a resumed collection draws
    what an uninterrupted one would)."""
    if hasattr(policy, "rng") or hasattr(policy, "set_seed"):
        policy.set_seed(seed)


def _row(infos: dict, i: int, columns: Optional[dict]) -> dict[str, np.ndarray]:
    """Env ``i``'s numeric info columns at this frame (the stacked infos are [num_envs, 1, ...])."""
    row = {}
    for col, data in infos.items():
        if col.startswith("_") or col in _SKIP_COLUMNS or col == ACTIONS:
            continue
        if columns is not None and col not in columns:
            continue
        if hasattr(data, "detach"):
            data = data.detach().cpu().numpy()
        if not isinstance(data, np.ndarray) or data.dtype.kind not in "biuf":
            continue
        val = np.asarray(data[i, 0] if data.ndim >= 2 else data[i])
        if col != FRAMES and val.dtype == np.uint8 and val.ndim == 3:
            continue                                           # other images (goal frames)
        row[col] = val.copy()
    return row


def _collect_shard(world, policy, first_episode: int, count: int, steps: int, seed: int, action_dim: int,
                   progress: Optional[Callable[[int], None]]) -> list[dict[str, np.ndarray]]:
    """``count`` episodes (numbers ``first_episode``..), each reset with seed ``seed + its number`` and run
    for ``steps`` transitions or until the env terminates; returns one dict of stacked columns each."""
    n = world.num_envs
    episodes: list[dict[str, np.ndarray]] = []
    for wave in range(0, count, n):
        m = min(n, count - wave)
        seeds = [seed + first_episode + wave + i for i in range(m)] + [None] * (n - m)
        _, infos = world.envs.reset(seed=seeds)
        rows = [[_row(infos, i, None)] for i in range(m)]
        acts: list[list[np.ndarray]] = [[] for _ in range(m)]
        alive = np.zeros(n, dtype=bool)
        alive[:m] = True
        for _ in range(steps):
            world.infos = infos
            actions = np.asarray(policy.get_action(infos), dtype=np.float32).reshape(n, action_dim)
            _, _, terminated, truncated, infos = world.envs.step(actions, mask=alive)
            for i in np.flatnonzero(alive[:m]):
                acts[i].append(actions[i].copy())
                rows[i].append(_row(infos, i, rows[i][0]))
            alive &= ~(terminated | truncated)
            if not alive[:m].any():
                break
        for i in range(m):
            ep = {c: np.stack([r[c] for r in rows[i]]) for c in rows[i][0]}
            ep[ACTIONS] = np.concatenate([np.stack(acts[i]).astype(np.float32),
                                          np.full((1, action_dim), np.nan, np.float32)])
            episodes.append(ep)
        if progress:
            progress(m)
    return episodes


def _write_shard(out: Path, index: int, episodes: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Write one shard under a temporary name, fsync its files and rename it into place."""
    final = out / shard_name(index)
    tmp = out / f"{shard_name(index)}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    lengths = np.array([len(ep[ACTIONS]) for ep in episodes], dtype=np.int64)
    arrays = {"ep_len": lengths, **{c: np.concatenate([ep[c] for ep in episodes]) for c in episodes[0]}}
    for name, arr in arrays.items():
        with open(tmp / f"{name}.npy", "wb") as f:
            np.save(f, arr, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, final)
    return {"name": final.name, "episodes": int(len(lengths)), "rows": int(lengths.sum())}


def _shard_info(folder: Path) -> Optional[dict[str, Any]]:
    """A complete shard's entry, read back from its ``ep_len.npy`` (None if unreadable)."""
    try:
        lengths = np.load(folder / "ep_len.npy", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    return {"name": folder.name, "episodes": int(len(lengths)), "rows": int(lengths.sum())}


def collect(env_id: str, policy: str, episodes: int, steps: int, out, size: int = 64, seed: int = 0,
            num_envs: int = 4, shard_episodes: int = 0, workers: int = 1, progress: bool = False,
            log: Optional[Callable[[str], None]] = print) -> dict[str, Any]:
    """Roll ``policy`` in ``env_id`` for ``episodes`` episodes of at most ``steps`` transitions (an episode
    ends early when the env terminates), frames rendered at ``size`` x ``size``, and write the dataset to
    ``out``; returns its manifest.

    Episode ``e`` is reset with seed ``seed + e``; ``num_envs`` run at once (the policies draw their noise
    for all of them at once: the data depends on it, and a resume must keep it). Shards of ``shard_episodes``
    episodes (0: about 128 MiB each) are written one at a time, each complete or absent, the manifest
    last: rerunning an interrupted collection with the same arguments keeps its shards and collects the
    rest, and gives the dataset an uninterrupted run would have. A complete dataset with the same
    arguments is returned as it is; a folder holding another collection is an error. ``workers`` > 1
    collects that many shards at once in worker processes (the same data: each shard is seeded by its
    index).
    """
    for name, v, lo in (("episodes", episodes, 1), ("steps", steps, 1), ("size", size, 8), ("num_envs", num_envs, 1),
                        ("shard_episodes", shard_episodes, 0), ("seed", seed, 0), ("workers", workers, 1)):
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= lo):
            raise _bad(name, f"an int >= {lo}", v)
    check_env_id(env_id)
    _check_policy(env_id, policy)
    out = Path(out)
    args = {"format": FORMAT, "version": VERSION, "env_id": env_id, "policy": policy, "episodes": episodes,
            "steps": steps, "size": size, "seed": seed, "num_envs": min(num_envs, episodes)}
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        same = {k: manifest.get("collect", {}).get(k) for k in args} == args
        if not same:
            raise _bad("out", "an empty folder or one holding this collection", f"{out} (complete, "
                       f"collected with {manifest.get('collect')})")
        if log:
            log(f"{out} is complete: {summary_line(manifest)}")
        return manifest
    out.mkdir(parents=True, exist_ok=True)
    if (out / COLLECT).is_file():
        saved = json.loads((out / COLLECT).read_text())
        if {k: saved.get(k) for k in args} != args:
            diff = {k: (saved.get(k), v) for k, v in args.items() if saved.get(k) != v}
            raise _bad("out", "a folder of this collection (rerun with its arguments to resume it)",
                       f"{out} holding another collection; differs in (saved, given): {diff}")
        shard_episodes = saved["shard_episodes"]
    elif any(out.iterdir()):
        raise _bad("out", "an empty folder or one of an interrupted collection", f"{out} (holds other files)")

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # the envs render small frames with torch: one thread is fastest
    try:
        return _collect(out, args, env_id, policy, episodes, steps, size, seed, num_envs, shard_episodes, workers,
                        progress, log)
    finally:
        torch.set_num_threads(threads)


def _collect(out: Path, args: dict, env_id: str, policy: str, episodes: int, steps: int, size: int, seed: int,
             num_envs: int, shard_episodes: int, workers: int, progress: bool, log) -> dict[str, Any]:
    import stable_worldmodel as swm

    policy_obj = _make_policy(env_id, policy)
    world = swm.World(env_id, num_envs=min(num_envs, episodes), image_shape=(size, size),
                      max_episode_steps=steps + 1, **world_kwargs(env_id, (size, size)))
    try:
        world.set_policy(policy_obj)
        space = world.envs.single_action_space
        action_dim = int(np.prod(space.shape))
        if not shard_episodes:
            frame_bytes = size * size * 3
            shard_episodes = max(1, DEFAULT_SHARD_BYTES // (frame_bytes * (steps + 1)))
        if not (out / COLLECT).is_file():
            atomic_write_text(out / COLLECT, json.dumps({**args, "shard_episodes": shard_episodes}, indent=1) + "\n")
        num_shards = -(-episodes // shard_episodes)
        written = {k: _shard_info(out / shard_name(k)) for k in range(num_shards) if (out / shard_name(k)).is_dir()}
        shards = {k: info for k, info in written.items() if info is not None}
        done = sum(info["episodes"] for info in shards.values())
        for stale in out.glob("shard-*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if shards and log:
            log(f"resuming {out}: {len(shards)} of {num_shards} shards ({done} episodes) already written")
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=episodes, initial=done, desc="collect", unit="ep")
        t0, new_rows = time.perf_counter(), 0
        jobs = [(str(out), env_id, policy, k, k * shard_episodes, min(shard_episodes, episodes - k * shard_episodes),
                 steps, size, seed, world.num_envs) for k in range(num_shards) if k not in shards]
        if workers > 1 and len(jobs) > 1:
            import multiprocessing

            with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
                for job, info in zip(jobs, pool.imap(_shard_job, jobs)):
                    shards[job[3]] = info
                    new_rows += info["rows"]
                    if bar:
                        bar.update(info["episodes"])
        else:
            for (_, _, _, k, first, count, *_rest) in jobs:
                _seed_policy(policy_obj, seed * 100_003 + k)
                eps = _collect_shard(world, policy_obj, first, count, steps, seed, action_dim,
                                     bar.update if bar else None)
                shards[k] = _write_shard(out, k, eps)
                new_rows += shards[k]["rows"]
        shards = [shards[k] for k in sorted(shards)]
        seconds = time.perf_counter() - t0
        if bar:
            bar.close()
    finally:
        world.close()

    low, high = np.broadcast_to(space.low, space.shape).ravel(), np.broadcast_to(space.high, space.shape).ravel()
    return _finish(out, shards, {
        "env_id": env_id, "policy": policy, "seed": seed, "steps": steps, "action_low": low.tolist(),
        "action_high": high.tolist(), "shard_episodes": shard_episodes, "seconds": round(seconds, 3),
        "steps_per_second": round(new_rows / seconds, 1) if seconds > 0 else None, "collect": args}, log)


def _shard_job(job: tuple) -> dict[str, Any]:
    """One shard in a worker process: its own World and policy, seeded as the serial path seeds them, so
    the shard holds the same data."""
    out, env_id, policy, k, first, count, steps, size, seed, num_envs = job
    import stable_worldmodel as swm
    import torch

    torch.set_num_threads(1)
    policy_obj = _make_policy(env_id, policy)
    world = swm.World(env_id, num_envs=num_envs, image_shape=(size, size), max_episode_steps=steps + 1,
                      **world_kwargs(env_id, (size, size)))
    try:
        world.set_policy(policy_obj)
        action_dim = int(np.prod(world.envs.single_action_space.shape))
        _seed_policy(policy_obj, seed * 100_003 + k)
        return _write_shard(Path(out), k, _collect_shard(world, policy_obj, first, count, steps, seed, action_dim,
                                                         None))
    finally:
        world.close()


def _finish(out: Path, shards: list[dict], info: dict[str, Any], log: Optional[Callable[[str], None]]) -> dict:
    """Write the manifest of the complete shards ``shards`` in ``out`` (atomically, last), read the dataset
    back against it, and return it."""
    import torch

    # The columns' dtypes and shapes, from shard 0 (every shard holds the same columns).
    arrays = {f.stem: np.load(f, mmap_mode="r") for f in (out / shards[0]["name"]).glob("*.npy") if f.stem != "ep_len"}
    lengths = np.concatenate([np.load(out / s["name"] / "ep_len.npy") for s in shards])
    H, W, C = arrays[FRAMES].shape[1:]
    manifest = {
        "format": FORMAT, "version": VERSION, "env_id": info["env_id"], "policy": info["policy"], "seed": info["seed"],
        "frame_size": [int(H), int(W)], "channels": int(C), "action_dim": int(arrays[ACTIONS].shape[1]),
        "action_low": info["action_low"], "action_high": info["action_high"],
        "episodes": int(len(lengths)), "rows": int(lengths.sum()), "transitions": int(lengths.sum() - len(lengths)),
        "steps": info["steps"],
        "episode_len": {"min": int(lengths.min()), "mean": float(lengths.mean()), "max": int(lengths.max())},
        "columns": {c: {"dtype": str(a.dtype), "shape": list(a.shape[1:])} for c, a in sorted(arrays.items())},
        "shards": shards, "shard_episodes": info["shard_episodes"],
        "seconds": info.get("seconds"), "steps_per_second": info.get("steps_per_second"),
        "versions": {"stable_worldmodel": _version("stable-worldmodel"), "numpy": np.__version__,
                     "torch": torch.__version__},
        "collect": info.get("collect"),
    }
    manifest["bytes"] = dataset_bytes(out) + len(json.dumps(manifest, indent=1)) + 1
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    TrajectoryDataset(out)                                  # read back: every file as the manifest says
    if log:
        log(f"wrote {out}: {summary_line(manifest)}")
    return manifest


def write_dataset(out, episodes: list[dict[str, np.ndarray]], env_id: str, policy: str = "given", seed: int = 0,
                  action_low: Optional[list] = None, action_high: Optional[list] = None,
                  shard_episodes: int = 0) -> dict[str, Any]:
    """Write trajectories from elsewhere in this format: ``episodes`` of dicts with ``pixels`` [L, H, W, C]
    uint8 and ``action`` [L, A] (row t leaves frame t; the last row is set to NaN) and any other [L, ...]
    numeric columns, the same in every episode. ``out`` must be empty or absent; returns the manifest."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise _bad("out", "an empty or absent folder", str(out))
    if not episodes:
        raise _bad("episodes", "a non-empty list of episodes", episodes)
    keys = sorted(episodes[0])
    for i, ep in enumerate(episodes):
        if sorted(ep) != keys or FRAMES not in ep or ACTIONS not in ep:
            raise _bad(f"episodes[{i}]", f"a dict with the columns {keys} (pixels and action among them)", sorted(ep))
        L = len(ep[FRAMES])
        bad = {c: len(v) for c, v in ep.items() if len(v) != L}
        if bad or L < 1 or np.asarray(ep[FRAMES]).dtype != np.uint8 or np.ndim(ep[FRAMES]) != 4:
            raise _bad(f"episodes[{i}]", "uint8 pixels [L, H, W, C] and every column of L rows",
                       {c: np.shape(v) for c, v in ep.items()})
    out.mkdir(parents=True, exist_ok=True)
    eps = []
    for ep in episodes:
        ep = {c: np.asarray(v) for c, v in ep.items()}
        ep[ACTIONS] = ep[ACTIONS].astype(np.float32).reshape(len(ep[ACTIONS]), -1).copy()
        ep[ACTIONS][-1] = np.nan
        eps.append(ep)
    A = eps[0][ACTIONS].shape[1]
    per = shard_episodes or len(eps)
    shards = [_write_shard(out, k, eps[i:i + per]) for k, i in enumerate(range(0, len(eps), per))]
    taken = np.concatenate([e[ACTIONS][:-1] for e in eps])          # the observed range, when not given
    low = list(action_low) if action_low is not None else (taken.min(0) if len(taken) else np.zeros(A)).tolist()
    high = list(action_high) if action_high is not None else (taken.max(0) if len(taken) else np.zeros(A)).tolist()
    return _finish(out, shards, {"env_id": env_id, "policy": policy, "seed": seed,
                                 "steps": max(len(e[ACTIONS]) for e in eps) - 1, "action_low": low, "action_high": high,
                                 "shard_episodes": per}, None)


def _version(dist: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------------
# stable-worldmodel's side
# --------------------------------------------------------------------------------------------------
def swm_dataset(path, num_steps: int = 1, frameskip: int = 1, columns: Optional[list[str]] = None):
    """The dataset at ``path`` as a ``stable_worldmodel.data.Dataset`` (clips of ``num_steps`` frames
    ``frameskip`` apart, ``pixels`` as [T, C, H, W] uint8 tensors, ``action`` [T, frameskip * A]), for
    ``World.evaluate(dataset=...)`` and stable-worldmodel's training code. ``columns``: those to load
    (default: all)."""
    import torch
    from stable_worldmodel.data.dataset import Dataset

    data = TrajectoryDataset(path)
    keys = list(columns) if columns is not None else list(data.columns)
    unknown = sorted(set(keys) - set(data.columns))
    if unknown:
        raise KeyError(f"swm_dataset: columns must be a subset of {data.columns}, got unknown {unknown}")

    class JepaTrajectories(Dataset):
        """A ``jepa-trajectories`` folder read through its memory maps."""

        def __init__(self):
            self.data = data
            super().__init__(data.lengths, data.offsets, frameskip, num_steps, None)

        @property
        def column_names(self) -> list[str]:
            return keys

        def _load_slice(self, ep_idx: int, start: int, end: int) -> dict:
            rows = self.data.rows(int(ep_idx), int(start), int(end), keys)
            steps = {}
            for col, arr in rows.items():
                arr = np.array(arr if col == ACTIONS else arr[::self.frameskip])
                t = torch.from_numpy(arr)
                steps[col] = t.permute(0, 3, 1, 2) if arr.ndim == 4 and arr.shape[-1] in (1, 3) else t
            return steps

        def get_col_data(self, col: str) -> np.ndarray:
            return self.data.column(col)

        def get_row_data(self, row_idx) -> dict:
            idx = np.atleast_1d(np.asarray(row_idx, dtype=np.int64))
            ep = np.searchsorted(self.data.offsets, idx, side="right") - 1
            out = {c: np.stack([self.data.rows(int(e), int(r - self.data.offsets[e]), int(r - self.data.offsets[e]) + 1,
                                               [c])[c][0] for e, r in zip(ep, idx)]) for c in keys}
            return out if np.ndim(row_idx) else {c: v[0] for c, v in out.items()}

        def get_dim(self, col: str) -> int:
            return int(np.prod(self.data.manifest["columns"][col]["shape"]))

    return JepaTrajectories()


def export(path, out, format: str = "lance") -> Path:
    """Write the dataset at ``path`` to ``out`` in one of stable-worldmodel's formats (``"lance"``, its
    default; ``"folder"``: npz columns and a JPEG per frame; ``"hdf5"`` when h5py is installed), with
    its writer, episode by episode (the last row's NaN action kept, as its own collections leave it)."""
    from stable_worldmodel.data import get_format

    data = TrajectoryDataset(path)
    out = Path(out)
    with get_format(format).open_writer(out, mode="error") as writer:
        for e in range(data.num_episodes):
            writer.write_episode({c: list(np.array(v)) for c, v in data.episode(e).items()})
    return out
