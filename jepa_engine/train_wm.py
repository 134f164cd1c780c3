"""Training the action-conditioned world model on trajectories of the built-in world.

One step (``wm_step``) on a batch of B episodes of T steps (``TrajectoryStream``)::

    z    = model.encode(obs)                                   # [B, T+1, D]  every frame
    tgt  = z (SIGReg) | target_encoder(obs) (EMA, no grad)     # [B, T+1, D]
    teacher forcing: every window of `history` frames, one pass
         pred = model.predict(z[:, s:s+h], a[:, s:s+h])       -> tgt[:, s+1:s+h+1]
    multi-step: open-loop latent rollout from the first `history` frames
         roll = model.rollout(z[:, :h], a[:, h-1:h-1+R], past_actions=a[:, :h-1])  -> tgt[:, h:h+R]
    loss = mse(pred) + rollout_weight * mse(roll) [+ sigreg_weight * SIGReg(z)]
    backward; clip; AdamW (warm-up + cosine LR); EMA(target <- encoder) in "ema" mode

Checkpoints go through :mod:`jepa_engine.checkpoint` (tensors ``model/``, ``target/``, ``optim/``,
``rng/``, ``data/generator``; the resolved config, EMA schedule and stream position in the JSON meta);
``train_world_model(..., resume=True)`` continues one exactly, :func:`load_world_model` reads the model.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F

from jepa_engine import checkpoint as ckpt
from jepa_engine.config import ConfigIO
from jepa_engine.ema import EMA
from jepa_engine.envs import TrajectoryBatches, TrajectoryStream, WorldConfig
from jepa_engine.models.world_model import WorldModel, WorldModelConfig, sigreg


@dataclass
class WMTrainConfig(ConfigIO):
    model: str = "demo"                      # a WorldModelConfig preset ...
    model_overrides: dict = field(default_factory=dict)   # ... with field overrides
    world: str = "open"
    world_overrides: dict = field(default_factory=dict)
    policy: str = "mixed"                    # TrajectoryStream policy
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
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"WMTrainConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        for name in ("batch_size", "rollout_steps", "steps", "checkpoint_every", "keep_last", "log_every"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise bad(name, "an int >= 1")
        if not (isinstance(self.episode_len, int) and self.episode_len >= 0):
            raise bad("episode_len", "an int >= 0")
        for name in ("lr", "min_lr", "rollout_weight", "weight_decay", "grad_clip", "max_minutes"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                raise bad(name, "a finite float >= 0")
        if not self.lr > 0:
            raise bad("lr", "> 0")
        self.model_config()  # validates model / model_overrides
        need = self.model_config().history - 1 + self.rollout_steps
        if self.episode_len and self.episode_len < max(need, self.model_config().history):
            raise bad("episode_len", f">= max(history - 1 + rollout_steps, history) = "
                      f"{max(need, self.model_config().history)} (or 0)")

    # ---- derived configs
    def model_config(self) -> WorldModelConfig:
        return WorldModelConfig.from_name(self.model, **self.model_overrides)

    def world_config(self) -> WorldConfig:
        m = self.model_config()
        return WorldConfig.from_name(self.world, **{**self.world_overrides, "image_size": m.img_size,
                                                    "channels": m.in_chans})

    def resolved_episode_len(self) -> int:
        return self.episode_len or self.model_config().history - 1 + self.rollout_steps + 2

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    # ---- presets and serialisation
    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
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
}


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
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * frac))


# --------------------------------------------------------------------------------------------------
# Build, train, load
# --------------------------------------------------------------------------------------------------
def build_world_model(cfg: WMTrainConfig, device) -> tuple[WorldModel, Optional[EMA]]:
    torch.manual_seed(cfg.seed)
    model = WorldModel(cfg.model_config()).to(device)
    ema = None
    if model.cfg.anti_collapse == "ema":
        ema = EMA.from_model(model.encoder, momentum=model.cfg.ema_momentum, schedule="linear",
                             end_momentum=1.0, total_steps=cfg.steps)
    return model, ema


def train_world_model(cfg: WMTrainConfig, out_dir: Union[str, os.PathLike, None] = None,
                      log: Optional[Callable[[str], None]] = print, resume: bool = False) -> dict:
    """Train ``cfg``; writes config.json, metrics.jsonl and checkpoints to ``out_dir`` (None: nothing).

    Ctrl-C (SIGINT) finishes the current step, writes a checkpoint (with ``out_dir``) and raises
    ``KeyboardInterrupt``; a second Ctrl-C stops at once.

    ``resume=True`` continues from the newest checkpoint in ``out_dir`` exactly: weights, EMA target and
    position, optimizer, RNG states and the trajectory stream's position, so a run interrupted at a
    checkpoint and resumed ends with the weights of an uninterrupted run (on CPU). ``cfg.steps`` may be
    raised on resume to train further: the LR and EMA schedules follow the new total. It raises
    :class:`~jepa_engine.checkpoint.CheckpointError` when ``out_dir`` holds no checkpoint, when its newest
    checkpoint is damaged (never skipped silently), or when that checkpoint is past ``cfg.steps``.

    Steps are counted as checkpoints name them: log lines and metrics rows ``step s`` describe the
    ``s``-th step (1-based; the first step, every ``log_every``-th and the last are logged), and
    ``ckpt-{s:08d}`` holds the state after it.

    Returns a summary: steps done (in total), seconds (this call), loss history
    ``[(step, loss, teacher, rollout, sigreg, z_std)]`` (metrics.jsonl's rows when resumed), the last
    checkpoint path, the step resumed from (``resumed_from``, None for a fresh run) and the model
    (``summary["model"]``, in eval mode).
    """
    device = cfg.resolved_device()
    model, ema = build_world_model(cfg, device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    stream = iter(TrajectoryStream(cfg.world_config(), cfg.batch_size, cfg.resolved_episode_len(),
                                   policy=cfg.policy, seed=cfg.seed, device=device))
    out = Path(out_dir) if out_dir is not None else None
    start, last_ckpt, resumed_from = 0, None, None
    if resume:
        if out is None:
            raise ValueError("train_world_model: resume=True needs out_dir (the run folder to resume)")
        latest = ckpt.resume_checkpoint(out)
        start = load_training_state(latest, model, opt, ema, stream, device)
        if start > cfg.steps:
            raise ckpt.CheckpointError(f"train_world_model: {latest} is at step {start}, past WMTrainConfig.steps"
                                       f" = {cfg.steps}; resume with steps >= {start} (--steps)")
        last_ckpt, resumed_from = latest, start
        if log:
            saved_total = json.loads(Path(latest).read_text())["meta"]["config"]["steps"]
            total = (f"; total steps {saved_total} -> {cfg.steps}: the LR and EMA schedules follow the new total"
                     if saved_total != cfg.steps else "")
            log(f"resumed from {latest} (step {start}){total}")
    history: list[tuple] = []
    metrics = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
        # Rows an interrupted run logged after its checkpoint are dropped: they are trained again.
        if resume:
            rows = ckpt.trim_metrics(out / "metrics.jsonl", start)
            history = [tuple(r[k] for k in _METRIC_KEYS) for r in rows if all(k in r for k in _METRIC_KEYS)]
        else:
            ckpt.atomic_write_text(out / "metrics.jsonl", "")
        metrics = open(out / "metrics.jsonl", "a")
    saved_at, t0, done = (start if last_ckpt else -1), time.perf_counter(), start
    model.train()
    with ckpt.DeferredInterrupt() as stop:          # Ctrl-C: finish the step, checkpoint, raise
        try:
            for step in range(start, cfg.steps):
                if cfg.max_minutes and time.perf_counter() - t0 > 60 * cfg.max_minutes:
                    if log:
                        log(f"time budget of {cfg.max_minutes:g} min reached at step {done}")
                    break
                batch = next(stream)
                for g in opt.param_groups:
                    g["lr"] = lr_at(cfg, step)
                terms = wm_losses(model, batch["obs"], batch["actions"], cfg, ema.module if ema else None)
                opt.zero_grad(set_to_none=True)
                terms["loss"].backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                if ema is not None:
                    ema.step()
                done = step + 1
                if done == 1 or done % cfg.log_every == 0 or done == cfg.steps:
                    row = [done] + [float(terms[k]) for k in ("total", "teacher", "rollout", "sigreg", "z_std")]
                    if not math.isfinite(row[1]):
                        raise FloatingPointError(f"train_world_model: loss became {row[1]} at step {done}")
                    history.append(tuple(row))
                    if metrics is not None:
                        metrics.write(json.dumps(dict(zip(_METRIC_KEYS, row))) + "\n")
                        metrics.flush()
                    if log:
                        log(f"step {done:5d}  loss {row[1]:.4f}  teacher {row[2]:.4f}  rollout {row[3]:.4f}  "
                            f"sigreg {row[4]:.3f}  z_std {row[5]:.3f}  ({time.perf_counter() - t0:.0f} s)")
                if out is not None and (done % cfg.checkpoint_every == 0 or stop.requested):
                    last_ckpt, saved_at = save_world_model(out, done, model, cfg, opt, ema, stream), done
                if stop.requested:
                    if log:
                        saved = (f"checkpoint {last_ckpt} (resume with --resume)" if out is not None
                                 else "no run folder: nothing saved")
                        log(f"interrupted at step {done}; {saved}")
                    raise KeyboardInterrupt
            if out is not None and saved_at != done:
                last_ckpt = save_world_model(out, done, model, cfg, opt, ema, stream)
        finally:
            if metrics is not None:
                metrics.close()
    model.eval()
    return {"steps": done, "seconds": time.perf_counter() - t0, "losses": history,
            "checkpoint": str(last_ckpt) if last_ckpt else None, "model": model,
            "resumed_from": resumed_from}


_METRIC_KEYS = ("step", "loss", "teacher", "rollout", "sigreg", "z_std")


def save_world_model(out_dir: Union[str, os.PathLike], step: int, model: WorldModel, cfg: WMTrainConfig,
                     optimizer: Optional[torch.optim.Optimizer] = None, ema: Optional[EMA] = None,
                     stream: Optional[TrajectoryBatches] = None) -> Path:
    """Checkpoint ``model`` (and, when given, the EMA target, the optimizer and, with ``stream``, the RNG
    states and the stream's position: everything :func:`train_world_model` needs to resume)."""
    tensors = ckpt.module_tensors(model, "model/")
    meta: dict[str, Any] = {"kind": "world_model", "config": cfg.to_dict(), "model_config": model.cfg.to_dict()}
    if ema is not None:
        tensors.update(ckpt.module_tensors(ema.module, "target/"))
        meta["ema"] = ema.state_dict()
    if optimizer is not None:
        ot, om = ckpt.optimizer_state(optimizer)
        tensors.update(ot)
        meta["optim"] = om
    if stream is not None:
        rt, rm = ckpt.rng_state()
        tensors.update(rt)
        meta["rng"] = rm
        state = stream.state_dict()
        tensors["data/generator"] = state["generator"]
        meta["data"] = {"count": state["count"], "next_step": step}
    return ckpt.save_checkpoint(out_dir, step, tensors, meta, keep_last=cfg.keep_last)


def load_training_state(path: Union[str, os.PathLike], model: WorldModel, optimizer: torch.optim.Optimizer,
                        ema: Optional[EMA], stream: TrajectoryBatches, device="cpu") -> int:
    """Restore a :func:`save_world_model` checkpoint written during training; returns its step.

    ``ema`` keeps its own schedule (made from the resumed run's config); only its position is restored."""
    tensors, meta = ckpt.load_checkpoint(path, device="cpu")
    if meta.get("kind") != "world_model":
        raise ckpt.CheckpointError(f"train_world_model: {path} must be a world-model checkpoint, got kind "
                                   f"{meta.get('kind')!r}")
    missing = [k for k in ("optim", "rng", "data") if k not in meta]
    if (ema is not None) != ("ema" in meta):
        missing.append("ema")
    if missing:
        raise ckpt.CheckpointError(f"train_world_model: {path} cannot be resumed: it lacks the training state "
                                   f"{missing} (saved without optimizer/stream, or with another anti_collapse)")
    ckpt.load_module_tensors(model, {k: v.to(device) for k, v in tensors.items() if k.startswith("model/")},
                             "model/")
    if ema is not None:
        ckpt.load_module_tensors(ema.module, {k: v.to(device) for k, v in tensors.items()
                                              if k.startswith("target/")}, "target/")
        schedule = ema.schedule          # the resumed run's schedule (its total steps); only the position
        ema.load_state_dict(meta["ema"])
        ema.schedule = schedule
        if ema.steps != meta["step"]:
            raise ckpt.CheckpointError(f"train_world_model: {path}: EMA steps must equal the step {meta['step']}, "
                                       f"got {ema.steps}")
    ckpt.load_optimizer_state(optimizer, {k: v.to(device) for k, v in tensors.items() if k.startswith("optim/")},
                              meta["optim"])
    ckpt.load_rng_state(tensors, meta["rng"])
    stream.load_state_dict({"count": meta["data"]["count"], "generator": tensors["data/generator"]})
    return int(meta["step"])


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
