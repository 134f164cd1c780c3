"""Command line: ``jepa-engine <command>`` (also ``python -m jepa_engine <command>``)."""
from __future__ import annotations

import argparse
import difflib
import math
import os
import re
import subprocess
import sys

from jepa_engine.config import ConfigError

# `plan`'s search budget when not given: samples N (restarts for the gradient planner), iterations I
# (Adam steps) and control steps per episode, by device type and planner. CUDA: LeWorldModel's budget,
# 300 x 30 over 60 steps. CPU: an episode in seconds. Measured on a shared 2-core machine, one thread,
# the 32x32 world model trained 150 steps, 16 seeded episodes 8 at once: CEM 64 x 5 reached 12/16 goals
# in 20 s, CEM 300 x 30 10/16 in 560 s, MPPI 64 x 5 11/16 in 39 s, the gradient planner 4 x 5 13/16 in
# 10 s (8 x 10: 10/16 in 23 s; 16 x 20: 12/16 in 194 s). The 64x64 demo model: CEM 64 x 5 about 60 ms of
# CPU per control step, 300 x 30 about 0.9 s (a minute per 60-step episode).
PLAN_BUDGETS: dict[tuple[str, str], dict[str, int]] = {
    ("cuda", "cem"): dict(samples=300, iterations=30, max_steps=60),
    ("cuda", "mppi"): dict(samples=300, iterations=30, max_steps=60),
    ("cuda", "gradient"): dict(samples=300, iterations=30, max_steps=60),
    ("cpu", "cem"): dict(samples=64, iterations=5, max_steps=40),
    ("cpu", "mppi"): dict(samples=64, iterations=5, max_steps=40),
    ("cpu", "gradient"): dict(samples=4, iterations=5, max_steps=40),
}
PLAN_NUM_ENVS = 8   # `plan` runs up to this many episodes at once (batched) unless --num-envs says otherwise


# ---- errors: one line on stderr, exit status 2 (as argparse's own)
class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) that suggest the closest option, command or choice."""

    def __init__(self, *args, **kwargs):
        self.options: list[str] = []   # every option string, for the did-you-mean of an unknown one
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        self.options.extend(action.option_strings)
        return action

    def error(self, message: str):
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if m and "maybe you meant" not in message:
            choices = [c.strip().strip("'\"") for c in m.group(2).split(",")]
            close = difflib.get_close_matches(m.group(1), choices, n=1)
            message += f" (did you mean {close[0]!r}?)" if close else ""
        self.exit(2, f"{self.prog}: error: {message}\n")


def _option_hint(extra: list[str], options: list[str]) -> str:
    """`` (did you mean --samples?)`` for the first unknown option with a close known one."""
    for arg in extra:
        if arg.startswith("--"):
            close = difflib.get_close_matches(arg.split("=", 1)[0], options, n=1)
            if close:
                return f" (did you mean {close[0]}?)"
    return ""


def _error(command: str, message: str) -> int:
    print(f"jepa-engine {command}: error: {message}", file=sys.stderr)
    return 2


def _is_input_error(e: BaseException) -> bool:
    """A bad config (unknown field, preset or file) or a missing / damaged checkpoint, from any command."""
    from jepa_engine.training.checkpoint import CheckpointError

    return isinstance(e, (ConfigError, CheckpointError))


def _int_at_least(minimum: int):
    """An argparse type: an int >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {text!r}")
        return value

    return parse


