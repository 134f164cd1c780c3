"""I-JEPA training on the built-in world: models, data and masks, one training step, and the trainer
(its config is :class:`~jepa_engine.training.configs.TrainConfig`).

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
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jepa_engine.envs import TrajectoryStream, WorldConfig
from jepa_engine.kernels import latent_loss
from jepa_engine.masks import apply_index
from jepa_engine.runtime import progress_mininterval
from jepa_engine.schedules import warmup_cosine

from . import checkpoint as ckpt
from .configs import TrainConfig
from .distributed import DataParallel
from .ema import EMA
from .interrupt import DeferredInterrupt
from .run_folder import NonFiniteLossError  # noqa: F401  (what fit() raises; callers catch it from here)
from .run_folder import RunFolder, check_finite, restore_state, state_tensors


# --------------------------------------------------------------------------------------------------
# Models, masks and data (the only places that know the models' and collator's constructors)
# --------------------------------------------------------------------------------------------------
def build_models(cfg: TrainConfig) -> tuple[nn.Module, nn.Module, Any]:
    """(context encoder, predictor, encoder config) for ``cfg``."""
    from jepa_engine.models import Predictor, VisionTransformer

    _, enc_cfg, pred_cfg, _ = cfg.nested_configs()
    return VisionTransformer(enc_cfg), Predictor(pred_cfg), enc_cfg


def build_masker(cfg: TrainConfig, enc_cfg: Any):
    """The multi-block mask collator on the encoder's patch grid."""
    from jepa_engine.masks import MaskConfig, MultiBlockMaskCollator

    g = enc_cfg.img_size // enc_cfg.patch_size
    return MultiBlockMaskCollator(MaskConfig(**{"grid": (g, g), **cfg.mask_overrides}))


def build_world(cfg: TrainConfig) -> WorldConfig:
    return cfg.nested_configs()[0]


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
    return warmup_cosine(step, cfg.lr, cfg.min_lr, cfg.steps, cfg.warmup)


