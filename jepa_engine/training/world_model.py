"""Training the action-conditioned world model on trajectories of the built-in world: the loss terms of
one batch, the trainer, and saving / loading trained models (the config is
:class:`~jepa_engine.training.configs.WMTrainConfig`).

One step (``wm_losses``, then the optimizer) on a batch of B episodes of T steps (``TrajectoryStream``)::

    z    = model.encode(obs)                                   # [B, T+1, D]  every frame
    tgt  = z (SIGReg) | target_encoder(obs) (EMA, no grad)     # [B, T+1, D]
    teacher forcing: every window of `history` frames, one pass
         pred = model.predict(z[:, s:s+h], a[:, s:s+h])       -> tgt[:, s+1:s+h+1]
    multi-step: open-loop latent rollout from the first `history` frames
         roll = model.rollout(z[:, :h], a[:, h-1:h-1+R], past_actions=a[:, :h-1])  -> tgt[:, h:h+R]
    loss = mse(pred) + rollout_weight * mse(roll) [+ sigreg_weight * SIGReg(z)]
    backward; clip; AdamW (warm-up + cosine LR); EMA(target <- encoder) in "ema" mode

Checkpoints go through :mod:`jepa_engine.training.checkpoint` (tensors ``model/``, ``target/``,
``optim/``, ``rng/``, ``data/generator``; the resolved config, EMA schedule and stream position in the
JSON meta); ``train_world_model(..., resume=True)`` continues one exactly, :func:`load_world_model`
reads the model.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F

from jepa_engine.envs import TrajectoryBatches
from jepa_engine.models.world_model import WorldModel, WorldModelConfig, sigreg
from jepa_engine.schedules import warmup_cosine

from . import checkpoint as ckpt
from .configs import WMTrainConfig
from .ema import EMA
from .interrupt import DeferredInterrupt
from .run_folder import RunFolder, check_finite, restore_state, state_tensors
from .trajectory_data import training_stream

_METRIC_KEYS = ("step", "loss", "teacher", "rollout", "sigreg", "z_std")


# --------------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------------
def _windows(x: torch.Tensor, h: int) -> torch.Tensor:
    """Every window of h consecutive steps: x [B, T, F] -> [B * (T - h + 1), h, F]."""
    B, T, Fd = x.shape
    return x.unfold(1, h, 1).permute(0, 1, 3, 2).reshape(B * (T - h + 1), h, Fd)


def wm_losses(model: WorldModel, obs: torch.Tensor, actions: torch.Tensor, cfg: WMTrainConfig,
              target_encoder: Optional[torch.nn.Module] = None) -> dict[str, torch.Tensor]:
    """The loss terms of one batch: obs [B, T+1, C, H, W], actions [B, T, A]. Keys: loss, teacher,
    rollout, sigreg (0 in "ema" mode), z_std (the embeddings' mean per-dimension std, a collapse monitor)."""
    mc = model.cfg
    h, R = mc.history, cfg.rollout_steps
    B, T1 = obs.shape[:2]
    T = T1 - 1
    z = model.encode_frames(obs)                                      # [B, T+1, D]
    if mc.anti_collapse == "ema":
        if target_encoder is None:
            raise ValueError("wm_losses: anti_collapse 'ema' needs target_encoder")
        with torch.no_grad():
            tgt = target_encoder(obs.flatten(0, 1)).view(B, T1, -1)
    else:
        tgt = z
    hw = min(h, T)
    pred = model.predict(_windows(z[:, :T], hw), _windows(actions, hw))
    teacher = F.mse_loss(pred, _windows(tgt[:, 1:], hw))
    roll = model.rollout(z[:, :h], actions[:, h - 1:h - 1 + R], past_actions=actions[:, :h - 1])
    rollout = F.mse_loss(roll, tgt[:, h:h + R])
    loss = teacher + cfg.rollout_weight * rollout
    zf = z.flatten(0, 1)
    sig = torch.zeros((), device=z.device)
    if mc.anti_collapse == "sigreg":
        sig = sigreg(zf, mc.sigreg_projections, mc.sigreg_knots)
        loss = loss + mc.sigreg_weight * sig
    return {"loss": loss, "total": loss.detach(), "teacher": teacher.detach(), "rollout": rollout.detach(), "sigreg": sig.detach(),
            "z_std": zf.detach().std(0).mean()}


def lr_at(cfg: WMTrainConfig, step: int) -> float:
    """Linear warm-up to ``lr``, then cosine to ``min_lr`` at ``steps``."""
    return warmup_cosine(step, cfg.lr, cfg.min_lr, cfg.steps, cfg.warmup)


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------
def build_world_model(cfg: WMTrainConfig, device) -> tuple[WorldModel, Optional[EMA]]:
    torch.manual_seed(cfg.seed)
    model = WorldModel(cfg.model_config()).to(device)
    ema = None
    if model.cfg.anti_collapse == "ema":
        ema = EMA.from_model(model.encoder, momentum=model.cfg.ema_momentum, schedule="linear",
                             end_momentum=1.0, total_steps=cfg.steps)
    return model, ema


class WorldModelTrainer:
    """Trains ``cfg``, into ``out_dir`` when given (config.json, metrics.jsonl, checkpoints; None: nothing
    is written); :func:`train_world_model` is ``WorldModelTrainer(...).fit()``.

    ``resume=True`` restores the newest checkpoint in ``out_dir`` (see :func:`train_world_model`):
    ``self.step`` steps are done and ``self.resumed_from`` is that step. ``log`` receives every message
    (None: silence).
    """

    def __init__(self, cfg: WMTrainConfig, out_dir: Union[str, os.PathLike, None] = None, resume: bool = False,
                 log: Optional[Callable[[str], None]] = print, overwrite: bool = False):
        self.cfg, self.log = cfg, log
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.folder = RunFolder(self.out_dir, "train_world_model") if self.out_dir is not None else None
        if self.folder is not None:
            self.folder.claim(resume, overwrite)
        self.device = cfg.resolved_device()
        self.model, self.ema = build_world_model(cfg, self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.stream = iter(training_stream(cfg, self.device))   # cfg.data's windows, or the built-in world
        self.step = 0
        self.history: list[tuple] = []    # (step, loss, teacher, rollout, sigreg, z_std) of the logged steps
        self.last_checkpoint: Optional[Path] = None
        self.resumed_from: Optional[int] = None
        if resume:
            if self.folder is None:
                raise ValueError("train_world_model: resume=True needs out_dir (the run folder to resume)")
            _, self.resumed_from, message = self.folder.resume(cfg, self.load, "LR and EMA")
            if log:
                log(message)
        if self.folder is not None:
            rows = self.folder.start(cfg, self.step if resume else None)
            self.history = [tuple(r[k] for k in _METRIC_KEYS) for r in rows if all(k in r for k in _METRIC_KEYS)]

    # ---- checkpoints
    def save(self) -> Path:
        self.last_checkpoint = save_world_model(self.out_dir, self.step, self.model, self.cfg, self.optimizer,
                                                self.ema, self.stream)
        return self.last_checkpoint

    def load(self, path: Union[str, os.PathLike]) -> int:
        """Restore a :func:`save_world_model` checkpoint written during training; returns its step.

        The EMA keeps its own schedule (made from ``self.cfg``); only its position is restored."""
        tensors, meta = ckpt.load_checkpoint(path, device="cpu")
        if meta.get("kind") != "world_model":
            raise ckpt.CheckpointError(f"train_world_model: {path} must be a world-model checkpoint, got kind "
                                       f"{meta.get('kind')!r}")
        missing = [k for k in ("optim", "rng", "data") if k not in meta]
        if (self.ema is not None) != ("ema" in meta):
            missing.append("ema")
        if missing:
            raise ckpt.CheckpointError(f"train_world_model: {path} cannot be resumed: it lacks the training state "
                                       f"{missing} (saved without optimizer/stream, or with another anti_collapse)")
        saved, now = meta["data"].get("dataset"), self.stream.state_dict().get("dataset")
        if "dataset" in meta["data"] and saved != now:   # checkpoints before the fingerprint carry no key
            raise ckpt.CheckpointError(
                f"train_world_model: {path} cannot be resumed on this data: it was trained on "
                f"{_data_name(saved)}, but the run now reads {_data_name(now)} "
                f"({self.cfg.data or 'the built-in world'}); resume with the dataset it was trained on, or start a "
                f"fresh run folder")
        self.step = restore_state("train_world_model", Path(path), tensors, meta, self.model, self.ema,
                                  self.optimizer)
        self.stream.load_state_dict({"count": meta["data"]["count"], "generator": tensors["data/generator"]})
        self.last_checkpoint = Path(path)
        return self.step

    # ---- training
    def _one_step(self) -> dict[str, torch.Tensor]:
        cfg, opt = self.cfg, self.optimizer
        batch = next(self.stream)
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, self.step)
        terms = wm_losses(self.model, batch["obs"], batch["actions"], cfg, self.ema.module if self.ema else None)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        opt.step()
        if self.ema is not None:
            self.ema.step()
        return terms

    def _log(self, terms: dict[str, torch.Tensor], seconds: float) -> None:
        row = [self.step] + [float(terms[k]) for k in ("total", "teacher", "rollout", "sigreg", "z_std")]
        check_finite("train_world_model", self.step, row[1], self.cfg, self.last_checkpoint)
        self.history.append(tuple(row))
        if self.folder is not None:
            self.folder.log(dict(zip(_METRIC_KEYS, row)))
        if self.log:
            self.log(f"step {row[0]:5d}  loss {row[1]:.4f}  teacher {row[2]:.4f}  rollout {row[3]:.4f}  "
                     f"sigreg {row[4]:.3f}  z_std {row[5]:.3f}  ({seconds:.0f} s)")

    def fit(self) -> dict:
        """Train to ``cfg.steps`` (or the time budget); see :func:`train_world_model` for the summary."""
        cfg, log = self.cfg, self.log
        saved_at, t0 = (self.step if self.last_checkpoint else -1), time.perf_counter()
        deadline = t0 + 60 * cfg.max_minutes if cfg.max_minutes else math.inf
        self.model.train()
        with DeferredInterrupt() as stop:          # Ctrl-C: finish the step, checkpoint, raise
            while self.step < cfg.steps:
                if time.perf_counter() > deadline:
                    if log:
                        log(f"time budget of {cfg.max_minutes:g} min reached at step {self.step}")
                    break
                terms = self._one_step()
                self.step += 1
                logged = self.step == 1 or self.step % cfg.log_every == 0 or self.step == cfg.steps
                if logged:
                    self._log(terms, time.perf_counter() - t0)
                # After the log line: a Ctrl-C that arrives while it is written still checkpoints this step.
                if self.folder is not None and (self.step % cfg.checkpoint_every == 0 or stop.requested):
                    if not logged:             # never checkpoint a NaN (the logged steps are checked)
                        check_finite("train_world_model", self.step, float(terms["total"]), cfg, self.last_checkpoint)
                    saved_at = self.step
                    self.save()
                if stop.requested:
                    if log:
                        saved = (f"checkpoint {self.last_checkpoint} (resume with --resume)" if self.folder is not None
                                 else "no run folder: nothing saved")
                        log(f"interrupted at step {self.step}; {saved}")
                    raise KeyboardInterrupt
            if self.folder is not None and saved_at != self.step:
                self.save()
        self.model.eval()
        return {"steps": self.step, "seconds": time.perf_counter() - t0, "losses": self.history,
                "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None, "model": self.model,
                "resumed_from": self.resumed_from}


def train_world_model(cfg: WMTrainConfig, out_dir: Union[str, os.PathLike, None] = None,
                      log: Optional[Callable[[str], None]] = print, resume: bool = False,
                      overwrite: bool = False) -> dict:
    """Train ``cfg``; writes config.json, metrics.jsonl and checkpoints to ``out_dir`` (None: nothing).

    Ctrl-C (SIGINT) finishes the current step, writes a checkpoint (with ``out_dir``) and raises
    ``KeyboardInterrupt``; a second Ctrl-C stops at once. A NaN/inf loss raises
    :class:`~jepa_engine.training.run_folder.NonFiniteLossError` (a ``FloatingPointError``) and writes
    nothing.

    ``resume=True`` continues from the newest checkpoint in ``out_dir`` exactly: weights, EMA target and
    position, optimizer, RNG states and the trajectory stream's position, so a run interrupted at a
    checkpoint and resumed ends with the weights of an uninterrupted run (on CPU). ``cfg.steps`` may be
    raised on resume to train further: the LR and EMA schedules follow the new total. It raises
    :class:`~jepa_engine.training.checkpoint.CheckpointError` when ``out_dir`` holds no checkpoint, when
    its newest checkpoint is damaged (never skipped silently), or when that checkpoint is past ``cfg.steps``.
    A fresh run into an ``out_dir`` that already holds checkpoints raises it too, unless ``overwrite=True``,
    which deletes them first: the two runs' checkpoints would otherwise mix.

    Steps are counted as checkpoints name them: log lines and metrics rows ``step s`` describe the
    ``s``-th step (1-based; the first step, every ``log_every``-th and the last are logged), and
    ``ckpt-{s:08d}`` holds the state after it.

    Returns a summary: steps done (in total), seconds (this call), loss history
    ``[(step, loss, teacher, rollout, sigreg, z_std)]`` (metrics.jsonl's rows when resumed), the last
    checkpoint path, the step resumed from (``resumed_from``, None for a fresh run) and the model
    (``summary["model"]``, in eval mode).
    """
    return WorldModelTrainer(cfg, out_dir, resume=resume, log=log, overwrite=overwrite).fit()


# --------------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------------
def save_world_model(out_dir: Union[str, os.PathLike], step: int, model: WorldModel, cfg: WMTrainConfig,
                     optimizer: Optional[torch.optim.Optimizer] = None, ema: Optional[EMA] = None,
                     stream: Optional[TrajectoryBatches] = None) -> Path:
    """Checkpoint ``model`` (and, when given, the EMA target, the optimizer and, with ``stream``, the RNG
    states and the stream's position: everything :class:`WorldModelTrainer` needs to resume)."""
    tensors, state = state_tensors(model, ema, optimizer, rng=stream is not None)
    meta: dict[str, Any] = {"kind": "world_model", "config": cfg.to_dict(), "model_config": model.cfg.to_dict(),
                            **state}
    if stream is not None:
        position = stream.state_dict()
        tensors["data/generator"] = position["generator"]
        meta["data"] = {"count": position["count"], "next_step": step, "dataset": position.get("dataset")}
    return ckpt.save_checkpoint(out_dir, step, tensors, meta, keep_last=cfg.keep_last)


def _data_name(fingerprint: Optional[str]) -> str:
    return f"the dataset with manifest sha256 {fingerprint[:16]}..." if fingerprint else "the built-in world"


def load_world_model(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu"
                     ) -> tuple[WorldModel, WMTrainConfig]:
    """A trained world model (eval mode) and its training config from a checkpoint file or run folder."""
    tensors, meta = ckpt.load_checkpoint(path, device=device)
    if meta.get("kind") != "world_model":
        raise ckpt.CheckpointError(f"load_world_model: {path} must be a world-model checkpoint (meta kind "
                                   f"'world_model'), got {meta.get('kind')!r}")
    cfg = WMTrainConfig.from_dict(meta["config"])
    model = WorldModel(WorldModelConfig.from_dict(meta["model_config"])).to(device)
    ckpt.load_module_tensors(model, tensors, "model/")
    model.eval()
    return model, cfg
