"""The target encoder of a JEPA: an exponential moving average of the online (context) encoder.

Every training step, after the optimiser::

    target = m * target + (1 - m) * online        (every parameter; buffers are copied)

with the momentum ``m`` from a :class:`~jepa_engine.schedules.MomentumSchedule`: constant (V-JEPA 2
uses 0.99925), linear (I-JEPA: 0.996 -> 1.0 over the run) or cosine (BYOL-style, same ends). The update is
:func:`jepa_engine.kernels.ema_update_`: one kernel launch for the whole parameter list on CUDA, the
foreach fallback on CPU.

Distributed training: the EMA touches only the tensors this process holds, so it works unchanged on
DDP replicas (every rank applies the same update to its own copy, and the copies stay equal) and on
FSDP local shards (each rank averages its own shard of the target against its own shard of the online
model; pass the modules, or lists of the local shard tensors; DTensor parameters are reduced to their
local tensors). No collective is issued.

Usage::

    target = EMA.from_model(encoder, momentum=0.996, schedule="linear", total_steps=steps)
    for batch in loader:
        ...; optimizer.step()
        target.step()                 # target.module is the frozen target encoder
"""
from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Optional, Union

import torch
from torch import nn

from jepa_engine.schedules import MOMENTUM_KINDS, MOMENTUM_PRESETS, MomentumSchedule


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds (a DTensor's local shard; anything else as is)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


# Wrappers that hold the model (same tensors) under a prefix: torch.compile, (Distributed)DataParallel.
_WRAPPERS = {"OptimizedModule": "_orig_mod", "DistributedDataParallel": "module", "DataParallel": "module"}


def _unwrap(m):
    """The model inside wrappers, so a compiled or DDP online model pairs with a plain target."""
    while isinstance(m, nn.Module) and type(m).__name__ in _WRAPPERS:
        m = getattr(m, _WRAPPERS[type(m).__name__])
    return m


def _split(online, target):
    """(target params, online params, target buffers, online buffers) as aligned lists."""
    online, target = _unwrap(online), _unwrap(target)
    if isinstance(online, nn.Module) != isinstance(target, nn.Module):
        raise TypeError(f"EMA: online and target must both be nn.Modules or both lists of tensors, got "
                        f"{type(online).__name__} and {type(target).__name__}")
    if not isinstance(online, nn.Module):
        return [_local(t) for t in target], [_local(o) for o in online], [], []
    tp, op = dict(target.named_parameters()), dict(online.named_parameters())
    tb, ob = dict(target.named_buffers()), dict(online.named_buffers())
    for kind, t, o in (("parameters", tp, op), ("buffers", tb, ob)):
        if list(t) != list(o):
            missing = sorted(set(o) ^ set(t))[:4]
            raise ValueError(f"EMA: target {kind} must match the online {kind} by name, "
                             f"got {len(t)} and {len(o)} (differing: {missing})")
    names = list(op)
    bnames = list(ob)
    for n in names:
        if tp[n].requires_grad:
            raise ValueError(f"EMA: target parameter {n!r} must not require grad (make the target with "
                             f"EMA.from_model or call target.requires_grad_(False)), got requires_grad=True")
    return ([_local(tp[n].data) for n in names], [_local(op[n].data) for n in names],
            [_local(tb[n]) for n in bnames], [_local(ob[n]) for n in bnames])


class EMA:
    """Exponential moving average of ``online`` kept in ``target`` (modules or lists of tensors).

    Args:
        online: the trained model (``nn.Module``) or a list of its tensors.
        target: the averaged copy, same structure (see :meth:`from_model`). Its parameters must not
            require grad.
        momentum: the momentum at step 0 (a float in [0, 1]).
        schedule: ``"constant"``, ``"linear"``, ``"cosine"``, a :class:`MomentumSchedule`, or a
            preset name from :data:`~jepa_engine.schedules.MOMENTUM_PRESETS` (``"ijepa"``, ``"vjepa2"``).
        end_momentum: the momentum reached at ``total_steps`` (linear and cosine).
        total_steps: length of the schedule (the number of training steps).
        return_distance: make :meth:`step` return sum((target - online)^2) before the update.
    """

    def __init__(self, online, target, momentum: float = 0.996,
                 schedule: Union[str, MomentumSchedule] = "constant", *, end_momentum: float = 1.0,
                 total_steps: int = 0, return_distance: bool = False):
        if isinstance(schedule, MomentumSchedule):
            self.schedule = schedule
        elif schedule in MOMENTUM_PRESETS:
            kind, start, end = MOMENTUM_PRESETS[schedule]
            self.schedule = MomentumSchedule(kind, start, end, total_steps)
        elif isinstance(schedule, str):
            self.schedule = MomentumSchedule(schedule, float(momentum), float(end_momentum), int(total_steps))
        else:
            raise TypeError(f"EMA: schedule must be one of {MOMENTUM_KINDS + tuple(MOMENTUM_PRESETS)} or a "
                            f"MomentumSchedule, got {schedule!r}")
        self.online, self.target = online, target
        self.return_distance = return_distance
        self.steps = 0
        self._tensors = _split(online, target)
        targets = self._tensors[0]
        self._device = targets[0].device if targets else torch.device("cpu")
        self._momentum_dev = torch.empty(1, dtype=torch.float32, device=self._device)

    @classmethod
    def from_model(cls, online: nn.Module, **kwargs) -> "EMA":
        """Make the target as a frozen deep copy of ``online`` (no parameter requires grad)."""
        target = copy.deepcopy(online)
        target.requires_grad_(False)
        return cls(online, target, **kwargs)

    @property
    def module(self):
        """The target (the averaged model, or list of tensors)."""
        return self.target

    @property
    def momentum(self) -> float:
        """The momentum the next :meth:`step` applies."""
        return self.schedule(self.steps)

    @property
    def momentum_tensor(self) -> torch.Tensor:
        """The device scalar the kernel reads (holds the momentum of the last step)."""
        return self._momentum_dev

    @torch.no_grad()
    def step(self, momentum: Optional[Union[float, torch.Tensor]] = None) -> Optional[torch.Tensor]:
        """Move the target towards the online model; advance the schedule by one step.

        ``momentum`` overrides the schedule for this step (a float, or a device scalar tensor: the
        kernel reads it on device, so a CUDA graph capturing this call replays with whatever value the
        tensor holds at replay time). Returns the squared distance (fp32 device scalar) when the EMA
        was made with ``return_distance=True``.
        """
        from jepa_engine.kernels.ema import ema_update_

        if momentum is None:
            m = self.schedule(self.steps)
            if self._device.type == "cuda":
                self._momentum_dev.fill_(m)  # asynchronous: no host synchronisation
                # The kernel reads the device scalar; a plain same-dtype update without the distance
                # takes torch._foreach_lerp_ with the float instead, faster there on an H100
                # (jepa_engine.kernels.ema._foreach_wins).
                momentum = self._momentum_dev if self.return_distance else m
            else:
                momentum = m
        t, o, tb, ob = self._tensors
        out = ema_update_(t, o, momentum, target_buffers=tb, online_buffers=ob,
                          return_distance=self.return_distance)
        self.steps += 1
        return out

    def state_dict(self) -> dict:
        """The schedule and its position (the target's weights live in the target's own state_dict)."""
        return {"steps": self.steps, "schedule": asdict(self.schedule)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("steps", "schedule"):
            if key not in state:
                raise ValueError(f"EMA.load_state_dict: state must have key {key!r}, got keys {sorted(state)}")
        self.schedule = MomentumSchedule(**state["schedule"])
        self.steps = int(state["steps"])

    def __repr__(self) -> str:
        return f"EMA(steps={self.steps}, momentum={self.momentum:.6g}, schedule={self.schedule})"
