"""The two trainers' configs and their named presets: :class:`TrainConfig` (I-JEPA) and
:class:`WMTrainConfig` (the action-conditioned world model). A run folder keeps the resolved config as
``config.json``; a resume reads it back."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from jepa_engine.config import ConfigIO
from jepa_engine.envs import WorldConfig
from jepa_engine.envs.config import PRESETS as WORLDS
from jepa_engine.masks import MaskConfig
from jepa_engine.models import PredictorConfig, ViTConfig
from jepa_engine.models.world_model import WorldModelConfig
from jepa_engine.runtime import resolved_device
from jepa_engine.schedules import MOMENTUM_KINDS

LOSS_KINDS = ("smooth_l1", "l2")


class RunConfig(ConfigIO):
    """What both training configs share: the field checks' error messages and the device."""

    def _bad(self, name: str, expected: str) -> ValueError:
        return ValueError(f"{type(self).__name__}.{name} must be {expected}, got {getattr(self, name)!r}")

    def _check(self, ints: tuple = (), floats: tuple = ()) -> None:
        """The fields ``ints`` must be ints >= 1, the fields ``floats`` finite numbers >= 0."""
        for name in ints:
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise self._bad(name, "an int >= 1")
        for name in floats:
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                raise self._bad(name, "a finite float >= 0")

    def _check_device(self) -> None:
        if not isinstance(self.device, str) or not (self.device == "auto" or self.device.startswith(("cpu", "cuda"))):
            raise self._bad("device", "'auto', 'cpu' or 'cuda[:i]'")

    def resolved_device(self) -> torch.device:
        """``device`` resolved (:func:`jepa_engine.runtime.resolved_device`)."""
        return resolved_device(self.device)


