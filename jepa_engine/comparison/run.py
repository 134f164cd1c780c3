"""The comparison's run (`jepa-engine profile`): build or load the models, measure every row, and write
profile.json, profile.md and profile.png; the environment it ran in."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

import jepa_engine
from jepa_engine.kernels.precision import check_precision
from jepa_engine.profiling.meters import energy_probe
from jepa_engine.runtime import progress_mininterval

from .config import CPU_MAX_DECODER_PARAMS, CPU_MAX_SWEEP_FLOPS, LLM_REFERENCE, ProfileConfig
from .models import build_models, decision_set
from .render import markdown, plot
from .rows import decoder_rows, planner_rows, ratios


def environment(device: torch.device) -> dict:
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


def run_profile(cfg: ProfileConfig, log: Callable[[str], None] = print) -> dict:
    """Build or load the models, measure every row, write profile.json / .md / .png under `cfg.out`."""
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    device = cfg.resolved_device()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    notes.append(f"planner rollout precision: {check_precision('profile', cfg.precision, device)} (the eager planner "
                 f"form and the decoders: fp32)")
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
