"""Per-module patch records (kind, attributes changed, call counters) and the counts :func:`stats` reports."""
from __future__ import annotations

import collections
import dataclasses
from typing import Optional

import torch

RECORD = "_jepa_engine_patch"  # attribute on a patched module (a Patch)
MODEL_RECORD = "_jepa_engine_accelerated"  # attribute on the root model (EMA objects it patched)


class _Missing:
    """Marks an attribute the patch added (absent before); a picklable singleton."""

    def __reduce__(self):
        return "MISSING"

    def __repr__(self):
        return "<missing>"


MISSING = _Missing()


@dataclasses.dataclass
class Patch:
    kind: str
    compile_safe: bool
    changed_attrs: dict         # attribute -> value before the patch (MISSING: absent)
    fused: int = 0              # calls that ran the fused kernel (eager)
    fallbacks: dict = dataclasses.field(default_factory=dict)  # reason -> calls that fell back
    precision: Optional[str] = None  # accelerate(precision=): the forward's products; None: torch's setting


def count_fused(rec) -> None:
    if rec is not None and not torch.compiler.is_compiling():
        rec.fused += 1


def count_fallback(rec, reason: str) -> None:
    if rec is not None and not torch.compiler.is_compiling():
        rec.fallbacks[reason] = rec.fallbacks.get(reason, 0) + 1


@dataclasses.dataclass
class ModuleStats:
    kind: str
    fused: int = 0
    fallbacks: dict = dataclasses.field(default_factory=dict)  # reason -> calls

    @property
    def fallen_back(self) -> int:
        return sum(self.fallbacks.values())


@dataclasses.dataclass
class AccelerationStats:
    """Calls of every patched module since :func:`accelerate` (or the last ``stats(model, reset=True)``):
    how many ran the fused kernel and how many fell back to the original code, by reason. Eager calls
    only: a compiled or exported graph runs without Python, so it is not counted."""

    modules: dict = dataclasses.field(default_factory=dict)  # name -> ModuleStats

    @property
    def fused(self) -> int:
        return sum(m.fused for m in self.modules.values())

    @property
    def fallen_back(self) -> int:
        return sum(m.fallen_back for m in self.modules.values())

    def reasons(self) -> dict:
        out: dict = collections.Counter()
        for m in self.modules.values():
            out.update(m.fallbacks)
        return dict(out)

    def __str__(self) -> str:
        lines = [f"jepa_engine.stats: {self.fused} fused calls, {self.fallen_back} fallen back, "
                 f"{len(self.modules)} patched modules"]
        for name, m in self.modules.items():
            state = "fused" if m.fallen_back == 0 else ("falls back" if m.fused == 0 else "mixed")
            lines.append(f"  {name or '<root>'} ({m.kind}) {state}: {m.fused} fused, {m.fallen_back} fallen back")
            for reason, n in m.fallbacks.items():
                lines.append(f"      {n} x {reason}")
        return "\n".join(lines)
