"""The comparison's configuration: ProfileConfig, planner budgets, quick-run defaults, the option parsers and checks."""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from jepa_engine.kernels.precision import PRECISIONS
from jepa_engine.runtime import resolved_device

PRESETS = ("tiny", "demo", "lewm")
# Public reference point for scale (not measured here): LLM decoding energy per output token.
LLM_REFERENCE = ("about 0.12-0.20 J per token for an 8B-parameter model on one H100 at batch 64 "
                 "(public LLM inference energy measurements)")
SWEEP_LABEL = "cost sweep: untrained, timing/energy only"
PLAN_REDUCE = "sum"                    # the planners' cost: L2 to the goal embedding summed over the horizon
CPU_MAX_DECODER_PARAMS = 60_000_000    # larger decoders are not run on the CPU (time, not memory)
CPU_MAX_SWEEP_FLOPS = 2e11             # per decision; larger sweep points are skipped on the CPU


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------
@dataclass
class PlannerBudget:
    """One planner setting: ``"cem:300x30"``, ``"mppi:100x10"``, ``"cem:64x5:cold"`` (no warm start)."""

    planner: str
    samples: int
    iterations: int
    warm_start: bool = True

    @property
    def name(self) -> str:
        return f"{self.planner} {self.samples}x{self.iterations}" + ("" if self.warm_start else " cold")

    @property
    def elites(self) -> int:
        return max(2, self.samples // 10)

    @classmethod
    def parse(cls, spec: str, option: str = "--budgets") -> "PlannerBudget":
        parts = spec.strip().split(":")
        try:
            if parts[0] not in ("cem", "mppi") or len(parts) not in (2, 3):
                raise ValueError
            n, i = (int(x) for x in parts[1].lower().split("x"))
            if n < 2 or i < 1 or (len(parts) == 3 and parts[2] not in ("warm", "cold")):
                raise ValueError
        except ValueError:
            raise ValueError(f"{option}: each budget must be PLANNER:NxI[:warm|cold] with PLANNER cem or mppi, "
                             f"N >= 2 and I >= 1 (e.g. cem:300x30, mppi:100x10, cem:64x5:cold), got {spec!r}") from None
        return cls(parts[0], n, i, len(parts) == 2 or parts[2] == "warm")


def parse_int_list(text: str, option: str, minimum: int = 0) -> tuple[int, ...]:
    """"0,64,256" -> (0, 64, 256); a clear error naming the option otherwise."""
    try:
        values = tuple(int(x) for x in str(text).split(",") if x.strip() != "")
    except ValueError:
        values = ()
    if not values or any(v < minimum for v in values):
        raise ValueError(f"{option}: expected a comma-separated list of ints >= {minimum} (e.g. 0,64,256,1024), "
                         f"got {text!r}")
    return values


def parse_sizes(text: str, option: str = "--sizes") -> tuple[str, ...]:
    """"1x,10x,100x" (any positive factor, e.g. 3x) -> ("1x", "10x", "100x")."""
    out = []
    for part in str(text).split(","):
        part = part.strip().lower()
        try:
            ok = part.endswith("x") and float(part[:-1]) > 0 and math.isfinite(float(part[:-1]))
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{option}: expected a comma-separated list of size factors like 1x,10x,100x, got {text!r}")
        out.append(f"{float(part[:-1]):g}x")
    return tuple(out)


DEFAULT_BUDGETS = "cem:300x30,cem:100x10,cem:64x5,cem:64x5:cold,mppi:100x10,cem:32x3"
# `--quick`: the defaults a short run replaces (options given explicitly still win). Two planner budgets,
# two points per cost sweep, no compiled decoder form, short timing windows and one energy trial: about
# a minute on 2 CPU cores with the demo models given as checkpoints.
QUICK_DEFAULTS: dict[str, Any] = {"budgets": "cem:64x5,mppi:32x3", "reasoning_tokens": (0, 64), "sizes": ("1x", "10x"),
                                  "decisions": 16, "max_steps": 40, "compile": False, "trials": 1,
                                  "timing_seconds": 0.1, "budget_minutes": 1.5}


@dataclass
class ProfileConfig:
    preset: str = "tiny"                 # tiny (test-sized models), demo, lewm (untrained ~15M pair, timing only)
    out: str = os.path.join("runs", "profile")
    wm_checkpoint: Optional[str] = None
    decoder_checkpoint: Optional[str] = None
    budget_minutes: float = 3.0          # training time for the models not given as checkpoints (0: untrained)
    decisions: int = 8                   # seeded (start, goal) pairs
    max_steps: int = 40                  # control steps per episode (success)
    horizon: int = 5
    reasoning_tokens: tuple = (0, 64, 256, 1024)
    sizes: tuple = ("1x", "10x", "100x")
    budgets: tuple = tuple(PlannerBudget.parse(s) for s in DEFAULT_BUDGETS.split(","))
    compile: bool = True                 # the static-cache compiled decoder form
    energy: bool = True
    energy_seconds: float = 2.0          # shortest energy window (NVML needs >= 2 s)
    trials: int = 3
    timing_seconds: float = 0.5          # time each latency row at least this long (and >= 5 calls)
    device: str = "auto"
    seed: int = 0
    progress: bool = True
    # Success episodes run only for budgets with samples x iterations at most this (-1: auto, which is
    # unlimited on CUDA and 2,000 on CPU, where a 300 x 30 budget makes the episodes take many minutes);
    # larger budgets are then timed but their success is not measured, and their row says so.
    success_max_evals: int = -1
    precision: Optional[str] = None      # the planners' rollout: fp32, tf32, bf16 (None: tf32 on CUDA, fp32 on CPU)
    quick: bool = False                  # built by `ProfileConfig.create(quick=True)`: recorded in the report

    @classmethod
    def create(cls, quick: bool = False, **given: Any) -> "ProfileConfig":
        """The full run's defaults, or with `quick` the `QUICK_DEFAULTS`; fields in `given` win either way."""
        return cls(**{**(QUICK_DEFAULTS if quick else {}), **given, "quick": bool(quick)})

    def __post_init__(self) -> None:
        def bad(option: str, expected: str, got: Any) -> ValueError:
            return ValueError(f"{option}: must be {expected}, got {got!r}")

        if self.preset not in PRESETS:
            raise bad("--preset", f"one of {PRESETS}", self.preset)
        if self.precision is not None and self.precision not in PRECISIONS:
            raise bad("--precision", f"one of {PRECISIONS}", self.precision)
        if not (isinstance(self.budget_minutes, (int, float)) and math.isfinite(self.budget_minutes)
                and self.budget_minutes >= 0):
            raise bad("--budget-minutes", "a finite number >= 0", self.budget_minutes)
        for option, name in (("--decisions", "decisions"), ("--max-steps", "max_steps"), ("--horizon", "horizon"),
                             ("--trials", "trials")):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise bad(option, "an int >= 1", v)
        for option, name in (("--energy-seconds", "energy_seconds"), ("--timing-seconds", "timing_seconds")):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise bad(option, "a finite number > 0", v)
        if not (isinstance(self.success_max_evals, int) and self.success_max_evals >= -1):
            raise bad("--success-max-evals", "an int >= -1 (-1: auto)", self.success_max_evals)
        if isinstance(self.reasoning_tokens, str):
            self.reasoning_tokens = parse_int_list(self.reasoning_tokens, "--reasoning-tokens")
        if isinstance(self.sizes, str):
            self.sizes = parse_sizes(self.sizes)
        if isinstance(self.budgets, str):
            self.budgets = tuple(PlannerBudget.parse(s) for s in self.budgets.split(",") if s.strip())
            if not self.budgets:
                raise bad("--budgets", "at least one budget", "")
        for path, option in ((self.wm_checkpoint, "--wm-checkpoint"), (self.decoder_checkpoint, "--decoder-checkpoint")):
            if path is not None and not Path(path).exists():
                raise bad(option, "an existing checkpoint file or run folder", path)
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise bad("--device", "cpu, cuda or cuda:N", self.device) from None

    def success_limit(self, device: torch.device) -> float:
        if self.success_max_evals >= 0:
            return self.success_max_evals
        return float("inf") if device.type == "cuda" else 2000

    def resolved_device(self) -> torch.device:
        return resolved_device(self.device)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["budgets"] = [b.name for b in self.budgets]
        d["reasoning_tokens"], d["sizes"] = list(self.reasoning_tokens), list(self.sizes)
        return d
