"""Step schedules of training: linear warm-up + cosine (learning rate, weight decay) and the EMA momentum.

Every schedule is a pure function of the step and the run's total, so a resumed run recomputes it
from its own config (a resume with a larger total follows the new total).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def warmup_cosine(step: int, start: float, end: float, total: int, warmup: int = 0) -> float:
    """Linear warm-up to ``start`` over the first ``warmup`` steps (``start * (step + 1) / warmup``), then
    a half cosine from ``start`` to ``end``, reached at step ``total`` and held after it.

    The learning rate of both trainers (``start`` = lr, ``end`` = min_lr) and of the imitation baseline,
    and I-JEPA's weight decay (no warm-up; ``end`` may exceed ``start``)."""
    if step < warmup:
        return start * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))


MOMENTUM_KINDS = ("constant", "linear", "cosine")
# Named momentum schedules: (kind, start momentum, end momentum).
MOMENTUM_PRESETS = {"ijepa": ("linear", 0.996, 1.0), "vjepa2": ("constant", 0.99925, 0.99925)}


@dataclass(frozen=True)
class MomentumSchedule:
    """The EMA momentum as a function of the step: ``start`` at step 0, ``end`` from ``total_steps`` on.

    - ``constant``: ``start`` always (V-JEPA 2: 0.99925);
    - ``linear``: ``start + (end - start) * s / total_steps`` (I-JEPA: 0.996 -> 1.0);
    - ``cosine``: ``end - (end - start) * (1 + cos(pi * s / total_steps)) / 2`` (BYOL).
    """

    kind: str = "constant"
    start: float = 0.996
    end: float = 1.0
    total_steps: int = 0

    def __post_init__(self):
        if self.kind not in MOMENTUM_KINDS:
            raise ValueError(f"MomentumSchedule: kind must be one of {MOMENTUM_KINDS}, got {self.kind!r}")
        for name in ("start", "end"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"MomentumSchedule: {name} momentum must be in [0, 1], got {v}")
        if self.kind != "constant" and self.total_steps <= 0:
            raise ValueError(f"MomentumSchedule: a {self.kind} schedule needs total_steps > 0, "
                             f"got {self.total_steps}")

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return self.start
        frac = min(max(step, 0), self.total_steps) / self.total_steps
        if self.kind == "linear":
            return self.start + (self.end - self.start) * frac
        return self.end - (self.end - self.start) * (1.0 + math.cos(math.pi * frac)) / 2.0
