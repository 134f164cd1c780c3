"""`jepa-engine profile`: one decision made two ways, its cost and its success, as JSON, markdown and a plot.

The decision: from the current frame of the built-in open world to a goal, an H-step action plan.

    planner rows   the JEPA world model planning in latent space (CEM / MPPI at several budgets
                   N x I; eager = model.rollout stepped per candidate on reference ops, fused =
                   FusedRollout with the default dispatch, Triton on CUDA)
    decoder rows   a decoder-only transformer writing the plan token by token with a KV cache
                   (eager dynamic cache; static cache with the decode step compiled)
    cost sweeps    untrained decoders: L reasoning tokens before the plan, and decoder size
                   (matched, ~10x, ~100x the world model's parameters); timing and energy only

Success comes from receding-horizon episodes on a fixed set of seeded (start, goal) pairs, all
planned at once; latency from single decisions (one environment), timed call by call after a
warm-up. Energy comes from `profiling.measure` (NVML on a GPU, RAPL on the CPU) over windows of at
least `energy_seconds`; where no meter is readable the row says why, nothing is estimated.

FLOPs are counted, not measured (multiply-adds x 2, biases and norms ignored):

    planner  = N x I x sum_k predictor(window of `history` frames)  +  encoder(current frame)   (eager)
             = I x FusedRollout.flops(N, H)                          +  encoder(current frame)   (fused)
    decoder  = prefill(P + 1 tokens) + (L + H*A - 1) one-token steps, each 2 x matmul params + attention
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from jepa_engine.profiling.hardware import percentile, sync

PRESETS = ("tiny", "demo", "lewm")
SIZE_FACTORS = {"1x": 1.0, "10x": 10.0, "100x": 100.0}
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
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["budgets"] = [b.name for b in self.budgets]
        d["reasoning_tokens"], d["sizes"] = list(self.reasoning_tokens), list(self.sizes)
        return d


# ------------------------------------------------------------------------------------------------
# FLOP counts
# ------------------------------------------------------------------------------------------------
def _linear_params(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def encoder_flops(model) -> int:
    """One frame through the ViT encoder and projector: 2 x linear params x tokens + attention."""
    c = model.cfg
    tokens = (c.img_size // c.patch_size) ** 2 + 1
    blocks = _linear_params(model.encoder) - _linear_params(model.encoder.proj) if hasattr(model.encoder, "proj") \
        else _linear_params(model.encoder)
    proj = _linear_params(model.encoder.proj) if hasattr(model.encoder, "proj") else 0
    return 2 * blocks * tokens + 4 * tokens * tokens * c.enc_dim * c.enc_depth + 2 * proj


def predictor_flops(model, frames: int) -> int:
    """One predictor forward over a window of `frames` frames (2 tokens each), at one candidate."""
    c = model.cfg
    S, Dp = 2 * frames, c.pred_dim
    hidden = int(Dp * c.mlp_ratio)
    blocks = c.pred_depth * (2 * S * (4 * Dp * Dp + 2 * Dp * hidden) + 4 * S * S * Dp)
    return blocks + 2 * frames * c.embed_dim * Dp * 2 + 2 * frames * _linear_params(model.action_encoder)


def planner_flops(model, samples: int, iterations: int, horizon: int) -> int:
    """N x I x H predictor forwards with a full window of `history` frames, plus the encoder once."""
    return samples * iterations * horizon * predictor_flops(model, model.cfg.history) + encoder_flops(model)


def decoder_flops(cfg, reasoning_tokens: int) -> int:
    """Prefill over P + 1 tokens, then L + H*A - 1 one-token steps at growing context."""
    d, depth = cfg.dim, cfg.depth
    mm = depth * (4 * d * d + 2 * d * cfg.hidden) + d * cfg.vocab_size
    P = cfg.prefix_len
    prefill = 2 * mm * (P + 1) + 2 * P * cfg.channels * cfg.patch_size ** 2 * d + 4 * depth * d * (P + 1) ** 2 // 2
    steps = reasoning_tokens + cfg.action_tokens - 1
    decode = sum(2 * mm + 4 * depth * d * (P + 2 + i) for i in range(steps))
    return prefill + decode


# ------------------------------------------------------------------------------------------------
# Timing and energy
# ------------------------------------------------------------------------------------------------
def time_calls(fn: Callable[[], object], device: torch.device, min_seconds: float, min_calls: int = 5,
               max_calls: int = 200, warmup: int = 1) -> dict:
    """Call `fn` one at a time (synchronised) until `min_calls` calls and `min_seconds` have passed."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_calls and (len(times) < min_calls or time.perf_counter() - start < min_seconds):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"latency_s": med, "latency_p90_s": percentile(times, 0.9), "decisions_per_s": 1.0 / med,
            "timed_calls": len(times)}


def energy_probe(device: torch.device) -> tuple[bool, str]:
    """Whether the device's energy counter is readable, and why not."""
    from .meters import NvmlSource, RaplSource

    source, reason = NvmlSource.open(device.index or 0) if device.type == "cuda" else RaplSource.open()
    if source is None:
        return False, f"energy unavailable: {reason}"
    return True, ""