# --------------------------------------------------------------------------------------------------
# I-JEPA
# --------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig(RunConfig):
    # model, world and masks (presets of their own configs, with field overrides)
    encoder: str = "tiny"
    encoder_overrides: dict = field(default_factory=dict)
    predictor: str = "tiny"
    predictor_overrides: dict = field(default_factory=dict)
    world: str = "open"
    world_overrides: dict = field(default_factory=dict)
    mask_overrides: dict = field(default_factory=dict)
    # data: each step renders batch_size // (episode_len + 1) episodes of episode_len steps
    episode_len: int = 3
    policy: str = "random"
    batch_size: int = 64             # global images per step (split across DDP ranks)
    # optimisation
    steps: int = 1000
    lr: float = 1e-3
    warmup: int = 100
    min_lr: float = 1e-5
    weight_decay: float = 0.04       # at step 0 ...
    weight_decay_end: float = 0.4    # ... cosine to this at the last step (I-JEPA)
    grad_clip: float = 1.0           # max global grad norm; 0 = off
    ema_schedule: str = "linear"     # I-JEPA: linear 0.996 -> 1.0
    ema_start: float = 0.996
    ema_end: float = 1.0
    loss: str = "smooth_l1"
    loss_beta: float = 1.0
    # run
    seed: int = 0
    device: str = "auto"             # "auto" (cuda if available), "cpu", "cuda", "cuda:1"
    checkpoint_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    max_minutes: float = 0.0         # wall-clock budget of fit(); 0 = none (the LR schedule still uses steps)
    # collapse monitors (on the target encoder's output tokens)
    collapse_std_min: float = 0.05
    collapse_rank_min: float = 1.5
    # linear probe at the end of training
    probe: bool = True
    probe_train: int = 2048
    probe_test: int = 1024
    probe_encoder: str = "target"    # "target" (EMA) or "context"

    def __post_init__(self) -> None:
        bad = self._bad
        self._check(ints=("batch_size", "steps", "checkpoint_every", "keep_last", "log_every", "episode_len",
                          "probe_train", "probe_test"))
        if not (isinstance(self.warmup, int) and self.warmup >= 0):
            raise bad("warmup", "an int >= 0")
        if self.batch_size % (self.episode_len + 1):
            raise bad("batch_size", f"a multiple of episode_len + 1 = {self.episode_len + 1}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise bad("lr", "a finite float > 0")
        if not (isinstance(self.min_lr, (int, float)) and 0 <= self.min_lr <= self.lr):
            raise bad("min_lr", f"in [0, lr = {self.lr}]")
        self._check(floats=("weight_decay", "weight_decay_end", "grad_clip", "max_minutes", "loss_beta",
                            "collapse_std_min", "collapse_rank_min"))
        for name in ("ema_start", "ema_end"):
            if not (isinstance(getattr(self, name), (int, float)) and 0.0 <= getattr(self, name) <= 1.0):
                raise bad(name, "in [0, 1]")
        if self.ema_schedule not in MOMENTUM_KINDS:
            raise bad("ema_schedule", f"one of {MOMENTUM_KINDS}")
        if self.loss not in LOSS_KINDS:
            raise bad("loss", f"one of {LOSS_KINDS}")
        if self.probe_encoder not in ("target", "context"):
            raise bad("probe_encoder", "'target' or 'context'")
        if self.policy not in ("random", "goal", "mixed"):
            raise bad("policy", "'random', 'goal' or 'mixed'")
        for name in ("encoder", "predictor", "world"):
            if not isinstance(getattr(self, name), str):
                raise bad(name, "a preset name (str)")
        for name in ("encoder_overrides", "predictor_overrides", "world_overrides", "mask_overrides"):
            if not isinstance(getattr(self, name), dict):
                raise bad(name, "a dict of field overrides")
        if self.world not in WORLDS:
            raise bad("world", f"one of {sorted(WORLDS)}")
        self._check_device()
        self.nested_configs()  # a bad nested field or value fails here, before anything is built

    def nested_configs(self) -> tuple[WorldConfig, ViTConfig, PredictorConfig, MaskConfig]:
        """The world, encoder, predictor and mask configs: each preset with its ``*_overrides``."""
        world = WorldConfig.from_name(self.world, **self.world_overrides)
        enc = ViTConfig.from_name(self.encoder, **{"img_size": world.image_size, "in_chans": world.channels,
                                                  **self.encoder_overrides})
        grid = enc.img_size // enc.patch_size
        return (world, enc, PredictorConfig.for_encoder(enc, self.predictor, **self.predictor_overrides),
                MaskConfig(**{"grid": (grid, grid), **self.mask_overrides}))

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        """:data:`PRESETS`: "demo", "small", "base"."""
        return PRESETS


PRESETS: dict[str, dict[str, Any]] = {
    # The CPU demo: a few minutes on 2 cores, linear-probe R^2(position) >= 0.9.
    "demo": dict(encoder="tiny", encoder_overrides=dict(embed_dim=96, depth=4, num_heads=3),
                 predictor_overrides=dict(predictor_dim=48, depth=2, num_heads=3),
                 batch_size=32, episode_len=3, steps=250, lr=1e-3, warmup=25, min_lr=1e-5,
                 checkpoint_every=125, keep_last=2, log_every=10, probe_train=1536, probe_test=512,
                 max_minutes=4.5, device="auto"),
    # One GPU: ViT-S/8 on 64x64 frames.
    "small": dict(encoder="small", predictor="small", batch_size=256, steps=20_000, lr=1e-3, warmup=1_000,
                  min_lr=1e-6, checkpoint_every=1_000, keep_last=3, log_every=50, probe_train=8192, probe_test=4096),
    "base": dict(encoder="base", predictor="base", batch_size=256, steps=50_000, lr=6e-4, warmup=2_500,
                 min_lr=1e-6, checkpoint_every=2_500, keep_last=3, log_every=100, probe_train=8192, probe_test=4096),
}


# --------------------------------------------------------------------------------------------------
# World model
# --------------------------------------------------------------------------------------------------
@dataclass
class WMTrainConfig(RunConfig):
    model: str = "demo"                      # a WorldModelConfig preset ...
    model_overrides: dict = field(default_factory=dict)   # ... with field overrides
    world: str = "open"
    world_overrides: dict = field(default_factory=dict)
    policy: str = "mixed"                    # TrajectoryStream policy
    data: str = ""                           # an on-disk trajectory dataset (``jepa-engine collect``); "" = the built-in world
    action_block: int = 1                    # env steps per model step (their actions concatenated); with ``data`` only
    batch_size: int = 32                     # episodes per step
    rollout_steps: int = 4                   # R: open-loop steps of the multi-step loss
    rollout_weight: float = 0.5
    episode_len: int = 0                     # T; 0 = history - 1 + rollout_steps + 2
    steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup: int = 50
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 250
    keep_last: int = 2
    log_every: int = 25
    max_minutes: float = 0.0                 # wall-clock budget; 0 = none

    def __post_init__(self) -> None:
        self._check(ints=("batch_size", "rollout_steps", "steps", "checkpoint_every", "keep_last", "log_every",
                          "action_block"))
        if not isinstance(self.data, str):
            raise self._bad("data", "a dataset folder (str), or \"\" for the built-in world")
        if not (isinstance(self.episode_len, int) and self.episode_len >= 0):
            raise self._bad("episode_len", "an int >= 0")
        self._check(floats=("lr", "min_lr", "rollout_weight", "weight_decay", "grad_clip", "max_minutes"))
        if not self.lr > 0:
            raise self._bad("lr", "> 0")
        self.model_config()  # validates model / model_overrides
        need = self.model_config().history - 1 + self.rollout_steps
        if self.episode_len and self.episode_len < max(need, self.model_config().history):
            raise self._bad("episode_len", f">= max(history - 1 + rollout_steps, history) = "
                                           f"{max(need, self.model_config().history)} (or 0)")
        self._check_device()

    # ---- derived configs
    def model_config(self) -> WorldModelConfig:
        return WorldModelConfig.from_name(self.model, **self.model_overrides)

    def world_config(self) -> WorldConfig:
        m = self.model_config()
        return WorldConfig.from_name(self.world, **{**self.world_overrides, "image_size": m.img_size,
                                                    "channels": m.in_chans})

    def resolved_episode_len(self) -> int:
        return self.episode_len or self.model_config().history - 1 + self.rollout_steps + 2

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        """:data:`WM_TRAIN_PRESETS`: "demo", "test", "lewm", and for collected datasets "tworoom", "pusht",
        "reacher" (CPU), "tworoom-lewm", "pusht-lewm", "reacher-lewm" (GPU), "data-test"."""
        return WM_TRAIN_PRESETS


WM_TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # 2 CPU cores, a few minutes. rollout_weight 1.0: the open-loop loss weighs as much as teacher forcing;
    # MPC success (CEM 64 x 5, H=5, summed cost, 16 episodes) was 5/16 at 0.5 after 600 steps, 11/16 at
    # 1.0 after 300.
    "demo": dict(model="demo", batch_size=32, steps=600, lr=2e-3, warmup=30, rollout_weight=1.0, max_minutes=5.0,
                 device="auto"),
    # Seconds: the tests' model.
    "test": dict(model="test", batch_size=32, steps=150, lr=3e-3, warmup=10, checkpoint_every=1000, log_every=50,
                 device="cpu"),
    # One GPU.
    "lewm": dict(model="lewm", batch_size=128, steps=20_000, lr=5e-4, warmup=1_000, checkpoint_every=2_000,
                 log_every=100),
    # Collected datasets (``train-wm --data``; frame size, channels and action_dim come from the dataset's
    # manifest, action_dim = the env's x action_block). LeWorldModel's protocol: 5 env steps per model step,
    # history 1 where one frame holds the state (TwoRoom, PushT), 3 where it misses velocities (Reacher).
    # "tworoom", "pusht", "reacher": 2 CPU cores, the 64x64 demo model; "-lewm": one GPU, the ~15M-parameter model.
    "tworoom": dict(model="demo", model_overrides=dict(history=1), action_block=5, batch_size=32, steps=3_000,
                    lr=2e-3, warmup=50, rollout_weight=1.0, checkpoint_every=500, log_every=50, max_minutes=20.0,
                    device="auto"),
    "pusht": dict(model="demo", model_overrides=dict(history=1), action_block=5, batch_size=32, steps=3_000,
                  lr=2e-3, warmup=50, rollout_weight=1.0, checkpoint_every=500, log_every=50, max_minutes=20.0,
                  device="auto"),
    "reacher": dict(model="demo", model_overrides=dict(history=3), action_block=5, batch_size=32, steps=3_000,
                    lr=2e-3, warmup=50, rollout_weight=1.0, checkpoint_every=500, log_every=50, max_minutes=20.0,
                    device="auto"),
    "tworoom-lewm": dict(model="lewm", model_overrides=dict(history=1), action_block=5, batch_size=128,
                         steps=10_000, lr=5e-4, warmup=500, rollout_weight=1.0, checkpoint_every=1_000,
                         log_every=100),
    "pusht-lewm": dict(model="lewm", model_overrides=dict(history=1), action_block=5, batch_size=128,
                       steps=30_000, lr=5e-4, warmup=1_000, rollout_weight=1.0, checkpoint_every=2_000,
                       log_every=100),
    "reacher-lewm": dict(model="lewm", model_overrides=dict(history=3), action_block=5, batch_size=128,
                         steps=20_000, lr=5e-4, warmup=1_000, rollout_weight=1.0, checkpoint_every=2_000,
                         log_every=100),
    # Seconds: the dataset tests' model (32x32 frames).
    "data-test": dict(model="test", model_overrides=dict(history=2), action_block=2, rollout_steps=2, batch_size=8,
                      steps=20, lr=3e-3, warmup=2, checkpoint_every=1000, log_every=5, device="cpu"),
}