def weight_decay_at(cfg: TrainConfig, step: int) -> float:
    """Cosine from ``weight_decay`` to ``weight_decay_end`` over the run (I-JEPA)."""
    return warmup_cosine(step, cfg.weight_decay, cfg.weight_decay_end, cfg.steps)


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
class Trainer:
    """Trains ``cfg`` into ``out_dir`` (config.json, metrics.jsonl, checkpoints, probe.json).

    ``resume=True`` continues from the newest checkpoint in ``out_dir`` exactly: weights, target,
    optimizer, EMA position, RNG states and data position. The LR, weight-decay and EMA schedules are
    functions of (step, ``cfg.steps``): a resume with a larger ``cfg.steps`` trains on with the schedules
    of the new total (a resume with the same total equals an uninterrupted run). It raises
    :class:`~jepa_engine.training.checkpoint.CheckpointError` when ``out_dir`` holds no checkpoint, when
    its newest checkpoint is damaged (never skipped silently), or when that checkpoint is past ``cfg.steps``.

    Steps are counted as checkpoints name them: ``self.step`` steps are done, metrics row ``"step": s``
    and log lines describe the ``s``-th step (1-based), and ``ckpt-{s:08d}`` holds the state after it.
    A fresh run (``resume=False``) starts ``metrics.jsonl`` anew; in a folder that already holds checkpoints
    it raises :class:`~jepa_engine.training.checkpoint.CheckpointError` unless ``overwrite=True``, which
    deletes them first.
    """

    def __init__(self, cfg: TrainConfig, out_dir: Union[str, os.PathLike], resume: bool = False,
                 progress: bool = True, overwrite: bool = False):
        self.cfg, self.out_dir, self.progress = cfg, Path(out_dir), progress
        self.folder = RunFolder(self.out_dir, "train")
        self.dp = DataParallel(cfg.resolved_device(), cfg.batch_size)
        self.device, self.rank, self.world_size, self.is_main = (self.dp.device, self.dp.rank, self.dp.world_size,
                                                                 self.dp.is_main)
        self.folder.claim(resume, overwrite, remove=self.is_main)

        torch.manual_seed(cfg.seed)
        encoder, predictor, self.encoder_config = build_models(cfg)
        self.world = build_world(cfg)
        self.masker = build_masker(cfg, self.encoder_config)
        self.jepa = JEPA(encoder, predictor).to(self.device)
        self.ema = EMA.from_model(self.jepa.encoder, momentum=cfg.ema_start, schedule=cfg.ema_schedule,
                                  end_momentum=cfg.ema_end, total_steps=cfg.steps)
        self.target = self.ema.module
        self.optimizer = make_optimizer(self.jepa, cfg)
        self.model: nn.Module = self.dp.wrap(self.jepa)
        self.step = 0
        self.history: list[dict] = []
        self.last_checkpoint: Optional[Path] = None
        self.resumed_from: Optional[Path] = None
        if resume:
            self.resumed_from, _, message = self.folder.resume(cfg, self.load, "LR, weight-decay and EMA")
            if self.is_main:
                print(f"train: {message}", flush=True)
        if self.is_main:
            self.folder.start(cfg, self.step if resume else None)

    # ---- checkpoints
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = state_tensors(self.jepa, self.ema, self.optimizer)
        return tensors, {"config": self.cfg.to_dict(), **meta, "data": {"seed": self.cfg.seed, "next_batch": self.step},
                         "world_size": self.world_size}

    def save(self) -> Optional[Path]:
        """Checkpoint the current step (rank 0 writes; the others wait)."""
        if self.is_main:
            tensors, meta = self.state()
            self.last_checkpoint = ckpt.save_checkpoint(self.out_dir, self.step, tensors, meta,
                                                        keep_last=self.cfg.keep_last)
        self.dp.barrier()
        return self.last_checkpoint

    def load(self, path: Union[str, os.PathLike]) -> int:
        """Restore a checkpoint (file or run folder); returns its step.

        The EMA schedule stays the one of ``self.cfg`` (only its position is restored), like the LR and
        weight-decay schedules, which are computed from ``self.cfg``.
        """
        tensors, meta = ckpt.load_checkpoint(path)
        self.step = restore_state("train", Path(path), tensors, meta, self.jepa, self.ema, self.optimizer)
        self.last_checkpoint = Path(path)
        return self.step

    # ---- training
    def _one_step(self) -> StepOutput:
        cfg = self.cfg
        batch = make_batch(cfg, self.world, self.step, self.device)
        masks = make_masks(cfg, self.masker, self.step, self.device)
        images, masks, kept = self.dp.shard(batch["images"], masks)
        out = train_step(self.model, self.target, self.ema, self.optimizer, images, masks, cfg=cfg, step=self.step,
                         global_kept=kept, world_size=self.world_size)
        self.dp.all_reduce(out.loss)
        return out

    def _check_losses(self, pending: list[tuple[int, torch.Tensor]]) -> list[float]:
        """Move the pending losses to the host (one sync) and stop at the first non-finite one."""
        if not pending:
            return []
        values = torch.stack([l for _, l in pending]).tolist()
        for (s, _), v in zip(pending, values):
            check_finite("train", s, v, self.cfg, self.last_checkpoint)
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
        self.folder.log(rec)
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
        with DeferredInterrupt() as stop:     # Ctrl-C: finish the step, checkpoint, raise
            bar = None
            if self.progress and self.is_main:
                from tqdm.auto import tqdm

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
        from jepa_engine.evaluation.probe import linear_probe

        enc = self.target if self.cfg.probe_encoder == "target" else self.jepa.encoder
        res = linear_probe(enc, self.world, n_train=self.cfg.probe_train, n_test=self.cfg.probe_test,
                           episode_len=8, seed=derived_seed(self.cfg.seed, 0, 2) % (2 ** 31), device=self.device)
        out = {**res.to_dict(), "step": self.step, "encoder": self.cfg.probe_encoder}
        ckpt.atomic_write_text(self.out_dir / "probe.json", json.dumps(out, indent=2) + "\n")
        return out

    def close(self) -> None:
        """Leave the process group this trainer joined (no-op in one process)."""
        self.dp.close()
