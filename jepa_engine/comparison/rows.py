"""The comparison's result rows: each planner budget and decoder form timed, its energy measured and its
success counted on the seeded decisions; the cost sweeps; the planner / decoder ratios."""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from jepa_engine.baselines import Decoder, DecoderConfig, DecoderPolicy, decoding_cost, rollout_success
from jepa_engine.envs import PointMassWorld, render
from jepa_engine.evaluation.mpc import MPC, MPCConfig
from jepa_engine.kernels import use_backend
from jepa_engine.kernels.precision import check_precision
from jepa_engine.planning import latent_cost
from jepa_engine.planning.graphs import GraphedPlanner
from jepa_engine.planning.registry import PLANNERS
from jepa_engine.planning.rollout import FusedRollout
from jepa_engine.profiling.hardware import time_calls
from jepa_engine.profiling.meters import measure

from .config import CPU_MAX_DECODER_PARAMS, CPU_MAX_SWEEP_FLOPS, PLAN_REDUCE, SWEEP_LABEL, ProfileConfig
from .flops import decoder_flops, encoder_flops, planner_flops


def energy_fields(fn: Callable[[], object], device: torch.device, cfg: ProfileConfig, available: bool,
                  reason: str, tokens: Optional[int] = None) -> dict:
    """A row's energy fields: `fn` measured in windows of at least `cfg.energy_seconds`, `cfg.trials` times,
    or no number and the reason (disabled, or no readable meter)."""
    if not cfg.energy:
        return {"joules_per_decision": None, "energy_reason": "energy disabled (--no-energy)"}
    if not available:
        return {"joules_per_decision": None, "energy_reason": reason}
    m = measure(fn, device=device, min_seconds=cfg.energy_seconds, trials=cfg.trials, warmup=0,
                cooldown_seconds=0.5 if device.type == "cuda" else 0.2)
    row = {"joules_per_decision": m.joules_per_call, "above_idle_joules_per_decision": m.above_idle_joules_per_call,
           "idle_watts": m.idle_watts, "mean_watts": m.mean_watts, "energy_rel_std": m.rel_std_joules,
           "energy_trials": len(m.calls), "energy_window_s": cfg.energy_seconds, "energy_reason": m.reason}
    if tokens and m.joules_per_call is not None:
        row["joules_per_token"] = m.joules_per_call / tokens
    return row


def _steady_state_cost(wm, world, start: torch.Tensor, goal: torch.Tensor, device, fused: bool = True,
                       precision: Optional[str] = None):
    """The planner's cost function for one decision with a full history window (zero actions taken):
    the rollout through ``FusedRollout`` (``fused``) or stepping ``model.rollout``."""
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
    return latent_cost(wm, z_hist, past, z_goal, "l2", PLAN_REDUCE, fused=fused, precision=precision), frames[-1]


def planner_rows(models: dict, starts, goals, cfg: ProfileConfig, device, energy: tuple[bool, str],
                 tick: Callable[[str], None]) -> list[dict]:
    wm, world = models["wm"], models["world"]
    # eager: model.rollout stepped over the window for every candidate, reference ops (the loop as
    # published planners write it); fused: FusedRollout with the default dispatch (Triton on CUDA).
    # graphed (CUDA only): the fused plan, every iteration captured once in a CUDA graph and replayed
    # per decision (the same ops and random stream as the fused form: one launch instead of hundreds).
    forms = [("eager", False, "reference"), ("fused", True, None)]
    if device.type == "cuda":
        forms.append(("graphed", True, None))
    # The fused forms at the configured precision (default: tf32 on CUDA, fp32 on the CPU); the eager form
    # is the published loop at torch's default (fp32) products.
    precision = check_precision("profile", cfg.precision, device)
    cost_fns = {fused: _steady_state_cost(wm, world, starts[:1], goals[:1], device, fused,
                                          precision if fused else "fp32") for _, fused, _ in forms}
    obs = cost_fns[True][1]
    rollout = FusedRollout(wm)
    rows = []
    for i, b in enumerate(cfg.budgets):
        mpc_cfg = MPCConfig(planner=b.planner, horizon=cfg.horizon, samples=b.samples, iterations=b.iterations,
                            elites=b.elites, reduce=PLAN_REDUCE, max_steps=cfg.max_steps, warm_start=b.warm_start,
                            seed=cfg.seed, precision=precision)
        planner = PLANNERS[b.planner](mpc_cfg.planner_config(wm.cfg.action_dim))
        success: dict = {}
        # the eager form only for the reference budget: the other budgets scale the same way
        for form, fused, backend in (forms if i == 0 else forms[1:]):
            cost_fn = cost_fns[fused][0]
            if form == "graphed":
                graphed = GraphedPlanner(planner, cost_fn, 1, device)

                def decide(graphed=graphed):
                    with torch.no_grad():
                        z = wm.encode(obs)
                        return graphed.plan(), z
            else:
                def decide(cost_fn=cost_fn):
                    with torch.no_grad():
                        z = wm.encode(obs)  # the current frame is encoded once per decision
                        return planner.plan(cost_fn, 1, device), z

            tick(f"planner {b.name} ({form})")
            flops = (b.iterations * rollout.flops(1, b.samples, cfg.horizon) + encoder_flops(wm) if fused
                     else planner_flops(wm, b.samples, b.iterations, cfg.horizon))
            with use_backend(backend) if backend else contextlib.nullcontext():
                row = {"kind": "planner", "impl": f"planner-{form}", "name": f"JEPA {b.name} ({form})",
                       "budget": b.name, "planner": b.planner, "samples": b.samples, "iterations": b.iterations,
                       "elites": b.elites, "horizon": cfg.horizon, "warm_start": b.warm_start,
                       "params": models["wm_params"], "predictor_params": models["wm_predictor_params"],
                       "flops_per_decision": flops, "precision": precision if fused else "fp32",
                       "predictor_evaluations": b.samples * b.iterations * cfg.horizon,
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
            row["backend_note"] = ("FusedRollout, the whole plan replayed from one CUDA graph" if form == "graphed"
                                   else "FusedRollout, default dispatch (Triton kernels on CUDA, torch ops on the CPU)"
                                   if fused else "model.rollout stepped per candidate, reference ops")
            rows.append(row)
    return rows


def _decoder_row(dcfg, model, L: int, device, cfg: ProfileConfig, energy, cache: str, compile: bool, label: str,
                 extra: dict) -> dict:
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
