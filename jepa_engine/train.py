"""I-JEPA training on the built-in world: config, one training step, and the trainer.

One step (``train_step``), as in I-JEPA's ``src/train.py``::

    h   = layer_norm(target_encoder(images))              # [B, N, D]  full image, no grad
    tgt = apply_index(h, target_index)                    # [B, Kt, D]
    z   = context_encoder(images, context_index, valid)   # [B, Kc, D] visible patches only (key padding)
    p   = predictor(z, ctx_index, ctx_valid, tgt_index, tgt_valid)   # [B, Kt, D]
    loss = latent_loss(p, tgt, tgt_valid)                 # padded target slots do not count
    backward; clip; AdamW (cosine LR with warm-up, weight-decay schedule); EMA(target <- context)

The data are stateless: batch ``s`` (episodes of the world) and its masks are drawn from generators
seeded by ``(seed, s)``, so a resumed run sees exactly the batches a straight run sees, and every
DDP rank can draw the global batch and keep its own shard.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jepa_engine import checkpoint as ckpt
from jepa_engine.config import ConfigIO
from jepa_engine.ema import EMA, SCHEDULES
from jepa_engine.envs import TrajectoryStream, WorldConfig
from jepa_engine.kernels import latent_loss
from jepa_engine.masks import apply_index

LOSS_KINDS = ("smooth_l1", "l2")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf: training stopped, no checkpoint was written after the last good one."""


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig(ConfigIO):
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
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"TrainConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("batch_size", "steps", "checkpoint_every", "keep_last", "log_every", "episode_len",
                     "probe_train", "probe_test"):
            if not (is_int(getattr(self, name)) and getattr(self, name) >= 1):
                raise bad(name, "an int >= 1")
        if not (is_int(self.warmup) and self.warmup >= 0):
            raise bad("warmup", "an int >= 0")
        if self.batch_size % (self.episode_len + 1):
            raise bad("batch_size", f"a multiple of episode_len + 1 = {self.episode_len + 1}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise bad("lr", "a finite float > 0")
        if not (isinstance(self.min_lr, (int, float)) and 0 <= self.min_lr <= self.lr):
            raise bad("min_lr", f"in [0, lr = {self.lr}]")
        for name in ("weight_decay", "weight_decay_end", "grad_clip", "max_minutes", "loss_beta",
                     "collapse_std_min", "collapse_rank_min"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                raise bad(name, "a finite float >= 0")
        for name in ("ema_start", "ema_end"):
            if not (isinstance(getattr(self, name), (int, float)) and 0.0 <= getattr(self, name) <= 1.0):
                raise bad(name, "in [0, 1]")
        if self.ema_schedule not in SCHEDULES:
            raise bad("ema_schedule", f"one of {SCHEDULES}")
        if self.loss not in LOSS_KINDS:
            raise bad("loss", f"one of {LOSS_KINDS}")
        if self.probe_encoder not in ("target", "context"):
            raise bad("probe_encoder", "'target' or 'context'")
        if self.policy not in ("random", "goal", "mixed"):
            raise bad("policy", "'random', 'goal' or 'mixed'")
        if not isinstance(self.device, str) or not (self.device == "auto" or self.device.startswith(("cpu", "cuda"))):
            raise bad("device", "'auto', 'cpu' or 'cuda[:i]'")
        for name in ("encoder", "predictor", "world"):
            if not isinstance(getattr(self, name), str):
                raise bad(name, "a preset name (str)")
        for name in ("encoder_overrides", "predictor_overrides", "world_overrides", "mask_overrides"):
            if not isinstance(getattr(self, name), dict):
                raise bad(name, "a dict of field overrides")
        from jepa_engine.envs.config import PRESETS as WORLDS
        if self.world not in WORLDS:
            raise bad("world", f"one of {sorted(WORLDS)}")

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        """:data:`PRESETS`: "demo", "small", "base"."""
        return PRESETS

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


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
# Models, masks and data (the only places that know the models' and collator's constructors)
# --------------------------------------------------------------------------------------------------
def build_models(cfg: TrainConfig) -> tuple[nn.Module, nn.Module, Any]:
    """(context encoder, predictor, encoder config) for ``cfg``."""
    from jepa_engine.models import Predictor, PredictorConfig, ViTConfig, VisionTransformer

    world = build_world(cfg)
    enc_cfg = ViTConfig.from_name(cfg.encoder, **{"img_size": world.image_size, "in_chans": world.channels,
                                                  **cfg.encoder_overrides})
    pred_cfg = PredictorConfig.for_encoder(enc_cfg, cfg.predictor, **cfg.predictor_overrides)
    return VisionTransformer(enc_cfg), Predictor(pred_cfg), enc_cfg


def build_masker(cfg: TrainConfig, enc_cfg: Any):
    """The multi-block mask collator on the encoder's patch grid."""
    from jepa_engine.masks import MaskConfig, MultiBlockMaskCollator

    g = enc_cfg.img_size // enc_cfg.patch_size
    return MultiBlockMaskCollator(MaskConfig(**{"grid": (g, g), **cfg.mask_overrides}))


def build_world(cfg: TrainConfig) -> WorldConfig:
    return WorldConfig.from_name(cfg.world, **cfg.world_overrides)


def derived_seed(seed: int, step: int, stream: int) -> int:
    """A 63-bit seed for (run seed, step, stream): independent streams for data and masks."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def make_batch(cfg: TrainConfig, world: WorldConfig, step: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Global batch ``step``: images [B, C, H, W] and states [B, 4] (stateless in ``step``)."""
    envs = cfg.batch_size // (cfg.episode_len + 1)
    stream = TrajectoryStream(world, envs, cfg.episode_len, policy=cfg.policy, seed=derived_seed(cfg.seed, step, 0),
                              device=device, num_batches=1)
    b = next(iter(stream))
    return {"images": b["obs"].flatten(0, 1), "states": b["states"].flatten(0, 1)}


def make_masks(cfg: TrainConfig, masker, step: int, device: torch.device):
    g = torch.Generator().manual_seed(derived_seed(cfg.seed, step, 1))
    return masker.sample(cfg.batch_size, g).to(device)


def _map_masks(m, fn):
    """Apply ``fn`` to every tensor field of a MaskBatch (all are batch-leading)."""
    return dataclasses.replace(m, **{f.name: fn(getattr(m, f.name)) for f in dataclasses.fields(m)
                                     if isinstance(getattr(m, f.name), torch.Tensor)})


class JEPA(nn.Module):
    """The trained pair: context encoder + predictor (one module, so DDP wraps both)."""

    def __init__(self, encoder: nn.Module, predictor: nn.Module):
        super().__init__()
        self.encoder, self.predictor = encoder, predictor

    def forward(self, images, context_index, context_valid, target_index, target_valid):
        z = self.encoder(images, index=context_index, valid=context_valid)           # [B, Kc, D]
        return self.predictor(z, context_index, context_valid, target_index, target_valid)  # [B, Kt, D]


# --------------------------------------------------------------------------------------------------
# Schedules and the step
# --------------------------------------------------------------------------------------------------
def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to ``lr``, then cosine to ``min_lr`` at ``steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))