@dataclass(frozen=True)
class BenchmarkPreset:
    """One benchmark environment end to end: collection (env id, policy, episodes of ``steps`` env steps at
    ``frame_size``), training (a :data:`WM_TRAIN_PRESETS` name for 2 CPU cores and one for a GPU; history and
    action block are theirs), planning (CEM ``samples`` x ``iterations``, ``elites``, ``horizon`` model steps,
    ``receding`` executed before replanning) and evaluation (start from a dataset frame, goal ``goal_offset``
    env steps later, ``eval_budget`` env steps to reach it)."""
    env_id: str
    policy: str
    episodes: int
    steps: int
    frame_size: int
    train_cpu: str
    train_gpu: str
    history: int
    action_block: int
    samples: int = 300
    iterations: int = 30
    elites: int = 30
    horizon: int = 5
    receding: int = 5
    goal_offset: int = 25
    eval_budget: int = 50


# LeWorldModel's planner budget (CEM 300 x 30, top 30, horizon 5, action block 5) everywhere; its collection
# policies (TwoRoom: the noisy expert; PushT: the weak policy; Reacher: random, the SAC expert needing a
# checkpoint) and its evaluation (goal 25 env steps ahead, 50 steps to reach it).
BENCHMARK_PRESETS: dict[str, BenchmarkPreset] = {
    "tworoom": BenchmarkPreset(env_id="swm/TwoRoom-v1", policy="expert", episodes=2_000, steps=100, frame_size=64,
                               train_cpu="tworoom", train_gpu="tworoom-lewm", history=1, action_block=5),
    "pusht": BenchmarkPreset(env_id="swm/PushT-v1", policy="weak", episodes=10_000, steps=100, frame_size=64,
                             train_cpu="pusht", train_gpu="pusht-lewm", history=1, action_block=5),
    "reacher": BenchmarkPreset(env_id="swm/ReacherDMControl-v0", policy="random", episodes=10_000, steps=100,
                               frame_size=64, train_cpu="reacher", train_gpu="reacher-lewm", history=3,
                               action_block=5),
}
