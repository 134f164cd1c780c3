"""What both trainers do with a run folder: resume from its newest checkpoint, write ``config.json``,
keep ``metrics.jsonl``, and put the training state (weights, EMA target, optimizer, RNG) into a
checkpoint and back; the error a non-finite loss raises.

Steps are counted as checkpoints name them: checkpoint ``s`` holds the state after ``s`` steps and the
metrics row ``"step": s`` describes the ``s``-th step (1-based).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from . import checkpoint as ckpt
from .ema import EMA


class NonFiniteLossError(RuntimeError, FloatingPointError):
    """The loss became NaN or inf: training stopped, no checkpoint was written after the last good one."""


def check_finite(who: str, step: int, loss: float, cfg, last_checkpoint: Optional[Path]) -> None:
    """Raise :class:`NonFiniteLossError` when the loss of step ``step`` is NaN or inf."""
    if not math.isfinite(loss):
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
        raise NonFiniteLossError(f"{who}: loss became {loss} at step {step}; stopping without saving ({where}). "
                                 f"Lower {type(cfg).__name__}.lr (now {cfg.lr}) or check the data.")


class RunFolder:
    """``out_dir`` of a run: ``config.json``, ``metrics.jsonl`` and the checkpoints of trainer ``who``."""

    def __init__(self, path: Union[str, os.PathLike], who: str):
        self.path, self.who = Path(path), who
        self.metrics = self.path / "metrics.jsonl"

    def resume(self, cfg, load: Callable[[Path], int], schedules: str) -> tuple[Path, int, str]:
        """Restore the newest checkpoint with ``load(path) -> step``; returns (its path, its step, the
        "resumed from ..." message naming a change of the total steps and the ``schedules`` that follow it).

        Raises :class:`~jepa_engine.training.checkpoint.CheckpointError` when the folder holds no
        checkpoint, when its newest one is damaged, or when that one is past ``cfg.steps``."""
        latest = ckpt.resume_checkpoint(self.path)
        step = load(latest)
        if step > cfg.steps:
            raise ckpt.CheckpointError(f"{self.who}: {latest} is at step {step}, past {type(cfg).__name__}.steps = "
                                       f"{cfg.steps}; resume with steps >= {step} (--steps)")
        saved_total = json.loads(latest.read_text())["meta"]["config"]["steps"]
        total = (f"; total steps {saved_total} -> {cfg.steps}: the {schedules} schedules follow the new total"
                 if saved_total != cfg.steps else "")
        return latest, step, f"resumed from {latest} (step {step}){total}"

    def claim(self, resume: bool, overwrite: bool, remove: bool = True) -> None:
        """Make the folder ready for a run, before anything is trained or written: a resumed run finds it as
        it is (``resume`` and ``overwrite`` together raise ``ValueError``); for a fresh run:

        A folder that holds checkpoints belongs to an earlier run: a fresh run there would replace its
        config.json and metrics.jsonl, prune its own checkpoints next to the old ones (or lose them behind a
        newer old step), and a later resume or load would pick whichever checkpoint is newest. So it raises
        :class:`~jepa_engine.training.checkpoint.CheckpointError` naming the newest checkpoint and the ways
        on, unless ``overwrite``: then the old checkpoints are deleted first (where ``remove``: the other
        ranks of a data-parallel run only check)."""
        if resume and overwrite:
            raise ValueError(f"{self.who}: resume=True continues the run in out_dir and overwrite=True deletes it; "
                             f"pass one of them")
        if resume:
            return
        found = ckpt.list_checkpoints(self.path)
        if not found:
            return
        step, newest = found[-1]
        if not overwrite:
            raise ckpt.CheckpointError(
                f"{self.who}: run folder {self.path} already holds {len(found)} checkpoint(s) of a run (newest "
                f"{newest}, step {step}); a fresh run there would mix with them. Continue that run with "
                f"resume=True (--resume), write to another folder, or delete them and start afresh with "
                f"overwrite=True (--overwrite)")
        if remove:
            ckpt.remove_checkpoints(self.path)

    def start(self, cfg, resumed_at: Optional[int]) -> list[dict]:
        """Write ``config.json``; start ``metrics.jsonl`` anew, or (resumed) keep its rows through step
        ``resumed_at`` and return them: rows an interrupted run logged after its checkpoint describe steps
        that are trained again."""
        self.path.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(self.path / "config.json", cfg.to_json() + "\n")
        if resumed_at is None:
            ckpt.atomic_write_text(self.metrics, "")
            return []
        return ckpt.trim_metrics(self.metrics, resumed_at)

    def log(self, row: dict) -> None:
        """Append one metrics row."""
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")


def state_tensors(model: nn.Module, ema: Optional[EMA] = None, optimizer: Optional[torch.optim.Optimizer] = None,
                  rng: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON meta) of a training state: ``model/`` weights and, when given, the EMA target
    (``target/``, meta ``ema``), the optimizer (``optim/``, meta ``optim``) and every RNG (``rng/``, meta
    ``rng``)."""
    tensors, meta = ckpt.module_tensors(model, "model/"), {}
    if ema is not None:
        tensors.update(ckpt.module_tensors(ema.module, "target/"))
        meta["ema"] = ema.state_dict()
    if optimizer is not None:
        ot, meta["optim"] = ckpt.optimizer_state(optimizer)
        tensors.update(ot)
    if rng:
        rt, meta["rng"] = ckpt.rng_state()
        tensors.update(rt)
    return tensors, meta


def restore_state(who: str, path: Path, tensors: dict[str, torch.Tensor], meta: dict, model: nn.Module,
                  ema: Optional[EMA], optimizer: torch.optim.Optimizer) -> int:
    """Load what :func:`state_tensors` saved (with optimizer and RNG) into ``model``, ``ema`` and
    ``optimizer`` and the process's RNGs; returns the checkpoint's step.

    ``ema`` keeps its own schedule (made from the resumed run's config, so a larger total is followed);
    only its position is restored, and it must equal the step."""
    step = int(meta["step"])
    ckpt.load_module_tensors(model, tensors, "model/")
    if ema is not None:
        ckpt.load_module_tensors(ema.module, tensors, "target/")
        schedule = ema.schedule
        ema.load_state_dict(meta["ema"])
        ema.schedule = schedule
        if ema.steps != step:
            raise ckpt.CheckpointError(f"{who}: {path}: EMA steps must equal the step {step}, got {ema.steps}")
    ckpt.load_optimizer_state(optimizer, tensors, meta["optim"])
    ckpt.load_rng_state(tensors, meta["rng"])
    return step