def weight_decay_at(cfg: TrainConfig, step: int) -> float:
    """Cosine from ``weight_decay`` to ``weight_decay_end`` over the run (I-JEPA)."""
    frac = min(1.0, step / max(1, cfg.steps))
    return cfg.weight_decay_end + (cfg.weight_decay - cfg.weight_decay_end) * 0.5 * (1.0 + math.cos(math.pi * frac))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; biases and 1-D parameters (norms) are not decayed."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "wd_scheduled": True},
              {"params": no_decay, "weight_decay": 0.0, "wd_scheduled": False}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), foreach=True)


@dataclass
class StepOutput:
    loss: torch.Tensor        # fp32 scalar: the global mean latent loss (device; no host sync)
    tokens: torch.Tensor      # [M, D] target-encoder tokens (up to 4096 of them, for the collapse monitors)


def train_step(model: nn.Module, target: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer,
               images: torch.Tensor, masks, *, cfg: TrainConfig, step: int,
               global_kept: Optional[torch.Tensor] = None, world_size: int = 1) -> StepOutput:
    """One I-JEPA step on ``images [B, C, H, W]`` with ``masks`` (a MaskBatch of the same B).

    ``model`` is :class:`JEPA` (or its DDP wrapper). Under DDP, ``global_kept`` is the number of valid
    target tokens in the whole global batch: each rank's loss is weighted so that DDP's gradient
    average equals the gradient of the global mean over tokens (the same as one process).
    """
    lr, wd = lr_at(cfg, step), weight_decay_at(cfg, step)
    for g in optimizer.param_groups:
        g["lr"] = lr
        if g.get("wd_scheduled"):
            g["weight_decay"] = wd
    optimizer.zero_grad(set_to_none=True)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if images.device.type == "cuda"
                else contextlib.nullcontext())
    with autocast:
        with torch.no_grad():
            h = target(images)                                    # [B, N, D]
            tokens = h.detach().flatten(0, 1)[:4096].float()      # [M, D]
            h = F.layer_norm(h.float(), (h.shape[-1],))
            tgt = apply_index(h, masks.target_index)              # [B, Kt, D]
        pred = model(images, masks.context_index, masks.context_valid, masks.target_index, masks.target_valid)
    loss = latent_loss(pred.float(), tgt, masks.target_valid, kind=cfg.loss, beta=cfg.loss_beta)
    if global_kept is not None:
        share = masks.target_valid.sum().to(torch.float32) / global_kept.to(torch.float32)
        (loss * (share * world_size)).backward()
        loss = loss * share   # this rank's part of the global mean (all-reduced by the caller)
    else:
        loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=True)
    optimizer.step()
    ema.step()
    return StepOutput(loss.detach(), tokens)