def _number_at_least(minimum: float, strict: bool = False):
    """An argparse type: a finite number >= ``minimum`` (> with ``strict``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > minimum if strict else value >= minimum)):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>' if strict else '>='} {minimum:g}, "
                                             f"got {text!r}")
        return value

    return parse


def _device(text: str) -> str:
    """An argparse type: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, and present on this machine."""
    if text == "auto":
        return text
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"no CUDA device on this machine (torch {torch.__version__}), "
                                             f"got {text!r}")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"this machine has {count} CUDA device(s), cuda:0 .. cuda:{count - 1}, "
                                             f"got {text!r}")
    return text


def _audit(args: argparse.Namespace) -> int:
    # The audit compiles real kernels: it runs in a process that does not interpret Triton.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run([sys.executable, "-m", "jepa_engine.kernels.audit"], env=env).returncode


def _selfcheck(args: argparse.Namespace) -> int:
    from jepa_engine import selfcheck

    return selfcheck.run()


def _train(args: argparse.Namespace) -> int:
    from jepa_engine.training.checkpoint import CheckpointError, resume_checkpoint
    from jepa_engine.training.ijepa import NonFiniteLossError, TrainConfig, Trainer

    overrides = {"steps": args.steps} if args.steps is not None else {}
    if args.device is not None:
        overrides["device"] = args.device
    if args.resume:
        # --resume needs a checkpoint, with or without --config (as in train-wm).
        try:
            resume_checkpoint(args.out, verify=False)
        except CheckpointError as e:
            print(f"jepa-engine train: {e}", file=sys.stderr)
            return 2
    config = args.config
    if config is None:
        saved = os.path.join(args.out, "config.json")
        if not (args.resume and os.path.isfile(saved)):
            print("jepa-engine train: --config is required (a preset or a JSON file) unless --resume finds "
                  f"{saved}", file=sys.stderr)
            return 2
        config = saved
    try:
        cfg = TrainConfig.load(config, **overrides)
    except ValueError as e:
        print(f"jepa-engine train: {e}", file=sys.stderr)
        return 2
    try:
        trainer = Trainer(cfg, args.out, resume=args.resume)
    except CheckpointError as e:
        print(f"jepa-engine train: {e}", file=sys.stderr)
        return 2
    try:
        summary = trainer.fit()
    except KeyboardInterrupt:
        return 130
    except NonFiniteLossError as e:
        print(f"jepa-engine train: {e}", file=sys.stderr)
        return 1
    finally:
        trainer.close()
    _print_training_summary(summary)
    return 0


def _print_training_summary(summary: dict) -> None:
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


# The demo's world-model section: training (a WMTrainConfig preset with overrides; max_minutes bounds it
# on a slow machine) and the MPC evaluation (CEM, seeded episodes all planned at once). The model is the
# 32x32-frame "test" size: on 2 CPU cores it trains 300 steps in well under a minute and plans about 4x
# faster than the 64x64 "demo" model, and with rollout_weight 1.0 it reached 30/32 episodes with this
# planner (the 64x64 model: 11/16 after 300 steps, 5/16 after 600 steps at rollout_weight 0.5).
DEMO_WM_TRAIN: dict = dict(preset="test", overrides=dict(steps=300, rollout_weight=1.0, checkpoint_every=100,
                                                         log_every=50, max_minutes=1.5, device="auto"))
DEMO_MPC: dict = dict(planner="cem", samples=64, iterations=5, elites=8, horizon=5, reduce="sum", max_steps=40)
DEMO_MPC_EPISODES = 16


def _demo(args: argparse.Namespace) -> int:
    import time

    import torch

    from jepa_engine.training.ijepa import TrainConfig, Trainer

    t_demo = time.perf_counter()
    cfg = TrainConfig.from_name("demo")
    device = cfg.resolved_device()
    print(f"== Training a tiny I-JEPA on the built-in world ({device}, budget {cfg.max_minutes:g} min, "
          f"{cfg.steps} steps max) ==", flush=True)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, args.out, resume=False)
    try:
        # The same probe on the untrained encoder: what training adds over random features.
        before = trainer.run_probe() or {}
        summary = trainer.fit()
    finally:
        trainer.close()
    print(f"trained {summary['step']} steps in {time.perf_counter() - t0:.0f} s "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads); run folder {args.out}")
    _print_training_summary(summary)
    probe = summary.get("probe") or {}
    if before:
        print(f"same probe on the untrained encoder: R^2 position {before['r2_position']:.3f}, "
              f"velocity {before['r2_velocity']:.3f}")
    ok = probe.get("r2_position", 0.0) >= 0.9
    print(f"position probe {'PASSES' if ok else 'MISSES'} the R^2 >= 0.9 target", flush=True)
    print(f"(I-JEPA section: {time.perf_counter() - t0:.0f} s)", flush=True)

    print("\n== Action-conditioned world model ==", flush=True)
    wm_ok = _demo_world_model(os.path.join(args.out, "wm"))

    print("\n== Planner vs token-by-token decoding (quick profile) ==", flush=True)
    if wm_ok:
        from jepa_engine.profiling.report import demo_profile

        t0 = time.perf_counter()
        for line in demo_profile(os.path.join(args.out, "wm"), os.path.join(args.out, "profile")):
            print(line, flush=True)
        print(f"(profile section: {time.perf_counter() - t0:.0f} s)", flush=True)
    else:
        print("skipped: no trained world model", flush=True)

    print("\n== Kernel self-check ==", flush=True)
    t0 = time.perf_counter()
    rc = _selfcheck(args)
    print(f"(self-check: {time.perf_counter() - t0:.0f} s; whole demo: {time.perf_counter() - t_demo:.0f} s)",
          flush=True)
    return rc or (0 if ok and wm_ok else 1)


def _demo_world_model(out: str) -> bool:
    """Train the demo world model into ``out``, report its physics probe and surprise, evaluate MPC.

    Returns False only on a real failure (training or planning raised); a low success rate is reported,
    not failed: a slow machine stops training early by its time budget."""
    import time
    import traceback

    from jepa_engine.evaluation.mpc import MPC, MPCConfig
    from jepa_engine.training.world_model import WMTrainConfig, train_world_model

    cfg = WMTrainConfig.from_name(DEMO_WM_TRAIN["preset"], **DEMO_WM_TRAIN.get("overrides", {}))
    device = cfg.resolved_device()
    mc = cfg.model_config()
    print(f"training the {cfg.model!r} world model ({mc.img_size}x{mc.img_size} frames, history {mc.history}, "
          f"{mc.anti_collapse}) on the {cfg.world!r} world: {cfg.steps} steps max, budget {cfg.max_minutes:g} min, "
          f"{device}", flush=True)
    t0 = time.perf_counter()
    try:
        summary = train_world_model(cfg, out, log=lambda msg: print(msg, flush=True))
    except Exception:
        traceback.print_exc()
        print("world model: training FAILED", flush=True)
        return False
    model = summary["model"]
    print(f"trained {summary['steps']} steps in {summary['seconds']:.0f} s; checkpoint {summary['checkpoint']}",
          flush=True)
    t1 = time.perf_counter()
    _physics_report(model, cfg.world_config())
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
    wall_cfg = WMTrainConfig.from_name(DEMO_WM_TRAIN["preset"], **{**DEMO_WM_TRAIN.get("overrides", {}),
                                                                    "world": "two_rooms"})
    print(f"the same model trained on the 'two_rooms' world ({wall_cfg.steps} steps max, not saved), for the "
          f"surprise at passing through its wall:", flush=True)
    try:
        wall_model = train_world_model(wall_cfg, None, log=None)["model"]
    except Exception:
        traceback.print_exc()
        print("world model: training FAILED", flush=True)
        return False
    _physics_report(wall_model, wall_cfg.world_config(), probe=False, kinds=("wall",))
    print(f"(wall: {time.perf_counter() - t1:.0f} s; world-model section: {time.perf_counter() - t0:.0f} s)",
          flush=True)
    return True


def _train_wm(args: argparse.Namespace) -> int:
    from jepa_engine.training.checkpoint import CheckpointError, resume_checkpoint
    from jepa_engine.training.world_model import WMTrainConfig, train_world_model

    overrides = {k: v for k, v in (("steps", args.steps), ("device", args.device)) if v is not None}
    if args.resume:
        # --resume needs a checkpoint, with or without --config (as in train).
        try:
            resume_checkpoint(args.out, verify=False)
        except CheckpointError as e:
            print(f"jepa-engine train-wm: {e}", file=sys.stderr)
            return 2
    config = args.config
    if config is None:
        # --resume without --config continues the run folder's own config (as `train` does).
        saved = os.path.join(args.out, "config.json")
        config = saved if args.resume and os.path.isfile(saved) else "demo"
    try:
        cfg = WMTrainConfig.load(config, **overrides)
    except ValueError as e:
        print(f"jepa-engine train-wm: {e}", file=sys.stderr)
        return 2
    try:
        summary = train_world_model(cfg, args.out, resume=args.resume)
    except CheckpointError as e:
        print(f"jepa-engine train-wm: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    resumed = f" (resumed at step {summary['resumed_from']})" if summary.get("resumed_from") is not None else ""
    print(f"trained {summary['steps']} steps{resumed} in {summary['seconds']:.0f} s; "
          f"checkpoint {summary['checkpoint']}")
    if not args.no_report:
        _physics_report(summary["model"], cfg.world_config())
    return 0


def _physics_report(model, world, probe: bool = True, kinds=None) -> None:
    """Print the physics probe and the surprise at impossible events (default: every kind the world's
    layout allows)."""
    from jepa_engine.evaluation.surprise import impossible_trajectories, physics_probe, surprise

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


def _plan(args: argparse.Namespace) -> int:
    import torch

    from jepa_engine.training.checkpoint import CheckpointError
    from jepa_engine.evaluation.mpc import MPC, MPCConfig
    from jepa_engine.training.world_model import load_world_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device in (None, "auto") \
        else torch.device(args.device)
    # The search budget: what was given, the rest from the device's default for this planner.
    defaults = PLAN_BUDGETS[("cuda" if device.type == "cuda" else "cpu", args.planner)]
    given = {k: getattr(args, k) for k in defaults if getattr(args, k) is not None}
    budget = {**defaults, **given}
    if args.elites is not None and args.elites > budget["samples"]:
        return _error("plan", f"argument --elites: must be <= --samples = {budget['samples']}, got {args.elites}")
    num_envs = args.num_envs if args.num_envs is not None else min(args.episodes, PLAN_NUM_ENVS)
    try:
        mpc_cfg = MPCConfig(planner=args.planner, horizon=args.horizon, elites=args.elites, cost=args.cost,
                            reduce=args.reduce, seed=args.seed, **budget)
    except ValueError as e:
        return _error("plan", str(e))
    try:
        model, cfg = load_world_model(args.checkpoint, device=device)
    except (CheckpointError, ValueError) as e:
        return _error("plan", f"--checkpoint: {e}")
    world = cfg.world_config()
    I = budget["iterations"]
    what = (f"restarts x I={I} Adam steps" if args.planner == "gradient"
            else f"samples x I={I} iterations (K={mpc_cfg.elites})")
    print(f"MPC in the {world.layout!r} world with {args.planner}: N={budget['samples']} {what}, horizon "
          f"{args.horizon}; {args.episodes} episode(s) of <= {budget['max_steps']} steps, {num_envs} planned at "
          f"once; {device}", flush=True)
    defaulted = [k for k in defaults if k not in given]
    if defaulted:
        other = PLAN_BUDGETS[("cpu" if device.type == "cuda" else "cuda", args.planner)]
        print(f"({', '.join('--' + k.replace('_', '-') for k in defaulted)}: the {device.type.upper()} default for "
              f"{args.planner}; on {'the CPU' if device.type == 'cuda' else 'CUDA'} {other['samples']} x "
              f"{other['iterations']}, {other['max_steps']} steps)", flush=True)
    result = MPC(model, world, mpc_cfg, device=device).run(args.episodes, num_envs=num_envs,
                                                           progress=not args.no_progress)
    print(result.summary())
    return 0


def _profile(args: argparse.Namespace) -> int:
    from jepa_engine.profiling.report import ProfileConfig, run_profile, summary_lines

    given = {k: getattr(args, k) for k in ("preset", "out", "wm_checkpoint", "decoder_checkpoint", "budget_minutes",
                                           "decisions", "max_steps", "reasoning_tokens", "sizes", "budgets",
                                           "energy_seconds", "trials", "timing_seconds", "device", "seed",
                                           "success_max_evals") if getattr(args, k) is not None}
    given.update({k: False for k, flag in (("compile", args.no_compile), ("energy", args.no_energy),
                                           ("progress", args.no_progress)) if flag})
    if args.compile:
        if args.no_compile:
            print("jepa-engine profile: --compile and --no-compile exclude each other", file=sys.stderr)
            return 2
        given["compile"] = True
    try:
        cfg = ProfileConfig.create(quick=args.quick, **given)
    except ValueError as e:
        print(f"jepa-engine profile: {e}", file=sys.stderr)
        return 2
    try:
        report = run_profile(cfg)
    except ValueError as e:
        print(f"jepa-engine profile: {e}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(report)))
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"energy: {report['energy']['status']}")
    print(f"wrote {os.path.join(cfg.out, 'profile.json')}, profile.md, profile.png in {report['seconds']:.0f} s")
    return 0


def _gpu_report(args: argparse.Namespace) -> int:
    from jepa_engine import gpu_report

    return gpu_report.run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="jepa-engine", description="Fused Triton kernels and a fast JEPA engine.")
    sub = ap.add_subparsers(dest="command", required=True)
    ap.commands = sub.choices          # name -> subparser (its options for the did-you-mean of a typo)
    demo = sub.add_parser("demo", help="train a tiny JEPA on the built-in world (CPU ok), probe it, check the kernels")
    demo.add_argument("--out", default=os.path.join("runs", "demo"), help="run folder (default: runs/demo)")
    demo.set_defaults(func=_demo)
    train = sub.add_parser("train", help="train a JEPA world model (preset or JSON config) into a run folder")
    train.add_argument("--config", help="a preset name (demo, small, base) or a JSON file")
    train.add_argument("--out", required=True, help="run folder: config.json, metrics.jsonl, checkpoints")
    train.add_argument("--steps", type=_int_at_least(1), help="override the total number of steps")
    train.add_argument("--device", type=_device, help="override the device (cpu, cuda, cuda:1)")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    train.set_defaults(func=_train)
    twm = sub.add_parser("train-wm", help="train the action-conditioned world model (preset or JSON config)")
    twm.add_argument("--config", help="a preset name (demo, test, lewm) or a JSON file (default: demo, or with "
                     "--resume the run folder's config.json)")
    twm.add_argument("--out", default=os.path.join("runs", "wm"), help="run folder (default: runs/wm)")
    twm.add_argument("--steps", type=_int_at_least(1), help="override the number of steps")
    twm.add_argument("--device", type=_device, help="override the device (cpu, cuda, cuda:1)")
    twm.add_argument("--resume", action="store_true", help="continue exactly from the newest checkpoint in --out")
    twm.add_argument("--no-report", action="store_true", help="skip the physics probe / surprise report")
    twm.set_defaults(func=_train_wm)
    plan = sub.add_parser("plan", help="MPC in the built-in world with a trained world model")
    plan.add_argument("--checkpoint", required=True, help="a world-model checkpoint (JSON file) or run folder")
    plan.add_argument("--planner", default="cem", choices=("cem", "mppi", "gradient"))
    plan.add_argument("--episodes", type=_int_at_least(1), default=8, help="seeded episodes (default 8)")
    plan.add_argument("--num-envs", type=_int_at_least(1),
                      help=f"episodes planned at once, batched (default: all, at most {PLAN_NUM_ENVS})")
    budgets = ", ".join(f"{p} {b['samples']}x{b['iterations']}" for (d, p), b in PLAN_BUDGETS.items() if d == "cpu")
    plan.add_argument("--samples", type=_int_at_least(1),
                      help="N candidates per iteration (restarts for the gradient planner); default by device: "
                           f"CUDA 300x30 for every planner (LeWorldModel's budget), CPU {budgets} (N x I)")
    plan.add_argument("--iterations", type=_int_at_least(1),
                      help="I iterations (Adam steps for the gradient planner); default by device, see --samples")
    plan.add_argument("--elites", type=_int_at_least(1), help="K elites of CEM (default: 10%% of --samples, "
                                                              "at least 2, at most --samples)")
    plan.add_argument("--horizon", type=_int_at_least(1), default=5)
    plan.add_argument("--cost", default="l2", choices=("l1", "l2"))
    plan.add_argument("--reduce", default="final", choices=("final", "sum"))
    plan.add_argument("--max-steps", type=_int_at_least(1),
                      help="control steps per episode (default: 60 on CUDA, 40 on the CPU)")
    plan.add_argument("--seed", type=_int_at_least(0), default=0)
    plan.add_argument("--device", type=_device, help="cpu, cuda, cuda:1 (default: cuda if available)")
    plan.add_argument("--no-progress", action="store_true", help="no progress bar")
    plan.set_defaults(func=_plan)
    prof = sub.add_parser("profile", help="JEPA planner vs token-by-token decoding: latency, energy, FLOPs, success")
    prof.add_argument("--quick", action="store_true",
                      help="a short run (well under a minute on 2 CPU cores with trained checkpoints): budgets "
                           "cem:64x5,mppi:32x3, L 0,64, sizes 1x,10x, 16 decisions, no compiled form, 0.1 s timing "
                           "windows, 1 energy trial, --budget-minutes 1.5; options given explicitly still apply")
    prof.add_argument("--preset", help="tiny (default), demo, or lewm (an untrained ~15M pair, timing only)")
    prof.add_argument("--out", help="run folder (default: runs/profile)")
    prof.add_argument("--wm-checkpoint", help="a trained world-model checkpoint (file or run folder)")
    prof.add_argument("--decoder-checkpoint", help="a trained decoder checkpoint (file or run folder)")
    prof.add_argument("--budget-minutes", type=_number_at_least(0.0),
                      help="training time for models not given as checkpoints (0: untrained, timing only; default 3)")
    prof.add_argument("--decisions", type=_int_at_least(1), help="seeded (start, goal) pairs (default 8)")
    prof.add_argument("--max-steps", type=_int_at_least(1), help="control steps per success episode (default 40)")
    prof.add_argument("--reasoning-tokens", help="L sweep, comma-separated (default 0,64,256,1024)")
    prof.add_argument("--sizes", help="decoder size sweep, factors of the world model's size (default 1x,10x,100x)")
    prof.add_argument("--budgets", help="planner budgets PLANNER:NxI[:cold], comma-separated; the first is the "
                                        "reference (default cem:300x30,cem:100x10,cem:64x5,cem:64x5:cold,"
                                        "mppi:100x10,cem:32x3)")
    prof.add_argument("--no-compile", action="store_true", help="skip the compiled static-cache decoder form")
    prof.add_argument("--compile", action="store_true",
                      help="include the compiled static-cache decoder form (on by default, off with --quick)")
    prof.add_argument("--no-energy", action="store_true", help="skip energy measurement")
    prof.add_argument("--energy-seconds", type=_number_at_least(0.0, strict=True),
                      help="shortest energy window per trial (default 2)")
    prof.add_argument("--trials", type=_int_at_least(1), help="energy trials per row (default 3)")
    prof.add_argument("--timing-seconds", type=_number_at_least(0.0, strict=True),
                      help="time each latency row at least this long (default 0.5)")
    prof.add_argument("--device", type=_device, help="cpu, cuda, cuda:1 (default: cuda if available)")
    prof.add_argument("--seed", type=_int_at_least(0))
    prof.add_argument("--no-progress", action="store_true", help="no progress bar")
    prof.add_argument("--success-max-evals", type=_int_at_least(-1),
                      help="measure success only for budgets with samples x iterations <= this "
                           "(default -1: auto = all on CUDA, 2000 on CPU)")
    prof.set_defaults(func=_profile)
    sub.add_parser("audit", help="compile every kernel for sm_90a/sm_80, print registers/spills/smem").set_defaults(
        func=_audit)
    sub.add_parser("selfcheck", help="each kernel against its PyTorch reference").set_defaults(func=_selfcheck)
    from jepa_engine import gpu_report  # standard library only: the parser stays light

    gpu = sub.add_parser("gpu-report", help="every GPU measurement in one command: facts, tests, self-check, "
                         "benchmarks, profile with energy (a short rehearsal without CUDA)")
    gpu_report.add_arguments(gpu)
    gpu.set_defaults(func=_gpu_report)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status. A usage error, a bad config and a missing or damaged
    checkpoint are one line on stderr and status 2, Ctrl-C is status 130 (the trainers first finish the
    step and write a checkpoint); anything else is a bug and keeps its traceback."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            command = parser.commands[args.command]
            command.error("unrecognized arguments: " + " ".join(extra) + _option_hint(extra, command.options))
    except SystemExit as e:            # --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else 2 * (e.code is not None)
    except KeyboardInterrupt:
        return 130
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"jepa-engine {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not _is_input_error(e):
            raise
        return _error(args.command, str(e))
