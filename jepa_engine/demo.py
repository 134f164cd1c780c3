"""The demo (`jepa-engine demo`), every section of it: a tiny I-JEPA trained and probed, the action-conditioned
world model (physics probe, surprise, MPC), the planner against the matched decoder (quick profile), the
kernel self-check; and the trainers' printed summaries the commands share."""
from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from jepa_engine import selfcheck
from jepa_engine.baselines import DecoderConfig
from jepa_engine.comparison import ProfileConfig, run_profile
from jepa_engine.comparison.models import DEMO_DECODER_STEPS, load_decoder, num_params, train_decoder
from jepa_engine.comparison.render import fmt_ms
from jepa_engine.evaluation.mpc import MPC, MPCConfig
from jepa_engine.evaluation.surprise import impossible_trajectories, physics_probe, surprise
from jepa_engine.training import checkpoint as ckpt
from jepa_engine.training import ijepa
from jepa_engine.training import world_model as wm_training

# The demo's world-model section: training (a WMTrainConfig preset with overrides; max_minutes bounds it
# on a slow machine) and the MPC evaluation (CEM, seeded episodes all planned at once). The model is the
# 32x32-frame "test" size: on 2 CPU cores it trains 300 steps in well under a minute and plans about 4x
# faster than the 64x64 "demo" model, and with rollout_weight 1.0 it reached 30/32 episodes with this
# planner (the 64x64 model: 11/16 after 300 steps, 5/16 after 600 steps at rollout_weight 0.5).
DEMO_WM_TRAIN: dict = dict(preset="test", overrides=dict(steps=300, rollout_weight=1.0, checkpoint_every=100,
                                                         log_every=50, max_minutes=1.5, device="auto"))
DEMO_MPC: dict = dict(planner="cem", samples=64, iterations=5, elites=8, horizon=5, reduce="sum", max_steps=40)
DEMO_MPC_EPISODES = 16
DEMO_DECODER_MAX_SECONDS = 150.0      # a slower machine stops training early rather than stall the demo