@torch.no_grad()
def collapse_stats(z: torch.Tensor) -> tuple[float, float]:
    """(per-dimension std of the L2-normalised embeddings times sqrt(D), effective rank) of z [B, D].

    The std is ~1 for embeddings spread over the sphere and 0 at collapse; the effective rank is
    exp(entropy) of the normalised singular values of the embeddings, uncentred as in RankMe (centring
    would make it scale-invariant, so a collapsed batch plus tiny noise would look full-rank); 1 means
    a single direction.
    """
    z = z.float()
    std = (F.normalize(z, dim=-1).std(dim=0).mean() * math.sqrt(z.shape[1])).item()
    s = torch.linalg.svdvals(z)
    p = s / s.sum().clamp_min(1e-12)
    rank = math.exp(-(p * p.clamp_min(1e-12).log()).sum().item())
    return std, rank


# --------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------
def _dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), ws, int(os.environ.get("LOCAL_RANK", "0"))


class Trainer:
    """Trains ``cfg`` into ``out_dir`` (config.json, metrics.jsonl, checkpoints, probe.json).

    ``resume=True`` continues from the newest checkpoint in ``out_dir`` exactly: weights, target,
    optimizer, EMA position, RNG states and data position. The LR, weight-decay and EMA schedules are
    functions of (step, ``cfg.steps``): a resume with a larger ``cfg.steps`` trains on with the schedules
    of the new total (a resume with the same total equals an uninterrupted run). It raises
    :class:`~jepa_engine.checkpoint.CheckpointError` when ``out_dir`` holds no checkpoint, when its
    newest checkpoint is damaged (never skipped silently), or when that checkpoint is past ``cfg.steps``.

    Steps are counted as checkpoints name them: ``self.step`` steps are done, metrics row ``"step": s``
    and log lines describe the ``s``-th step (1-based), and ``ckpt-{s:08d}`` holds the state after it.
    A fresh run (``resume=False``) starts ``metrics.jsonl`` anew.
    """

    def __init__(self, cfg: TrainConfig, out_dir: Union[str, os.PathLike], resume: bool = False,
                 progress: bool = True):
        self.cfg, self.out_dir, self.progress = cfg, Path(out_dir), progress
        self.rank, self.world_size, local_rank = _dist_env()
        self.device = cfg.resolved_device()
        self._own_group = False
        if self.world_size > 1:
            import torch.distributed as dist

            if self.device.type == "cuda":
                self.device = torch.device("cuda", local_rank)
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
                self._own_group = True
            if cfg.batch_size % self.world_size:
                raise ValueError(f"TrainConfig.batch_size must be divisible by the world size {self.world_size}, "
                                 f"got {cfg.batch_size}")
        self.is_main = self.rank == 0

        torch.manual_seed(cfg.seed)
        encoder, predictor, self.encoder_config = build_models(cfg)
        self.world = build_world(cfg)
        self.masker = build_masker(cfg, self.encoder_config)
        self.jepa = JEPA(encoder, predictor).to(self.device)
        self.ema = EMA.from_model(self.jepa.encoder, momentum=cfg.ema_start, schedule=cfg.ema_schedule,
                                  end_momentum=cfg.ema_end, total_steps=cfg.steps)
        self.target = self.ema.module
        self.optimizer = make_optimizer(self.jepa, cfg)
        self.model: nn.Module = self.jepa
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.jepa, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.step = 0
        self.history: list[dict] = []
        self.last_checkpoint: Optional[Path] = None
        self.resumed_from: Optional[Path] = None
        if resume:
            latest = ckpt.resume_checkpoint(self.out_dir)
            saved_total = self.load(latest)
            if self.step > cfg.steps:
                raise ckpt.CheckpointError(f"train: {latest} is at step {self.step}, past TrainConfig.steps = "
                                           f"{cfg.steps}; resume with steps >= {self.step} (--steps)")
            self.resumed_from = latest
            if self.is_main:
                total = (f"; total steps {saved_total} -> {cfg.steps}: the LR, weight-decay and EMA schedules "
                         f"follow the new total" if saved_total != cfg.steps else "")
                print(f"train: resumed from {latest} (step {self.step}){total}", flush=True)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            cfg.to_json(self.out_dir / "config.json")
            metrics = self.out_dir / "metrics.jsonl"
            if resume:     # rows logged after the checkpoint are trained again: drop them
                ckpt.trim_metrics(metrics, self.step)
            elif metrics.exists():
                ckpt.atomic_write_text(metrics, "")

    # ---- checkpoints
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        ot, om = ckpt.optimizer_state(self.optimizer)
        rt, rm = ckpt.rng_state()
        tensors = {**ckpt.module_tensors(self.jepa, "model/"), **ckpt.module_tensors(self.target, "target/"),
                   **ot, **rt}
        meta = {"config": self.cfg.to_dict(), "optim": om, "rng": rm, "ema": self.ema.state_dict(),
                "data": {"seed": self.cfg.seed, "next_batch": self.step}, "world_size": self.world_size}
        return tensors, meta

    def save(self) -> Optional[Path]:
        """Checkpoint the current step (rank 0 writes; the others wait)."""
        if self.is_main:
            tensors, meta = self.state()
            self.last_checkpoint = ckpt.save_checkpoint(self.out_dir, self.step, tensors, meta,
                                                        keep_last=self.cfg.keep_last)
        self._barrier()
        return self.last_checkpoint

    def load(self, path: Union[str, os.PathLike]) -> int:
        """Restore a checkpoint (file or run folder); returns the total steps of the run that wrote it.

        The EMA schedule stays the one of ``self.cfg`` (only its position is restored), like the LR and
        weight-decay schedules, which are computed from ``self.cfg``.
        """
        tensors, meta = ckpt.load_checkpoint(path)
        ckpt.load_module_tensors(self.jepa, tensors, "model/")
        ckpt.load_module_tensors(self.target, tensors, "target/")
        ckpt.load_optimizer_state(self.optimizer, tensors, meta["optim"])
        schedule = self.ema.schedule
        self.ema.load_state_dict(meta["ema"])
        self.ema.schedule = schedule
        ckpt.load_rng_state(tensors, meta["rng"])
        self.step = int(meta["data"]["next_batch"])
        if self.ema.steps != self.step:
            raise ckpt.CheckpointError(f"train: {path}: EMA steps must equal the step {self.step}, got "
                                       f"{self.ema.steps}")
        self.last_checkpoint = Path(path)
        return int(meta["config"]["steps"])

    def _barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    # ---- training
    def _one_step(self) -> StepOutput:
        cfg = self.cfg
        batch = make_batch(cfg, self.world, self.step, self.device)
        masks = make_masks(cfg, self.masker, self.step, self.device)
        images, kept = batch["images"], None
        if self.world_size > 1:
            per = cfg.batch_size // self.world_size
            lo, hi = self.rank * per, (self.rank + 1) * per
            kept = masks.target_valid.sum()
            images, masks = images[lo:hi], _map_masks(masks, lambda t: t[lo:hi])
        out = train_step(self.model, self.target, self.ema, self.optimizer, images, masks, cfg=cfg, step=self.step,
                         global_kept=kept, world_size=self.world_size)
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(out.loss)
        return out

    def _check_losses(self, pending: list[tuple[int, torch.Tensor]]) -> list[float]:
        """Move the pending losses to the host (one sync) and stop at the first non-finite one."""
        if not pending:
            return []
        values = torch.stack([l for _, l in pending]).tolist()
        for (s, _), v in zip(pending, values):
            if not math.isfinite(v):
                where = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                         else "no checkpoint was written")
                raise NonFiniteLossError(f"train: loss became {v} at step {s}; stopping without saving ({where}). "
                                         f"Lower TrainConfig.lr (now {self.cfg.lr}) or check the data.")
        return values

    def _log(self, values: list[float], out: StepOutput, seconds: float, images: int, bar) -> None:
        cfg = self.cfg
        std, rank = collapse_stats(out.tokens)
        rec = {"step": self.step, "loss": sum(values) / len(values), "loss_last": values[-1],
               "lr": lr_at(cfg, self.step - 1), "weight_decay": weight_decay_at(cfg, self.step - 1),
               "ema_momentum": self.ema.schedule(self.ema.steps - 1), "images_per_s": images / max(seconds, 1e-9),
               "emb_std": std, "eff_rank": rank, "time": time.time()}
        self.history.append(rec)
        if not self.is_main:
            return
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if bar is not None:
            bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['images_per_s']:.0f}", refresh=False)
        if std < cfg.collapse_std_min or rank < cfg.collapse_rank_min:
            warnings.warn(f"train: representation collapse suspected at step {self.step}: embedding std "
                          f"{std:.4f} (threshold {cfg.collapse_std_min}), effective rank {rank:.2f} "
                          f"(threshold {cfg.collapse_rank_min})", RuntimeWarning, stacklevel=2)

    def fit(self, max_steps: Optional[int] = None) -> dict:
        """Train to ``cfg.steps`` (or stop at step ``max_steps``), checkpoint, probe; returns a summary.

        Ctrl-C finishes the current step, writes a checkpoint and raises ``KeyboardInterrupt``. A NaN/inf
        loss raises :class:`NonFiniteLossError` and writes nothing.
        """
        cfg = self.cfg
        end = cfg.steps if max_steps is None else min(max_steps, cfg.steps)
        deadline = time.monotonic() + 60 * cfg.max_minutes if cfg.max_minutes > 0 else math.inf
        with ckpt.DeferredInterrupt() as stop:     # Ctrl-C: finish the step, checkpoint, raise
            bar = None
            if self.progress and self.is_main:
                from tqdm.auto import tqdm

                from jepa_engine.profiling.hardware import progress_mininterval

                bar = tqdm(total=end, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                           mininterval=progress_mininterval())
            self.jepa.train()
            pending: list[tuple[int, torch.Tensor]] = []
            t0, n_images, clean, stopped_by_time = time.perf_counter(), 0, True, False
            try:
                while self.step < end:
                    out = self._one_step()
                    self.step += 1
                    pending.append((self.step, out.loss))
                    n_images += cfg.batch_size
                    if bar is not None:
                        bar.update(1)
                    stop_time = time.monotonic() > deadline
                    must_save = (self.step % cfg.checkpoint_every == 0 or self.step == end or stop_time
                                 or stop.requested)
                    if self.step % cfg.log_every == 0 or must_save:
                        values = self._check_losses(pending)
                        self._log(values, out, time.perf_counter() - t0, n_images, bar)
                        pending, t0, n_images = [], time.perf_counter(), 0
                    if must_save:
                        self.save()
                    if stop.requested:
                        raise KeyboardInterrupt
                    if stop_time:
                        if self.is_main:
                            print(f"train: time budget of {cfg.max_minutes} min reached at step {self.step}",
                                  flush=True)
                        stopped_by_time = True
                        break
            except KeyboardInterrupt:
                clean = False
                if not stop.requested:
                    # No handler in this thread (fit() runs outside the main thread): the interrupt came
                    # straight from Python; save the steps counted as finished.
                    self._check_losses(pending)
                    self.save()
                if self.is_main:
                    print(f"\ntrain: interrupted at step {self.step}; checkpoint {self.last_checkpoint}", flush=True)
                raise
            except BaseException:
                clean = False
                raise
            finally:
                if bar is not None:
                    bar.close()
                if not clean:
                    self.close()
        summary = {"step": self.step, "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
                   "losses": [(r["step"], r["loss"]) for r in self.history]}
        if cfg.probe and (self.step >= cfg.steps or stopped_by_time):
            summary["probe"] = self.run_probe()
        return summary

    def run_probe(self) -> Optional[dict]:
        """Linear probe of the frozen encoder (rank 0); writes probe.json to the run folder."""
        if not self.is_main:
            return None
        from jepa_engine.probe import linear_probe

        enc = self.target if self.cfg.probe_encoder == "target" else self.jepa.encoder
        res = linear_probe(enc, self.world, n_train=self.cfg.probe_train, n_test=self.cfg.probe_test,
                           episode_len=8, seed=derived_seed(self.cfg.seed, 0, 2) % (2 ** 31), device=self.device)
        out = {**res.to_dict(), "step": self.step, "encoder": self.cfg.probe_encoder}
        (self.out_dir / "probe.json").write_text(json.dumps(out, indent=2) + "\n")
        return out

    def close(self) -> None:
        if self._own_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._own_group = False
