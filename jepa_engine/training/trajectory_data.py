"""On-disk trajectory datasets: the format, its reader (numpy memory maps), and the training stream that
draws windows of it. No environment code: ``jepa_engine.integrations.swm_data`` collects datasets
from stable-worldmodel's environments and hands them to stable-worldmodel.

The format (``"jepa-trajectories"``, version 1), one folder::

    DIR/
      manifest.json        written last, atomically: the dataset is complete if and only if it exists
      collect.json         the collection's arguments, written first (a resumed collection must match them)
      shard-00000/         up to ``shard_episodes`` whole episodes, written under a temporary name and renamed
        ep_len.npy         int64 [E]              rows of each episode
        pixels.npy         uint8 [R, H, W, C]     frames (R = sum of ep_len), channels last
        action.npy         float32 [R, A]         row t: the action taken at frame t; NaN in an episode's last row
        <column>.npy       [R, ...]               every other numeric column the env reports at that frame
                                                  (state, proprio, goal_state, reward, terminated, ...)
      shard-00001/ ...

Rows are stable-worldmodel's convention (one row per frame, ``ep_len`` / ``ep_offset`` over the rows,
``pixels`` HWC uint8, ``action`` the action leaving that frame), so its ``World.evaluate(dataset=...)``
reads the data through a thin adapter, and its writers convert it to lance, folder or hdf5.
An episode of L rows holds L frames and L - 1 transitions.

The manifest: ``format``, ``version``, ``env_id``, ``policy``, ``seed``, ``frame_size`` [H, W],
``channels``, ``action_dim``, ``action_low`` / ``action_high`` (the env's bounds), ``episodes``, ``rows``,
``transitions``, ``steps`` (the cap of transitions per episode), ``episode_len`` (min / mean / max rows),
``columns`` ({name: {dtype, shape}} per row), ``shards`` ([{name, episodes, rows}]), ``shard_episodes``,
``bytes``, ``seconds`` and ``versions``.

Reading (:class:`TrajectoryDataset`) maps every column file (``np.load(mmap_mode="r")``): opening a
dataset of any size reads only its small index, and a training batch touches only its windows' frames.
:class:`DiskTrajectoryStream` is the disk-backed twin of :class:`~jepa_engine.envs.TrajectoryStream`
(same batch keys, same resumable position), so the world-model trainer streams either.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch

from jepa_engine.envs import TrajectoryStream

from .configs import WMTrainConfig

FORMAT = "jepa-trajectories"
VERSION = 1
MANIFEST = "manifest.json"
COLLECT = "collect.json"
FRAMES, ACTIONS = "pixels", "action"

PathLike = Union[str, os.PathLike]


class TrajectoryDatasetError(ValueError):
    """A dataset folder that is missing, incomplete, damaged, or does not fit the model it should train."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def read_manifest(path: PathLike) -> dict[str, Any]:
    """The manifest of the dataset at ``path``; :class:`TrajectoryDatasetError` when there is none (an
    empty folder, an interrupted collection) or it is not this format."""
    path = Path(path)
    if not path.is_dir():
        raise TrajectoryDatasetError(f"dataset {path} must be a folder written by `jepa-engine collect`, got "
                                     f"{'a file' if path.exists() else 'nothing there'}")
    file = path / MANIFEST
    if not file.is_file():
        partial = (path / COLLECT).is_file()
        hint = ("an interrupted collection: rerun `jepa-engine collect` with the same arguments to finish it"
                if partial else "an empty or foreign folder")
        raise TrajectoryDatasetError(f"dataset {path} has no {MANIFEST} ({hint})")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise TrajectoryDatasetError(f"dataset {path}: {MANIFEST} is not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise TrajectoryDatasetError(f"dataset {path}: {MANIFEST} format must be {FORMAT!r}, got {got!r}")
    if manifest.get("version") != VERSION:
        raise TrajectoryDatasetError(f"dataset {path}: format version must be {VERSION}, got "
                                     f"{manifest.get('version')!r}")
    return manifest


def _load_column(file: Path, rows: int, dtype: str, shape: list) -> np.ndarray:
    """``file`` memory-mapped, checked against the manifest: [rows, *shape] of ``dtype``."""
    if not file.is_file():
        raise TrajectoryDatasetError(f"dataset file {file} is missing")
    try:
        arr = np.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise TrajectoryDatasetError(f"dataset file {file} is damaged or truncated ({e}); expected "
                                     f"[{rows}, {', '.join(map(str, shape))}] {dtype}, "
                                     f"{file.stat().st_size} bytes on disk") from e
    expected = (rows, *shape)
    if tuple(arr.shape) != expected or str(arr.dtype) != dtype:
        raise TrajectoryDatasetError(f"dataset file {file} must hold {list(expected)} {dtype}, got "
                                     f"{list(arr.shape)} {arr.dtype}")
    return arr


class TrajectoryDataset:
    """A complete dataset folder (see the module docstring), every column memory-mapped.

    ``lengths`` [E] (rows per episode) and ``offsets`` [E] (its first row over all shards) index the
    episodes; ``episode(i)`` and ``rows(i, start, end)`` return dicts of column arrays (views of the
    memory maps: copy what you keep); ``window_starts(length, block)`` lists every window of ``length``
    model steps of ``block`` env steps each.

    Raises :class:`TrajectoryDatasetError` for an incomplete, empty or damaged dataset (a missing or
    truncated file, a shape that disagrees with the manifest), naming the file, expected and actual.
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self.manifest = m = read_manifest(self.path)
        columns = m.get("columns") or {}
        for need in (FRAMES, ACTIONS):
            if need not in columns:
                raise TrajectoryDatasetError(f"dataset {self.path}: columns must include {need!r}, got "
                                             f"{sorted(columns)}")
        if not m.get("shards") or not m.get("episodes"):
            raise TrajectoryDatasetError(f"dataset {self.path} is empty: episodes must be >= 1, got "
                                         f"{m.get('episodes')!r}")
        self.columns: list[str] = sorted(columns)
        self._shards: list[dict[str, np.ndarray]] = []
        lengths, shard_of, local_offsets = [], [], []
        for k, shard in enumerate(m["shards"]):
            folder = self.path / shard["name"]
            ep_len = _load_column(folder / "ep_len.npy", shard["episodes"], "int64", [])
            if int(ep_len.sum()) != shard["rows"] or (len(ep_len) and int(ep_len.min()) < 1):
                raise TrajectoryDatasetError(f"dataset {folder}/ep_len.npy must sum to {shard['rows']} rows with "
                                             f"every episode >= 1 row, got sum {int(ep_len.sum())}")
            arrays = {c: _load_column(folder / f"{c}.npy", shard["rows"], spec["dtype"], spec["shape"])
                      for c, spec in columns.items()}
            self._shards.append(arrays)
            lengths.append(np.asarray(ep_len, dtype=np.int64))
            shard_of.append(np.full(len(ep_len), k, dtype=np.int64))
            local_offsets.append(np.concatenate([[0], np.cumsum(ep_len)[:-1]]).astype(np.int64))
        self.lengths = np.concatenate(lengths)
        if len(self.lengths) != m["episodes"]:
            raise TrajectoryDatasetError(f"dataset {self.path}: shards must hold {m['episodes']} episodes "
                                         f"(manifest), got {len(self.lengths)}")
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        self._shard_of = np.concatenate(shard_of)
        self._local = np.concatenate(local_offsets)

    @property
    def fingerprint(self) -> str:
        """What identifies this dataset's contents: the sha256 of its manifest, which is written last and
        names every shard with its rows (a re-collected dataset at the same path has another)."""
        if not hasattr(self, "_fingerprint"):
            self._fingerprint = hashlib.sha256((self.path / MANIFEST).read_bytes()).hexdigest()
        return self._fingerprint

    # ---- what the manifest says
    @property
    def num_episodes(self) -> int:
        return int(len(self.lengths))

    @property
    def num_rows(self) -> int:
        return int(self.lengths.sum())

    @property
    def frame_size(self) -> tuple[int, int]:
        return tuple(self.manifest["frame_size"])

    @property
    def channels(self) -> int:
        return int(self.manifest["channels"])

    @property
    def action_dim(self) -> int:
        return int(self.manifest["action_dim"])

    @property
    def env_id(self) -> str:
        return self.manifest["env_id"]

    def __len__(self) -> int:
        return self.num_episodes

    def __repr__(self) -> str:
        return (f"TrajectoryDataset({str(self.path)!r}: {self.env_id}, {self.num_episodes} episodes, "
                f"{self.num_rows} frames {self.frame_size[0]}x{self.frame_size[1]}x{self.channels}, "
                f"action_dim {self.action_dim})")

    # ---- reading
    def _check_episode(self, episode: int) -> int:
        if not (0 <= int(episode) < self.num_episodes):
            raise IndexError(f"TrajectoryDataset: episode must be in [0, {self.num_episodes}), got {episode}")
        return int(episode)

    def rows(self, episode: int, start: int = 0, end: Optional[int] = None,
             columns: Optional[list[str]] = None) -> dict[str, np.ndarray]:
        """Rows ``start:end`` of ``episode`` (``end`` None: to its last row) for ``columns`` (None: all)."""
        e = self._check_episode(episode)
        L = int(self.lengths[e])
        end = L if end is None else end
        if not (0 <= start <= end <= L):
            raise IndexError(f"TrajectoryDataset.rows: need 0 <= start <= end <= {L} (episode {e}), got "
                             f"start {start}, end {end}")
        arrays, base = self._shards[self._shard_of[e]], int(self._local[e])
        return {c: arrays[c][base + start:base + end] for c in (columns or self.columns)}

    def episode(self, episode: int) -> dict[str, np.ndarray]:
        """Every column of ``episode``: ``pixels`` [L, H, W, C] uint8, ``action`` [L, A] (last row NaN), ..."""
        return self.rows(episode)

    def column(self, name: str) -> np.ndarray:
        """One column over the whole dataset, concatenated in episode order (a copy: meant for the small
        columns such as ``action`` and ``state``)."""
        if name not in self.columns:
            raise KeyError(f"TrajectoryDataset.column: name must be one of {self.columns}, got {name!r}")
        return np.concatenate([s[name] for s in self._shards])

    def window_starts(self, length: int, block: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(episode, start row) of every window of ``length`` model steps of ``block`` env steps: frames
        ``start, start + block, ..., start + length * block`` and actions ``start .. start + length*block - 1``
        all inside one episode (its NaN last action never inside)."""
        span = length * block
        counts = np.maximum(self.lengths - span, 0)
        episodes = np.repeat(np.arange(self.num_episodes), counts)
        first = np.repeat(np.cumsum(counts) - counts, counts)
        return episodes, np.arange(int(counts.sum())) - first

    def windows(self, episodes: np.ndarray, starts: np.ndarray, length: int, block: int = 1
                ) -> tuple[np.ndarray, np.ndarray]:
        """Frames [B, length+1, H, W, C] uint8 and actions [B, length, block * A] float32 of the windows
        at (``episodes``, ``starts``) (see :meth:`window_starts`)."""
        span = length * block
        frames = np.empty((len(episodes), length + 1, *self.frame_size, self.channels), dtype=np.uint8)
        actions = np.empty((len(episodes), length, block * self.action_dim), dtype=np.float32)
        for i, (e, s) in enumerate(zip(episodes.tolist(), starts.tolist())):
            arrays, base = self._shards[self._shard_of[e]], int(self._local[e]) + s
            frames[i] = arrays[FRAMES][base:base + span + 1:block]
            actions[i] = np.asarray(arrays[ACTIONS][base:base + span], dtype=np.float32).reshape(length, -1)
        return frames, actions


def frames_to_obs(frames: Union[np.ndarray, torch.Tensor], device: Union[str, torch.device] = "cpu"
                  ) -> torch.Tensor:
    """uint8 frames [..., H, W, C] -> float32 [..., C, H, W] in [0, 1] (what the world model encodes)."""
    x = torch.as_tensor(np.asarray(frames)).to(device)
    return x.movedim(-1, -3).float().div_(255.0)


# --------------------------------------------------------------------------------------------------
# The training stream
# --------------------------------------------------------------------------------------------------
class DiskTrajectoryStream:
    """Batches of ``batch_size`` windows of ``episode_len`` model steps drawn uniformly (with replacement)
    from every window of a :class:`TrajectoryDataset`, ``action_block`` env steps per model step::

        obs     [B, T+1, C, H, W] float32 in [0, 1]   frames start, start + k, ..., start + T k
        actions [B, T, k A]       float32             the k env actions of each model step, concatenated

    ``iter(stream)`` restarts from ``seed``; its ``state_dict()`` / ``load_state_dict()`` are those of
    :class:`~jepa_engine.envs.data.TrajectoryBatches` (batches drawn, the sampler's generator state).
    """

    def __init__(self, path: Union[PathLike, TrajectoryDataset], batch_size: int, episode_len: int,
                 action_block: int = 1, seed: int = 0, device: Union[str, torch.device] = "cpu"):
        for name, v in (("batch_size", batch_size), ("episode_len", episode_len), ("action_block", action_block)):
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"DiskTrajectoryStream: {name} must be an int >= 1, got {v!r}")
        self.dataset = path if isinstance(path, TrajectoryDataset) else TrajectoryDataset(path)
        self.batch_size, self.episode_len, self.action_block = batch_size, episode_len, action_block
        self.seed, self.device = seed, torch.device(device)
        self.episodes, self.starts = self.dataset.window_starts(episode_len, action_block)
        if len(self.episodes) == 0:
            longest = int(self.dataset.lengths.max()) - 1
            raise TrajectoryDatasetError(
                f"dataset {self.dataset.path} has no window of episode_len {episode_len} model steps x action_block "
                f"{action_block} = {episode_len * action_block} transitions: its longest episode has {longest} "
                f"(collect longer episodes with --steps, or lower episode_len / action_block)")

    def __iter__(self) -> "DiskTrajectoryBatches":
        return DiskTrajectoryBatches(self)

    def _batch(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        pick = torch.randint(len(self.episodes), (self.batch_size,), generator=generator).numpy()
        frames, actions = self.dataset.windows(self.episodes[pick], self.starts[pick], self.episode_len,
                                               self.action_block)
        return {"obs": frames_to_obs(frames, self.device),
                "actions": torch.from_numpy(actions).to(self.device)}


class DiskTrajectoryBatches(Iterator[dict]):
    """One endless pass over a :class:`DiskTrajectoryStream`, with a resumable position."""

    def __init__(self, stream: DiskTrajectoryStream):
        self.stream = stream
        self.generator = torch.Generator().manual_seed(stream.seed)
        self.count = 0

    def __iter__(self) -> "DiskTrajectoryBatches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self.stream._batch(self.generator)
        self.count += 1
        return batch

    def state_dict(self) -> dict:
        return {"count": self.count, "generator": self.generator.get_state(),
                "dataset": self.stream.dataset.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        for key in ("count", "generator"):
            if key not in state:
                raise ValueError(f"DiskTrajectoryBatches.load_state_dict: state must have key {key!r}, "
                                 f"got keys {sorted(state)}")
        self.generator.set_state(state["generator"].to(torch.uint8).cpu())
        self.count = int(state["count"])


# --------------------------------------------------------------------------------------------------
# Configs and datasets
# --------------------------------------------------------------------------------------------------
def config_for_dataset(cfg: WMTrainConfig, path: PathLike) -> WMTrainConfig:
    """``cfg`` set to train on the dataset at ``path``: ``data`` (absolute), and the model's ``img_size``,
    ``in_chans`` and ``action_dim`` (= the dataset's action_dim x ``cfg.action_block``) from its manifest.

    A value the config sets itself in ``model_overrides`` must agree with the dataset:
    :class:`TrajectoryDatasetError` names the field, the expected and the actual value."""
    m = read_manifest(path)
    H, W = m["frame_size"]
    if H != W:
        raise TrajectoryDatasetError(f"dataset {path}: frame_size must be square for the world model, got {H}x{W}")
    need = {"img_size": H, "in_chans": int(m["channels"]), "action_dim": int(m["action_dim"]) * cfg.action_block}
    why = {"img_size": "the dataset's frame size", "in_chans": "the dataset's channels",
           "action_dim": f"the dataset's action_dim {m['action_dim']} x action_block {cfg.action_block}"}
    given = cfg.model_overrides
    wrong = [k for k in need if k in given and given[k] != need[k]]
    if wrong:
        k = wrong[0]
        raise TrajectoryDatasetError(f"model_overrides.{k} must be {need[k]} ({why[k]}, dataset {path}), got "
                                     f"{given[k]}")
    return WMTrainConfig.from_dict({**cfg.to_dict(), "data": str(Path(path).resolve()),
                                    "model_overrides": {**given, **need}})


def check_model_fits(cfg: WMTrainConfig, dataset: TrajectoryDataset) -> None:
    """The model of ``cfg`` reads ``dataset``'s frames and actions, or :class:`TrajectoryDatasetError`."""
    mc = cfg.model_config()
    need = {"img_size": dataset.frame_size[0], "in_chans": dataset.channels,
            "action_dim": dataset.action_dim * cfg.action_block}
    for k, v in need.items():
        if getattr(mc, k) != v:
            extra = f" = action_dim {dataset.action_dim} x action_block {cfg.action_block}" if k == "action_dim" else ""
            raise TrajectoryDatasetError(f"the world model's {k} must be {v}{extra} (dataset {dataset.path}), got "
                                         f"{getattr(mc, k)}")


def preset_for_env(env_id: str, cuda: bool | None = None) -> str:
    """The :data:`~jepa_engine.training.configs.WM_TRAIN_PRESETS` name for data of ``env_id``: its
    benchmark's GPU preset where CUDA is present (``cuda`` None: look), its CPU preset otherwise, "demo"
    for an env without a benchmark preset."""
    from .configs import BENCHMARK_PRESETS

    for bench in BENCHMARK_PRESETS.values():
        if bench.env_id == env_id:
            if cuda is None:
                cuda = torch.cuda.is_available()
            return bench.train_gpu if cuda else bench.train_cpu
    return "demo"


def training_stream(cfg: WMTrainConfig, device: Union[str, torch.device]):
    """The trainer's batches: the dataset ``cfg.data`` when set, else the built-in world's stream."""
    T = cfg.resolved_episode_len()
    if cfg.data:
        dataset = TrajectoryDataset(cfg.data)
        check_model_fits(cfg, dataset)
        return DiskTrajectoryStream(dataset, cfg.batch_size, T, cfg.action_block, seed=cfg.seed, device=device)
    return TrajectoryStream(cfg.world_config(), cfg.batch_size, T, policy=cfg.policy, seed=cfg.seed, device=device)


def dataset_bytes(path: PathLike) -> int:
    """Bytes on disk under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def summary_line(m: dict[str, Any]) -> str:
    """One line describing a manifest."""
    el = m["episode_len"]
    return (f"{m['env_id']} ({m['policy']}, seed {m['seed']}): {m['episodes']} episodes, {m['transitions']} "
            f"transitions, episode length {el['min']}..{el['max']} (mean {el['mean']:.1f}) frames, "
            f"{m['frame_size'][0]}x{m['frame_size'][1]}x{m['channels']}, action_dim {m['action_dim']}, "
            f"{m['bytes'] / 2**20:.1f} MiB in {len(m['shards'])} shard(s)")


__all__ = ["FORMAT", "VERSION", "TrajectoryDatasetError", "TrajectoryDataset", "DiskTrajectoryStream",
           "DiskTrajectoryBatches", "read_manifest", "frames_to_obs", "config_for_dataset", "check_model_fits",
           "training_stream", "preset_for_env", "dataset_bytes", "summary_line", "shard_name"]