def energy_fields(fn: Callable[[], object], device: torch.device, cfg: ProfileConfig, available: bool,
                  reason: str, tokens: Optional[int] = None) -> dict:
    if not cfg.energy:
        return {"joules_per_decision": None, "energy_reason": "energy disabled (--no-energy)"}
    if not available:
        return {"joules_per_decision": None, "energy_reason": reason}
    from .meters import measure

    m = measure(fn, device=device, min_seconds=cfg.energy_seconds, trials=cfg.trials, warmup=0,
                cooldown_seconds=0.5 if device.type == "cuda" else 0.2)
    row = {"joules_per_decision": m.joules_per_call, "above_idle_joules_per_decision": m.above_idle_joules_per_call,
           "idle_watts": m.idle_watts, "mean_watts": m.mean_watts, "energy_rel_std": m.rel_std_joules,
           "energy_trials": len(m.calls), "energy_window_s": cfg.energy_seconds, "energy_reason": m.reason}
    if tokens and m.joules_per_call is not None:
        row["joules_per_token"] = m.joules_per_call / tokens
    return row


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------
def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def save_decoder(out_dir: Path, model, steps: int) -> Path:
    from jepa_engine.training import checkpoint as ckpt

    meta = {"kind": "decoder", "config": model.config.to_dict(), "imitation_steps": steps}
    return ckpt.save_checkpoint(out_dir, steps, ckpt.module_tensors(model, "model/"), meta, keep_last=1)


def load_decoder(path: str, device: torch.device):
    from jepa_engine.training import checkpoint as ckpt
    from jepa_engine.baselines import Decoder, DecoderConfig

    tensors, meta = ckpt.load_checkpoint(path, device=device)
    if meta.get("kind") != "decoder":
        raise ValueError(f"--decoder-checkpoint: {path} must be a decoder checkpoint (meta kind 'decoder'), "
                         f"got {meta.get('kind')!r}")
    model = Decoder(DecoderConfig.from_dict(meta["config"])).to(device)
    ckpt.load_module_tensors(model, tensors, "model/")
    return model.eval()


# The imitation recipe of the matched decoder (see `demo_decoder`); the profile
# trains with it for a step count set by --budget-minutes, the demo for DEMO_DECODER_STEPS.
DECODER_IMITATION: dict[str, Any] = dict(batch_size=64, episodes=16, episode_len=16, lr=3e-3, warmup=20,
                                         goal_noise=0.5, labels="observable")
DEMO_DECODER_STEPS = 4000
DEMO_DECODER_MAX_SECONDS = 150.0      # a slower machine stops training early rather than stall the demo


def train_decoder(dcfg, world, steps: int, device: torch.device, out_dir: Optional[Path], seed: int = 0,
                  max_seconds: float = 0.0, log: Optional[Callable[[str], None]] = None):
    """A `Decoder(dcfg)` trained by imitation of the expert with `DECODER_IMITATION` for `steps` steps
    (or `max_seconds`); saved under `out_dir` when given. Returns (model, state line)."""
    from jepa_engine.baselines import Decoder, ImitationConfig, train_imitation

    torch.manual_seed(seed)
    dec = Decoder(dcfg).to(device)
    icfg = ImitationConfig(steps=steps, seed=seed, max_seconds=max_seconds, **DECODER_IMITATION)
    t0 = time.perf_counter()
    done = len(train_imitation(dec, world, icfg, device=device))
    seconds = time.perf_counter() - t0
    state = f"trained here: {done} imitation steps in {seconds:.0f} s"
    if done < steps:
        state += f" (stopped by the {max_seconds:g} s limit; {steps} planned)"
    if out_dir is not None:
        save_decoder(out_dir, dec, done)
        state += f" (saved to {out_dir})"
    if log:
        log(f"decoder: {state}")
    return dec.eval(), state


def _wm_preset(preset: str) -> str:
    return {"tiny": "test", "demo": "demo", "lewm": "lewm"}[preset]


def build_models(cfg: ProfileConfig, device: torch.device, notes: list[str], log: Callable[[str], None]) -> dict:
    """The world model and the matched decoder: loaded, trained within the budget, or untrained."""
    from jepa_engine.training import checkpoint as ckpt
    from jepa_engine.baselines import Decoder, DecoderConfig, ImitationConfig, train_imitation
    from jepa_engine.models.world_model import WorldModel
    from jepa_engine.training.world_model import WMTrainConfig, load_world_model, save_world_model, train_world_model

    out = Path(cfg.out)
    trainable = cfg.preset != "lewm" and cfg.budget_minutes > 0
    torch.manual_seed(cfg.seed)
    # ---- world model
    if cfg.wm_checkpoint:
        try:
            wm, wm_train = load_world_model(cfg.wm_checkpoint, device=device)
        except ckpt.CheckpointError as e:
            raise ckpt.CheckpointError(f"--wm-checkpoint: {e}") from e
        wm_state = f"loaded from {cfg.wm_checkpoint}"
    elif trainable:
        share = cfg.budget_minutes * 0.5
        wm_train = WMTrainConfig.from_name(_wm_preset(cfg.preset), max_minutes=share, device=str(device),
                                           log_every=10_000, checkpoint_every=10_000)
        log(f"training the world model ({wm_train.model}, <= {wm_train.steps} steps, <= {share:.2g} min)")
        summary = train_world_model(wm_train, None, log=None)
        wm = summary["model"]
        save_world_model(out / "wm", summary["steps"], wm, wm_train)
        wm_state = f"trained here: {summary['steps']} steps in {summary['seconds']:.0f} s (saved to {out / 'wm'})"
    else:
        wm_train = WMTrainConfig.from_name(_wm_preset(cfg.preset), device=str(device))
        wm = WorldModel(wm_train.model_config()).to(device).eval()
        wm_state = "untrained (timing only)"
    wm.eval()
    world = wm_train.world_config()
    world_trained = not wm_state.startswith("untrained")
    wm_params = _params(wm)
    # ---- decoder, matched in size and in the decision it makes
    dec_kw = dict(image_size=world.image_size, channels=world.channels, horizon=cfg.horizon)
    if cfg.decoder_checkpoint:
        try:
            dec = load_decoder(cfg.decoder_checkpoint, device)
        except ckpt.CheckpointError as e:
            raise ckpt.CheckpointError(f"--decoder-checkpoint: {e}") from e
        dec_state = f"loaded from {cfg.decoder_checkpoint}"
    else:
        dcfg = DecoderConfig.from_name("lewm", **dec_kw) if cfg.preset == "lewm" else DecoderConfig.matched(wm_params, **dec_kw)
        dec = Decoder(dcfg).to(device)
        if trainable:
            icfg = ImitationConfig(steps=5, **DECODER_IMITATION)
            t0 = time.perf_counter()
            train_imitation(dec, world, icfg, device=device)  # calibration
            per_step = (time.perf_counter() - t0) / 5
            # the decoder gets 40% of the budget (the world model 50%; the rest is slack)
            steps = int(max(20, min(DEMO_DECODER_STEPS, 0.4 * cfg.budget_minutes * 60 / per_step)))
            log(f"training the decoder by imitation ({steps} steps, ~{steps * per_step:.0f} s)")
            dec, dec_state = train_decoder(dcfg, world, steps, device, out / "decoder", seed=cfg.seed)
        else:
            dec_state = "untrained (timing only)"
    dec.eval()
    if (dec.config.image_size, dec.config.channels) != (world.image_size, world.channels):
        raise ValueError(f"--decoder-checkpoint: the decoder sees {dec.config.channels}x{dec.config.image_size}^2 frames, "
                         f"the world model's world {world.channels}x{world.image_size}^2")
    if dec.config.horizon != cfg.horizon:
        notes.append(f"the decoder emits a {dec.config.horizon}-step plan, the planner plans {cfg.horizon} steps")
    return {"wm": wm, "world": world, "wm_state": wm_state, "wm_trained": world_trained, "wm_params": wm_params,
            "wm_predictor_params": _params(wm.predictor), "wm_encoder_params": _params(wm.encoder),
            "decoder": dec, "decoder_state": dec_state, "decoder_trained": not dec_state.startswith("untrained"),
            "decoder_params": _params(dec)}