def replaces_own_run(out, cfg) -> bool:
    """Whether the demo may delete the checkpoints in ``out`` before training ``cfg`` afresh: only those of
    an earlier demo, whose newest checkpoint was trained from the same config. A folder holding anything
    else keeps it, and the trainer stops with an error that names it (nothing is lost)."""
    found = ckpt.list_checkpoints(out)
    if not found:
        return False
    try:
        saved = json.loads(found[-1][1].read_text())["meta"]["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return saved == json.loads(json.dumps(cfg.to_dict()))


def run(out: str) -> int:
    """The whole demo into the run folder `out`: the I-JEPA section, the world-model section, the quick profile
    and the kernel self-check, each timed. Returns the exit status (1 when a section misses or fails)."""
    t_demo = time.perf_counter()
    cfg = ijepa.TrainConfig.from_name("demo")
    device = cfg.resolved_device()
    print(f"== Training a tiny I-JEPA on the built-in world ({device}, budget {cfg.max_minutes:g} min, "
          f"{cfg.steps} steps max) ==", flush=True)
    t0 = time.perf_counter()
    trainer = ijepa.Trainer(cfg, out, resume=False, overwrite=replaces_own_run(out, cfg))
    try:
        # The same probe on the untrained encoder: what training adds over random features.
        before = trainer.run_probe() or {}
        summary = trainer.fit()
    finally:
        trainer.close()
    print(f"trained {summary['step']} steps in {time.perf_counter() - t0:.0f} s "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads); run folder {out}")
    print_training_summary(summary)
    probe = summary.get("probe") or {}
    if before:
        print(f"same probe on the untrained encoder: R^2 position {before['r2_position']:.3f}, "
              f"velocity {before['r2_velocity']:.3f}")
    ok = probe.get("r2_position", 0.0) >= 0.9
    print(f"position probe {'PASSES' if ok else 'MISSES'} the R^2 >= 0.9 target", flush=True)
    print(f"(I-JEPA section: {time.perf_counter() - t0:.0f} s)", flush=True)

    print("\n== Action-conditioned world model ==", flush=True)
    wm_ok = world_model_section(os.path.join(out, "wm"))

    print("\n== Planner vs token-by-token decoding (quick profile) ==", flush=True)
    if wm_ok:
        t0 = time.perf_counter()
        for line in demo_profile(os.path.join(out, "wm"), os.path.join(out, "profile")):
            print(line, flush=True)
        print(f"(profile section: {time.perf_counter() - t0:.0f} s)", flush=True)
    else:
        print("skipped: no trained world model", flush=True)

    print("\n== Kernel self-check ==", flush=True)
    t0 = time.perf_counter()
    rc = selfcheck.run()
    print(f"(self-check: {time.perf_counter() - t0:.0f} s; whole demo: {time.perf_counter() - t_demo:.0f} s)",
          flush=True)
    return rc or (0 if ok and wm_ok else 1)


def world_model_section(out: str) -> bool:
    """Train the demo world model into ``out``, report its physics probe and surprise, evaluate MPC.

    Returns False only on a real failure (training or planning raised); a low success rate is reported,
    not failed: a slow machine stops training early by its time budget."""
    cfg = wm_training.WMTrainConfig.from_name(DEMO_WM_TRAIN["preset"], **DEMO_WM_TRAIN.get("overrides", {}))
    device = cfg.resolved_device()
    mc = cfg.model_config()
    print(f"training the {cfg.model!r} world model ({mc.img_size}x{mc.img_size} frames, history {mc.history}, "
          f"{mc.anti_collapse}) on the {cfg.world!r} world: {cfg.steps} steps max, budget {cfg.max_minutes:g} min, "
          f"{device}", flush=True)
    t0 = time.perf_counter()
    try:
        summary = wm_training.train_world_model(cfg, out, log=lambda msg: print(msg, flush=True),
                                                overwrite=replaces_own_run(out, cfg))
    except Exception:
        traceback.print_exc()
        print("world model: training FAILED", flush=True)
        return False
    model = summary["model"]
    print(f"trained {summary['steps']} steps in {summary['seconds']:.0f} s; checkpoint {summary['checkpoint']}",
          flush=True)
    t1 = time.perf_counter()
    physics_report(model, cfg.world_config())
    print(f"(probe and surprise: {time.perf_counter() - t1:.0f} s)", flush=True)

    mpc_cfg = MPCConfig(**DEMO_MPC)
    E = DEMO_MPC_EPISODES
    print(f"MPC with {mpc_cfg.planner.upper()}: N={mpc_cfg.samples} x I={mpc_cfg.iterations} x H={mpc_cfg.horizon} "
          f"(K={mpc_cfg.elites}, {mpc_cfg.cost} cost, {mpc_cfg.reduce} over the horizon), {E} seeded episodes "
          f"of <= {mpc_cfg.max_steps} steps planned at once", flush=True)
    t1 = time.perf_counter()
    try:
        result = MPC(model, cfg.world_config(), mpc_cfg, device=device).run(E, num_envs=E)
    except Exception:
        traceback.print_exc()
        print("world model: MPC FAILED", flush=True)
        return False
    print(result.summary())
    print(f"(MPC: {time.perf_counter() - t1:.0f} s)", flush=True)

    # Passing through a wall needs a world with one: the same model and budget on "two_rooms".
    t1 = time.perf_counter()
    wall_cfg = wm_training.WMTrainConfig.from_name(DEMO_WM_TRAIN["preset"],
                                                   **{**DEMO_WM_TRAIN.get("overrides", {}), "world": "two_rooms"})
    print(f"the same model trained on the 'two_rooms' world ({wall_cfg.steps} steps max, not saved), for the "
          f"surprise at passing through its wall:", flush=True)
    try:
        wall_model = wm_training.train_world_model(wall_cfg, None, log=None)["model"]
    except Exception:
        traceback.print_exc()
        print("world model: training FAILED", flush=True)
        return False
    physics_report(wall_model, wall_cfg.world_config(), probe=False, kinds=("wall",))
    print(f"(wall: {time.perf_counter() - t1:.0f} s; world-model section: {time.perf_counter() - t0:.0f} s)",
          flush=True)
    return True


def physics_report(model, world, probe: bool = True, kinds=None) -> None:
    """Print the physics probe and the surprise at impossible events (default: every kind the world's
    layout allows)."""
    if probe:
        print(f"physics probe (embeddings): {physics_probe(model, world, n_train=1024, n_test=512).summary()}")
    if kinds is None:
        kinds = ("teleport", "wall") if world.layout == "two_rooms" else ("teleport",)
    for kind in kinds:
        d = impossible_trajectories(world, 64, 8, kind=kind, seed=7)
        e = d["event_step"]
        normal = surprise(model, d["obs"], d["actions"])[:, e]
        odd = surprise(model, d["obs_impossible"], d["actions"])[:, e]
        print(f"surprise at a {kind}: {odd.mean():.3f} vs {normal.mean():.3f} on the same normal transition "
              f"(x{odd.mean() / normal.mean():.1f}; higher in {(odd > normal).float().mean():.0%} of 64 episodes)")


def print_training_summary(summary: dict) -> None:
    """Print a trainer's loss curve, its linear probe and its last checkpoint."""
    losses = summary["losses"]
    if losses:
        values = [v for _, v in losses]
        best = min(range(len(values)), key=values.__getitem__)
        print(f"loss: first {values[0]:.4f} (step {losses[0][0]}), last {values[-1]:.4f} (step {losses[-1][0]}), "
              f"min {values[best]:.4f} (step {losses[best][0]})")
        picks = sorted({round(i * (len(losses) - 1) / 7) for i in range(8)})
        print("loss curve: " + "  ".join(f"{losses[i][0]}:{losses[i][1]:.4f}" for i in picks))
    if summary.get("probe"):
        p = summary["probe"]
        print(f"linear probe (held out): R^2 position {p['r2_position']:.3f}, velocity {p['r2_velocity']:.3f} "
              f"({', '.join(f'{k} {v:.3f}' for k, v in p['r2'].items())})")
    print(f"checkpoint: {summary['checkpoint']}")


def demo_decoder(wm, world, out_dir: Path, device: torch.device, horizon: int, steps: int = DEMO_DECODER_STEPS,
                 max_seconds: float = DEMO_DECODER_MAX_SECONDS, seed: int = 0,
                 log: Optional[Callable[[str], None]] = None):
    """The decoder matched to `wm` (parameters, frames, horizon), loaded from `out_dir` when a checkpoint
    with the same config is there, else trained by imitation and saved there. Returns (model, state).

    The recipe (`comparison.models.DECODER_IMITATION`): labels from the expert's position-only law (a frame shows no
    velocity, see `expert_examples`), states visited with noise 0.5 injected into the expert's actions
    (DART-style: behaviour cloning drifts off the expert's straight paths, and noise 0.1 leaves those
    states unseen), the world model's
    fixed sin-cos patch positions on the prompt, and depth >= 2 (`DecoderConfig.matched`).
    """
    dcfg = DecoderConfig.matched(num_params(wm), image_size=world.image_size, channels=world.channels, horizon=horizon)
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
    cfg = ProfileConfig.create(quick=True, **{"preset": "demo", **overrides, "out": str(out),
                                              "wm_checkpoint": wm_checkpoint, "progress": progress})
    device = cfg.resolved_device()
    wm, wm_train = wm_training.load_world_model(wm_checkpoint, device=device)
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
        out.append(f"decoder ({dec['name']}, {dec['tokens_per_decision']} tokens): {fmt_ms(dec['latency_s'])} ms per "
                   f"decision (p90 {fmt_ms(dec['latency_p90_s'])}), {success(dec)}")
    for p in planners:
        ratio = f", {p['latency_s'] / dec['latency_s']:.3g}x the decoder's latency" if dec is not None else ""
        out.append(f"planner {p['name']}: {fmt_ms(p['latency_s'])} ms per decision (p90 {fmt_ms(p['latency_p90_s'])})"
                   f"{ratio}, {success(p)}")
    out.append(f"same {cfg['decisions']} seeded (start, goal) pairs, <= {cfg['max_steps']} steps each; "
               f"energy: {report['energy']['status']}")
    out.append(f"wrote {Path(cfg['out']) / 'profile.json'}, profile.md, profile.png in {report['seconds']:.0f} s")
    return out