def decision_set(wm, world, cfg: ProfileConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded (start [n, 4], goal [n, 2]) pairs every row is asked to solve."""
    from jepa_engine.evaluation.mpc import MPC, MPCConfig

    mpc = MPC(wm, world, MPCConfig(horizon=cfg.horizon, seed=cfg.seed), device=device)
    return mpc.episode_starts(0, cfg.decisions)


# ------------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------------
def _steady_state_cost(wm, world, start: torch.Tensor, goal: torch.Tensor, device, fused: bool = True):
    """The planner's cost function for one decision with a full history window (zero actions taken):
    the rollout through ``FusedRollout`` (``fused``) or stepping ``model.rollout``."""
    from jepa_engine.envs import PointMassWorld, render
    from jepa_engine.planning import latent_cost

    h, A = wm.cfg.history, wm.cfg.action_dim
    env = PointMassWorld(world, 1, device, seed=0)
    obs, _ = env.reset(options={"state": start.to(device), "goal": goal.to(device)})
    frames = [obs]
    for _ in range(h - 1):
        obs, *_ = env.step(torch.zeros(1, A, device=device))
        frames.append(obs)
    with torch.no_grad():
        z_hist = torch.stack([wm.encode(f) for f in frames], dim=1)            # [1, h, D]
        z_goal = wm.encode(render(goal.to(device), world))
    past = torch.zeros(1, h - 1, A, device=device)
    return latent_cost(wm, z_hist, past, z_goal, "l2", PLAN_REDUCE, fused=fused), frames[-1]


def planner_rows(models: dict, starts, goals, cfg: ProfileConfig, device, energy: tuple[bool, str],
                 tick: Callable[[str], None]) -> list[dict]:
    from jepa_engine.kernels import use_backend
    from jepa_engine.evaluation.mpc import MPC, MPCConfig
    from jepa_engine.planning.registry import PLANNERS

    from jepa_engine.planning.rollout import FusedRollout

    wm, world = models["wm"], models["world"]
    # eager: model.rollout stepped over the window for every candidate, reference ops (the loop as
    # published planners write it); fused: FusedRollout with the default dispatch (Triton on CUDA).
    forms = [("eager", False, "reference"), ("fused", True, None)]
    cost_fns = {fused: _steady_state_cost(wm, world, starts[:1], goals[:1], device, fused) for _, fused, _ in forms}
    obs = cost_fns[True][1]
    rollout = FusedRollout(wm)
    rows = []
    for i, b in enumerate(cfg.budgets):
        mpc_cfg = MPCConfig(planner=b.planner, horizon=cfg.horizon, samples=b.samples, iterations=b.iterations,
                            elites=b.elites, reduce=PLAN_REDUCE, max_steps=cfg.max_steps, warm_start=b.warm_start,
                            seed=cfg.seed)
        planner = PLANNERS[b.planner](mpc_cfg.planner_config(wm.cfg.action_dim))
        success: dict = {}
        # the eager form only for the reference budget: the other budgets scale the same way
        for form, fused, backend in (forms if i == 0 else forms[-1:]):
            cost_fn = cost_fns[fused][0]

            def decide(cost_fn=cost_fn):
                with torch.no_grad():
                    z = wm.encode(obs)  # the current frame is encoded once per decision
                    return planner.plan(cost_fn, 1, device), z

            tick(f"planner {b.name} ({form})")
            flops = (b.iterations * rollout.flops(1, b.samples, cfg.horizon) + encoder_flops(wm) if fused
                     else planner_flops(wm, b.samples, b.iterations, cfg.horizon))
            with use_backend(backend) if backend else _null():
                row = {"kind": "planner", "impl": f"planner-{form}", "name": f"JEPA {b.name} ({form})",
                       "budget": b.name, "planner": b.planner, "samples": b.samples, "iterations": b.iterations,
                       "elites": b.elites, "horizon": cfg.horizon, "warm_start": b.warm_start,
                       "params": models["wm_params"], "predictor_params": models["wm_predictor_params"],
                       "flops_per_decision": flops, "predictor_evaluations": b.samples * b.iterations * cfg.horizon,
                       "label": "trained" if models["wm_trained"] else SWEEP_LABEL}
                row.update(time_calls(decide, device, cfg.timing_seconds))
                limit = cfg.success_limit(device)
                if models["wm_trained"] and b.samples * b.iterations > limit:
                    success = dict(success_rate=None, success_note=f"success not measured: samples x iterations = "
                                   f"{b.samples * b.iterations} > {limit:g} (--success-max-evals); latency only")
                elif models["wm_trained"] and not success:
                    # MPC episodes run the fused rollout; the eager form computes the same predictions
                    # to fp32 rounding, so one measurement serves both rows of a budget.
                    res = MPC(wm, world, mpc_cfg, device=device).rollout_episodes(starts, goals)
                    success = dict(success_rate=res.success_rate, successes=sum(res.success),
                                   episodes=len(res.success), success_plan_ms_median=res.latency_ms()["median"],
                                   success_note="MPC episodes planned with the fused rollout")
                elif not models["wm_trained"]:
                    success = dict(success_rate=None, success_note="untrained world model: no success rate")
                row.update(success)
                row.update(energy_fields(decide, device, cfg, *energy))
            row["backend_note"] = ("FusedRollout, default dispatch (Triton kernels on CUDA, torch ops on the CPU)"
                                   if fused else "model.rollout stepped per candidate, reference ops")
            rows.append(row)
    return rows


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _decoder_row(dcfg, model, L: int, device, cfg: ProfileConfig, energy, cache: str, compile: bool, label: str,
                 extra: dict) -> dict:
    from jepa_engine.baselines import Decoder, decoding_cost

    model = model if model is not None else Decoder(dcfg).to(device)   # one model for timing and energy
    flops = decoder_flops(dcfg, L)
    est = flops / (5e10 if device.type == "cpu" else 1e13)
    repeats = max(3, min(20, int(cfg.timing_seconds / max(est, 1e-4))))
    row = decoding_cost(dcfg, L, device=device, cache=cache, compile=compile, repeats=repeats, model=model)
    name = "eager dynamic cache" if cache == "dynamic" else ("static cache, compiled" if compile else "static cache")
    # tokens per second of the whole decision (prefill included): robust where the prefill estimate is noisy
    row["decision_tokens_per_s"] = row["tokens_per_decision"] / row["latency_s"]
    row.update({"kind": "decoder", "name": f"decoder {name}", "label": label, "flops_per_decision": flops,
                "cache": cache, "compiled": compile, "timed_calls": repeats, **extra})
    if cfg.energy and energy[0]:
        g = torch.Generator(device="cpu").manual_seed(0)
        shape = (1, dcfg.channels, dcfg.image_size, dcfg.image_size)
        o, gl = torch.rand(shape, generator=g).to(device), torch.rand(shape, generator=g).to(device)
        fn = lambda: model.generate(o, gl, L, cache=cache, compile=compile)  # noqa: E731
        row.update(energy_fields(fn, device, cfg, *energy, tokens=row["tokens_per_decision"]))
    else:
        row.update(energy_fields(lambda: None, device, cfg, *energy))
    return row


def decoder_rows(models: dict, starts, goals, cfg: ProfileConfig, device, energy, notes: list[str],
                 tick: Callable[[str], None]) -> list[dict]:
    from jepa_engine.baselines import DecoderConfig, DecoderPolicy, rollout_success

    dec, world = models["decoder"], models["world"]
    dcfg = dec.config
    rows = []
    label = "trained" if models["decoder_trained"] else SWEEP_LABEL
    forms = [("dynamic", False), ("static", False)] + ([("static", True)] if cfg.compile else [])
    success = None
    if models["decoder_trained"]:
        tick("decoder success episodes")
        policy = DecoderPolicy(dec, world, cache="static")
        r = rollout_success(policy, world, starts.shape[0], cfg.max_steps, starts=starts, goals=goals, device=device)
        success = {"success_rate": r["success_rate"], "successes": int(r["success"].sum()), "episodes": starts.shape[0]}
    for cache, comp in forms:
        tick(f"decoder {cache}{' compiled' if comp else ''}")
        extra = {"sweep": "decision", "size": "matched"}
        extra.update(success or {"success_rate": None, "success_note": "untrained decoder: no success rate"})
        rows.append(_decoder_row(dcfg, dec, 0, device, cfg, energy, cache, comp, label, extra))
    dec.release_static_cache()
    # ---- cost sweeps (untrained): L at matched size, size at L = 0; eager dynamic cache on the CPU,
    # and the compiled static form too on a GPU
    sweep_forms = [("dynamic", False)] + ([("static", True)] if cfg.compile and device.type == "cuda" else [])
    if cfg.compile and device.type != "cuda":
        notes.append("cost sweeps on the CPU: eager dynamic cache only (torch.compile on the CPU recompiles "
                     "for every sweep model, minutes on 2 cores); the compiled form is measured at the matched "
                     "size with L = 0")
    base = {k: v for k, v in dcfg.to_dict().items() if k != "reasoning_tokens"}
    for L in cfg.reasoning_tokens:
        c = DecoderConfig(**base, reasoning_tokens=L)
        for cache, comp in sweep_forms:
            tick(f"sweep L={L} {cache}")
            if device.type == "cpu" and decoder_flops(c, L) > CPU_MAX_SWEEP_FLOPS:
                notes.append(f"capped: L = {L} at matched size skipped on the CPU ({decoder_flops(c, L):.2g} FLOPs "
                             f"per decision > {CPU_MAX_SWEEP_FLOPS:.0e})")
                continue
            torch.manual_seed(0)
            rows.append(_decoder_row(c, None, L, device, cfg, energy, cache, comp, SWEEP_LABEL,
                                     {"sweep": "reasoning_tokens", "size": "matched"}))
    target = models["wm_params"]
    for size in cfg.sizes:
        factor = float(size[:-1])
        c = DecoderConfig.matched(int(round(target * factor)), **{k: v for k, v in base.items()
                                                                   if k not in ("dim", "depth", "heads")})
        limit = _param_limit(device)
        if c.num_params() > limit:
            notes.append(f"capped: decoder size {size} ({c.num_params() / 1e6:.1f}M params) not run: over the "
                         f"{limit / 1e6:.0f}M-parameter limit on {device.type}")
            continue
        for cache, comp in sweep_forms:
            tick(f"sweep size {size} {cache}")
            torch.manual_seed(0)
            rows.append(_decoder_row(c, None, 0, device, cfg, energy, cache, comp, SWEEP_LABEL,
                                     {"sweep": "size", "size": size, "size_factor": factor}))
    return rows


def _param_limit(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5 / 4)   # fp32 weights in at most half the free memory (cache, activations)
    return CPU_MAX_DECODER_PARAMS


def _reference_planner(rows: list[dict]) -> Optional[dict]:
    """The headline planner row: the fused form of the first (reference) budget."""
    planners = [r for r in rows if r["kind"] == "planner"]
    return next((r for r in planners if r["impl"] == "planner-fused"), planners[0] if planners else None)


def ratios(rows: list[dict]) -> list[dict]:
    """Planner / decoder for every planner row against the matched decoder forms (L = 0)."""
    planners = [r for r in rows if r["kind"] == "planner"]
    decoders = [r for r in rows if r["kind"] == "decoder" and r.get("sweep") == "decision"]
    out = []
    for p in planners:
        for d in decoders:
            q = {"planner": p["name"], "decoder": d["name"],
                 "latency": p["latency_s"] / d["latency_s"],
                 "flops": p["flops_per_decision"] / d["flops_per_decision"],
                 "params": p["params"] / d["params"]}
            pj, dj = p.get("joules_per_decision"), d.get("joules_per_decision")
            q["joules"] = pj / dj if pj is not None and dj is not None else None
            out.append(q)
    return out


# ------------------------------------------------------------------------------------------------
# Environment, markdown, plot
# ------------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    import jepa_engine

    info = {"device": str(device), "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "jepa_engine": jepa_engine.__version__, "cpu_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - triton is optional off Linux x86
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0")
    return info


def _fmt(v, spec: str = ".3g", none: str = "-") -> str:
    if v is None:
        return none
    if isinstance(v, float) and not math.isfinite(v):
        return none
    return format(v, spec)


def _ms(v) -> str:
    return _fmt(None if v is None else 1e3 * v, ".3g")


def markdown(report: dict) -> str:
    env, m, cfg = report["environment"], report["models"], report["config"]
    rows = report["rows"]
    dev = env.get("gpu") or f"CPU ({env['processor']}, {env['cpu_threads']} threads)"
    mode = "quick run, " if cfg.get("quick") else ""
    lines = [f"# Planner vs token-by-token decoding: one decision, two ways ({mode}{cfg['preset']} preset, {dev})", ""]
    ref = _reference_planner(rows)
    eager = next((r for r in rows if r["impl"] == "planner-eager"), None)
    dec = next((r for r in rows if r["kind"] == "decoder" and r.get("sweep") == "decision"), None)
    lines += ["## What is compared", "",
              f"The same {cfg['decisions']} seeded decisions (start, goal) in the built-in open world, each an "
              f"{cfg['horizon']}-step action plan from the current frame. (a) The JEPA world model "
              f"({m['wm_params']:,} parameters; predictor {m['wm_predictor_params']:,}, encoder "
              f"{m['wm_encoder_params']:,}; {m['wm_state']}) plans in latent space with CEM / MPPI at several "
              f"budgets N x I (each candidate rolled H = {cfg['horizon']} steps through the predictor). (b) A "
              f"decoder-only transformer ({m['decoder_params']:,} parameters, dim {m['decoder_dim']}, depth "
              f"{m['decoder_depth']}; {m['decoder_state']}) writes the plan as {m['action_tokens']} action tokens "
              f"with a KV cache after a prompt of {m['prefix_tokens']} patch embeddings of the current and goal "
              f"frames. Success: the fraction of the decisions' episodes (receding horizon, <= {cfg['max_steps']} "
              f"steps) that reach the goal. Latency: one decision, one environment, wall clock, median and p90 "
              f"after a warm-up. FLOPs are counted (2 x multiply-adds), not measured.", ""]
    if ref and dec:
        lines += [f"Headline: the reference planner ({ref['name']}) takes {_ms(ref['latency_s'])} ms per decision "
                  f"against {_ms(dec['latency_s'])} ms for the matched decoder ({dec['name']}), a ratio of "
                  f"{ref['latency_s'] / dec['latency_s']:.3g}x; in counted FLOPs "
                  f"{ref['flops_per_decision'] / dec['flops_per_decision']:.3g}x "
                  f"({ref['predictor_evaluations']:,} predictor evaluations against {dec['tokens_per_decision']} "
                  f"decoded tokens).", ""]
    if ref and eager and ref is not eager:
        lines += [f"The planner's two forms at that budget: the eager loop ({eager['name']}: `model.rollout` "
                  f"stepped per candidate) takes {_ms(eager['latency_s'])} ms, the fused rollout "
                  f"{_ms(ref['latency_s'])} ms ({eager['latency_s'] / ref['latency_s']:.3g}x faster, "
                  f"{eager['flops_per_decision'] / ref['flops_per_decision']:.3g}x fewer counted FLOPs).", ""]
    lines += ["## Caveats", ""]
    lines += [f"- {c}" for c in report["caveats"]]
    lines += ["", "## Decisions (same start/goal pairs)", "",
              "| row | params | success | latency median (ms) | p90 (ms) | decisions/s | GFLOPs/decision | J/decision | J/token |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["kind"] == "decoder" and r.get("sweep") != "decision":
            continue
        lines.append(_table_row(r))
    lines += ["", f"## Cost sweeps ({SWEEP_LABEL})", "",
              "| sweep | row | params | L | tokens | latency median (ms) | p90 (ms) | decisions/s | tokens/s (decision) | "
              "GFLOPs/decision | J/decision | J/token |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["kind"] == "decoder" and r.get("sweep") in ("reasoning_tokens", "size"):
            sweep = f"L = {r['reasoning_tokens']}" if r["sweep"] == "reasoning_tokens" else f"size {r['size']}"
            lines.append(f"| {sweep} | {r['name']} | {r['params']:,} | {r['reasoning_tokens']} | "
                         f"{r['tokens_per_decision']} | {_ms(r['latency_s'])} | {_ms(r['latency_p90_s'])} | "
                         f"{_fmt(r['decisions_per_s'])} | {_fmt(r['decision_tokens_per_s'])} | "
                         f"{_fmt(r['flops_per_decision'] / 1e9)} | {_fmt(r.get('joules_per_decision'))} | "
                         f"{_fmt(r.get('joules_per_token'))} |")
    decoders = [r for r in rows if r["kind"] == "decoder" and r.get("bytes_per_token") is not None]
    if decoders:
        lines += ["", "## Decode step memory bandwidth (as gpt-fast reports it)", "",
                  "Bytes read per generated token (parameters + KV cache at the mean context) x decode tokens/s, "
                  "against the device's peak where it is known.", "",
                  "| row | sweep | params | bytes/token (MB) | achieved GB/s | peak GB/s | utilisation |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in decoders:
            sweep = {"decision": "decision", "reasoning_tokens": f"L = {r.get('reasoning_tokens')}",
                     "size": f"size {r.get('size')}"}.get(r.get("sweep"), "")
            util = r.get("bandwidth_utilisation")
            lines.append(f"| {r['name']} | {sweep} | {r['params']:,} | {_fmt(r['bytes_per_token'] / 1e6)} | "
                         f"{_fmt(r.get('achieved_gbps'))} | {_fmt(r.get('peak_gbps'))} | "
                         f"{'n/a (peak unknown)' if util is None else f'{util:.1%}'} |")
    lines += ["", "## Ratios (planner / matched decoder, L = 0)", "",
              "| planner | decoder | latency | FLOPs | params | joules |", "|---|---|---:|---:|---:|---:|"]
    for q in report["ratios"]:
        lines.append(f"| {q['planner']} | {q['decoder']} | {q['latency']:.3g} | {q['flops']:.3g} | "
                     f"{q['params']:.3g} | {_fmt(q['joules'])} |")
    lines += ["", "## Energy", "", f"- {report['energy']['status']}",
              f"- For scale (public reference, not measured here): LLM decoding costs {LLM_REFERENCE}."]
    jt = [r for r in rows if r.get("joules_per_token") is not None]
    if jt:
        lines.append("- Measured here, J per token: " + "; ".join(
            f"{r['name']} ({r['params']:,} params, L = {r['reasoning_tokens']}): {r['joules_per_token']:.3g}"
            for r in jt))
    lines += ["", "## Capped or skipped", ""] + ([f"- {n}" for n in report["notes"]] or ["- nothing"])
    lines += ["", f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}, python {env['python']}; "
              f"{env['platform']}. Total run time {report['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def _table_row(r: dict) -> str:
    if r.get("success_rate") is None:
        success = "not measured (latency only)" if "not measured" in r.get("success_note", "") else "n/a (untrained)"
    else:
        success = f"{r['success_rate']:.0%} ({r['successes']}/{r['episodes']})"
    return (f"| {r['name']} | {r['params']:,} | {success} | {_ms(r['latency_s'])} | {_ms(r['latency_p90_s'])} | "
            f"{_fmt(r['decisions_per_s'])} | {_fmt(r['flops_per_decision'] / 1e9)} | "
            f"{_fmt(r.get('joules_per_decision'))} | {_fmt(r.get('joules_per_token'))} |")


PLOT_SIZE = (12.0, 8.0)   # inches; at PLOT_DPI: 1200 x 800 pixels
PLOT_DPI = 100


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, axes = plt.subplots(2, 2, figsize=PLOT_SIZE, dpi=PLOT_DPI)
    planners = [r for r in rows if r["kind"] == "planner"]
    sweeps = {"reasoning_tokens": ("reasoning tokens L (matched size)", "reasoning_tokens"),
              "size": ("decoder parameters (L = 0)", "params")}
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for col, (sweep, (xlabel, xkey)) in enumerate(sweeps.items()):
        for row_i, (metric, ylabel) in enumerate((("latency_s", "latency per decision (s)"),
                                                  ("joules_per_decision", "energy per decision (J)"))):
            ax = axes[row_i][col]
            pts = [r for r in rows if r["kind"] == "decoder" and r.get("sweep") == sweep]
            have = [r for r in pts if r.get(metric) is not None] + [p for p in planners if p.get(metric) is not None]
            if not have:
                reason = next((r.get("energy_reason") for r in rows if r.get("energy_reason")), "no rows")
                ax.text(0.5, 0.5, _wrap(reason), ha="center", va="center",
                        transform=ax.transAxes, fontsize=9)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"{ylabel}: not measured")
                continue
            for j, impl in enumerate(sorted({r["impl"] for r in pts})):
                sel = sorted((r for r in pts if r["impl"] == impl and r.get(metric) is not None), key=lambda r: r[xkey])
                xs = [max(r[xkey], 0.5) if xkey == "reasoning_tokens" else r[xkey] for r in sel]
                ax.plot(xs, [r[metric] for r in sel], "o-", color=colours[j % len(colours)], label=impl)
            for j, p in enumerate(planners):
                if p.get(metric) is not None:
                    ax.axhline(p[metric], ls="--", lw=1, color=colours[(j + 3) % len(colours)], label=p["name"])
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel + (" (L = 0 drawn at 0.5)" if xkey == "reasoning_tokens" else ""))
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6, loc="best")
    fig.suptitle(f"JEPA planner vs token-by-token decoding ({report['config']['preset']}, "
                 f"{report['environment'].get('gpu') or 'CPU'}); dashed: planner budgets", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)


def _wrap(text: str, width: int = 60) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(str(text), width))


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------
def run_profile(cfg: ProfileConfig, log: Callable[[str], None] = print) -> dict:
    """Build or load the models, measure every row, write profile.json / .md / .png under `cfg.out`."""
    from tqdm.auto import tqdm

    from jepa_engine.runtime import progress_mininterval

    t_start = time.perf_counter()
    device = cfg.resolved_device()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    models = build_models(cfg, device, notes, log)
    starts, goals = decision_set(models["wm"], models["world"], cfg, device)
    energy = energy_probe(device)
    if device.type == "cpu" and CPU_MAX_DECODER_PARAMS:
        notes.append(f"CPU limits: decoders over {CPU_MAX_DECODER_PARAMS / 1e6:.0f}M parameters and sweep points over "
                     f"{CPU_MAX_SWEEP_FLOPS:.0e} FLOPs per decision are not run")
    n_planner = len(cfg.budgets) + (1 if device.type == "cuda" else 0)
    n_sweep = (len(cfg.reasoning_tokens) + len(cfg.sizes)) * (2 if cfg.compile and device.type == "cuda" else 1)
    total = n_planner + 3 + (1 if models["decoder_trained"] else 0) + n_sweep
    with tqdm(total=total, desc="profile", disable=not cfg.progress, dynamic_ncols=True,
              mininterval=progress_mininterval()) as bar:
        def tick(what: str) -> None:
            bar.set_postfix_str(what, refresh=False)   # redraws follow mininterval
            bar.update(1)

        rows = planner_rows(models, starts, goals, cfg, device, energy, tick)
        rows += decoder_rows(models, starts, goals, cfg, device, energy, notes, tick)
        bar.update(bar.total - bar.n)
    dc = models["decoder"].config
    caveats = [
        f"Sizes: world model {models['wm_params']:,} parameters, matched decoder {models['decoder_params']:,} "
        f"(closest dim/depth with dim a multiple of 32 and depth >= 2); the sweeps go to ~10x and ~100x.",
        "At matched size a CEM budget of N x I x H predictor evaluations can cost more than decoding a short plan: "
        "the planner's cost grows with its search budget, the decoder's with the tokens it writes and its size. "
        "Both sweeps are shown so the crossover can be read off.",
        "The cost sweeps use untrained weights: their latency and energy are real, they solve nothing.",
        "The decoder sees frames (positions only), like the world model; its success comes from imitating an "
        "analytic expert's position-only law, the planner's from a world model trained without rewards or "
        "expert actions.",
        "Latency is one decision for one environment; the success episodes plan all decisions at once (batched).",
        "Planner latency is measured in the steady state (a full history window of "
        f"{models['wm'].cfg.history} frames); FLOPs count the predictor at that window.",
    ]
    if device.type == "cpu":
        caveats.append("On the CPU there are no Triton kernels: the 'fused' planner path is the reference path, "
                       "so one planner row per budget is reported. torch.compile on the CPU uses the 'default' "
                       "mode (no CUDA graphs).")
    if cfg.quick:
        caveats.append(f"Quick run (--quick): {len(cfg.budgets)} planner budgets, L in {list(cfg.reasoning_tokens)}, "
                       f"sizes {list(cfg.sizes)}, {'the compiled decoder form included' if cfg.compile else 'no compiled decoder form'}, "
                       f"latency windows of {cfg.timing_seconds:g} s, {cfg.trials} energy trial(s). "
                       "The full report is `jepa-engine profile` without --quick.")
    if not (models["wm_trained"] and models["decoder_trained"]):
        caveats.append("Rows on untrained models are timing/energy only (labelled): no success rate.")
    report = {
        "config": cfg.to_dict(), "environment": environment(device),
        "models": {"wm_params": models["wm_params"], "wm_predictor_params": models["wm_predictor_params"],
                   "wm_encoder_params": models["wm_encoder_params"], "wm_state": models["wm_state"],
                   "wm_config": models["wm"].cfg.to_dict(), "decoder_params": models["decoder_params"],
                   "decoder_state": models["decoder_state"], "decoder_config": dc.to_dict(),
                   "decoder_dim": dc.dim, "decoder_depth": dc.depth, "action_tokens": dc.action_tokens,
                   "prefix_tokens": dc.prefix_len, "world": models["world"].to_dict()},
        "decisions": {"starts": starts.cpu().tolist(), "goals": goals.cpu().tolist()},
        "rows": rows, "ratios": ratios(rows), "notes": notes, "caveats": caveats,
        "energy": {"available": energy[0] and cfg.energy,
                   "status": ("measured with profiling.measure: windows >= "
                              f"{cfg.energy_seconds} s, {cfg.trials} trials, spread in energy_rel_std")
                   if energy[0] and cfg.energy else (energy[1] if cfg.energy else "energy disabled (--no-energy)"),
                   "llm_reference": LLM_REFERENCE},
        "seconds": time.perf_counter() - t_start,
    }
    (out / "profile.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    (out / "profile.md").write_text(markdown(report))
    plot(report, out / "profile.png")
    return report


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def summary_lines(report: dict) -> list[str]:
    """A few lines for the terminal."""
    out = []
    for r in report["rows"]:
        if r["kind"] == "decoder" and r.get("sweep") != "decision":
            continue
        s = "n/a" if r.get("success_rate") is None else f"{r['success_rate']:.0%}"
        out.append(f"{r['name']:<40s} params {r['params']:>11,}  success {s:>4s}  latency {_ms(r['latency_s']):>7s} ms "
                   f"(p90 {_ms(r['latency_p90_s'])})  {_fmt(r['flops_per_decision'] / 1e9)} GFLOP  "
                   f"J {_fmt(r.get('joules_per_decision'), '.3g', 'n/a')}")
    return out


# ------------------------------------------------------------------------------------------------
# The demo's closing section
# ------------------------------------------------------------------------------------------------
def demo_decoder(wm, world, out_dir: Path, device: torch.device, horizon: int, steps: int = DEMO_DECODER_STEPS,
                 max_seconds: float = DEMO_DECODER_MAX_SECONDS, seed: int = 0,
                 log: Optional[Callable[[str], None]] = None):
    """The decoder matched to `wm` (parameters, frames, horizon), loaded from `out_dir` when a checkpoint
    with the same config is there, else trained by imitation and saved there. Returns (model, state).

    The recipe (`DECODER_IMITATION`): labels from the expert's position-only law (a frame shows no
    velocity, see `expert_examples`), states visited with noise 0.5 injected into the expert's actions
    (DART-style: behaviour cloning drifts off the expert's straight paths, and noise 0.1 leaves those
    states unseen), the world model's
    fixed sin-cos patch positions on the prompt, and depth >= 2 (`DecoderConfig.matched`).
    """
    from jepa_engine.training import checkpoint as ckpt
    from jepa_engine.baselines import DecoderConfig

    dcfg = DecoderConfig.matched(_params(wm), image_size=world.image_size, channels=world.channels, horizon=horizon)
    path = ckpt.latest_checkpoint(out_dir) if Path(out_dir).is_dir() else None
    if path is not None:
        dec = load_decoder(str(path), device)
        if dec.config == dcfg:
            return dec, f"loaded from {path}"
        if log:
            log(f"decoder: {path} has another config; training a new one")
    if log:
        log(f"training the matched decoder ({dcfg.num_params():,} params, dim {dcfg.dim}, depth {dcfg.depth}) by "
            f"imitation: {steps} steps, at most {max_seconds:g} s")
    return train_decoder(dcfg, world, steps, device, Path(out_dir), seed=seed, max_seconds=max_seconds, log=log)


def demo_profile(wm_checkpoint: str, out: str, *, decoder_steps: int = DEMO_DECODER_STEPS,
                 decoder_max_seconds: float = DEMO_DECODER_MAX_SECONDS, progress: bool = True,
                 log: Callable[[str], None] = print, **overrides: Any) -> list[str]:
    """The demo's last section: the matched decoder (trained into `<out>/decoder`, or loaded from there),
    then the quick profile against the world model at `wm_checkpoint`; writes `<out>/profile.json`,
    `.md` and `.png` and returns the lines to print. `overrides`: ProfileConfig fields."""
    from jepa_engine.training.world_model import load_world_model

    cfg = ProfileConfig.create(quick=True, **{"preset": "demo", **overrides, "out": str(out),
                                              "wm_checkpoint": wm_checkpoint, "progress": progress})
    device = cfg.resolved_device()
    wm, wm_train = load_world_model(wm_checkpoint, device=device)
    dec_dir = Path(out) / "decoder"
    _, state = demo_decoder(wm, wm_train.world_config(), dec_dir, device, cfg.horizon, steps=decoder_steps,
                            max_seconds=decoder_max_seconds, seed=cfg.seed, log=log)
    cfg.decoder_checkpoint = str(dec_dir)
    report = run_profile(cfg, log)
    return headline_lines(report, decoder_state=state)


def headline_lines(report: dict, decoder_state: str = "") -> list[str]:
    """Planner vs decoder per decision: latency, ratio, success of each, energy status, where the files are."""
    rows = report["rows"]
    planners = [r for r in rows if r["kind"] == "planner"]
    dec = next((r for r in rows if r["kind"] == "decoder" and r.get("sweep") == "decision"), None)
    m, cfg = report["models"], report["config"]

    def success(r: dict) -> str:
        if r.get("success_rate") is None:
            return "success not measured"
        return f"success {r['success_rate']:.0%} ({r['successes']}/{r['episodes']})"

    out = [f"world model {m['wm_params']:,} params ({m['wm_state']}); matched decoder {m['decoder_params']:,} params "
           f"({decoder_state or m['decoder_state']})"]
    if dec is not None:
        out.append(f"decoder ({dec['name']}, {dec['tokens_per_decision']} tokens): {_ms(dec['latency_s'])} ms per "
                   f"decision (p90 {_ms(dec['latency_p90_s'])}), {success(dec)}")
    for p in planners:
        ratio = f", {p['latency_s'] / dec['latency_s']:.3g}x the decoder's latency" if dec is not None else ""
        out.append(f"planner {p['name']}: {_ms(p['latency_s'])} ms per decision (p90 {_ms(p['latency_p90_s'])})"
                   f"{ratio}, {success(p)}")
    out.append(f"same {cfg['decisions']} seeded (start, goal) pairs, <= {cfg['max_steps']} steps each; "
               f"energy: {report['energy']['status']}")
    out.append(f"wrote {Path(cfg['out']) / 'profile.json'}, profile.md, profile.png in {report['seconds']:.0f} s")
    return out
