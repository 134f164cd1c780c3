"""Command line: ``jepa-engine <command>`` (also ``python -m jepa_engine <command>``)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from jepa_engine.cli_args import Parser, int_at_least, known_device, number_at_least, option_hint
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
def _error(command: str, message: str) -> int:
    print(f"jepa-engine {command}: error: {message}", file=sys.stderr)
    return 2


def _is_input_error(e: BaseException) -> bool:
    """A bad config (unknown field, preset or file) or a missing / damaged checkpoint, from any command."""
    from jepa_engine.training.checkpoint import CheckpointError
    from jepa_engine.training.trajectory_data import TrajectoryDatasetError

    return isinstance(e, (ConfigError, CheckpointError, TrajectoryDatasetError))


def _audit(args: argparse.Namespace) -> int:
    # The audit compiles real kernels: it runs in a process that does not interpret Triton.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run([sys.executable, "-m", "jepa_engine.kernels.audit"], env=env).returncode


def _selfcheck(args: argparse.Namespace) -> int:
    from jepa_engine import selfcheck

    return selfcheck.run()


def _ledger(args: argparse.Namespace) -> int:
    from jepa_engine import ledger

    if args.group is not None and args.group not in ledger.GROUPS:
        return _error("ledger", f"argument --group: must be one of {', '.join(ledger.GROUPS)}, got {args.group!r}")
    return ledger.run(args.group, args.json)


def _run_config(args: argparse.Namespace, config_class, fallback: str | None):
    """The run's config: ``--config``, else (with ``--resume``) the run folder's own ``config.json``, else
    ``fallback``; ``--steps``/``--device`` override it. ``--resume`` needs a checkpoint in ``--out``, with or
    without ``--config``. Every failure is an input error (one line and status 2, from :func:`main`)."""
    from jepa_engine.training.checkpoint import resume_checkpoint

    if args.resume:
        resume_checkpoint(args.out, verify=False)
    config = args.config
    if config is None:
        saved = os.path.join(args.out, "config.json")
        config = saved if args.resume and os.path.isfile(saved) else fallback
        if config is None:
            raise ConfigError(f"--config is required (a preset or a JSON file) unless --resume finds {saved}")
    overrides = {k: v for k, v in (("steps", args.steps), ("device", args.device)) if v is not None}
    try:
        return config_class.load(config, **overrides)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _train(args: argparse.Namespace) -> int:
    from jepa_engine import demo
    from jepa_engine.training.ijepa import NonFiniteLossError, TrainConfig, Trainer

    trainer = Trainer(_run_config(args, TrainConfig, fallback=None), args.out, resume=args.resume,
                      overwrite=args.overwrite)
    try:
        summary = trainer.fit()
    except KeyboardInterrupt:
        return 130
    except NonFiniteLossError as e:
        print(f"jepa-engine train: {e}", file=sys.stderr)
        return 1
    finally:
        trainer.close()
    demo.print_training_summary(summary)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from jepa_engine import demo

    return demo.run(args.out)


def _train_wm(args: argparse.Namespace) -> int:
    from jepa_engine import demo
    from jepa_engine.training import trajectory_data
    from jepa_engine.training.world_model import WMTrainConfig, train_world_model

    fallback = "demo"
    if args.data is not None:       # --data: the env's preset unless --config, the dataset's shapes
        try:
            env_id = trajectory_data.read_manifest(args.data)["env_id"]
        except trajectory_data.TrajectoryDatasetError as e:
            return _error("train-wm", f"argument --data: {e}")
        fallback = trajectory_data.preset_for_env(env_id)
    cfg = _run_config(args, WMTrainConfig, fallback=fallback)
    if args.data is not None:
        try:
            cfg = trajectory_data.config_for_dataset(cfg, args.data)
        except trajectory_data.TrajectoryDatasetError as e:
            return _error("train-wm", f"argument --data: {e}")
    if cfg.data:
        print(f"data: {trajectory_data.summary_line(trajectory_data.read_manifest(cfg.data))}", flush=True)
    try:
        summary = train_world_model(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    except KeyboardInterrupt:
        return 130
    resumed = f" (resumed at step {summary['resumed_from']})" if summary.get("resumed_from") is not None else ""
    print(f"trained {summary['steps']} steps{resumed} in {summary['seconds']:.0f} s; "
          f"checkpoint {summary['checkpoint']}")
    if not args.no_report and not cfg.data:     # the probes read the built-in world's states
        demo.physics_report(summary["model"], cfg.world_config())
    return 0


def _collect(args: argparse.Namespace) -> int:
    try:
        from jepa_engine.integrations import swm_data
    except ImportError as e:
        return _error("collect", f"needs stable-worldmodel ({e}); install it with `make envs`")
    try:
        swm_data.collect(args.env, args.policy, args.episodes, args.steps, args.out, size=args.size, seed=args.seed,
                         num_envs=args.num_envs, shard_episodes=args.shard_episodes, workers=args.workers,
                         progress=not args.no_progress)
    except ImportError as e:
        return _error("collect", f"{args.env} needs a package that is not installed ({e}); `make envs` installs "
                                 f"stable-worldmodel and its environments' dependencies")
    except swm_data.CollectError as e:
        name, _, rest = str(e).partition(" ")          # "<argument> must be ..., got ..."
        return _error("collect", f"argument --{name.replace('_', '-')}: {rest}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from jepa_engine.evaluation.mpc import MPC, MPCConfig
    from jepa_engine.kernels.precision import default_precision
    from jepa_engine.runtime import resolved_device
    from jepa_engine.training.checkpoint import CheckpointError
    from jepa_engine.training.world_model import load_world_model

    device = resolved_device(args.device or "auto")
    # The search budget: what was given, the rest from the device's default for this planner.
    defaults = PLAN_BUDGETS[("cuda" if device.type == "cuda" else "cpu", args.planner)]
    given = {k: getattr(args, k) for k in defaults if getattr(args, k) is not None}
    budget = {**defaults, **given}
    if args.elites is not None and args.elites > budget["samples"]:
        return _error("plan", f"argument --elites: must be <= --samples = {budget['samples']}, got {args.elites}")
    num_envs = args.num_envs if args.num_envs is not None else min(args.episodes, PLAN_NUM_ENVS)
    try:
        mpc_cfg = MPCConfig(planner=args.planner, horizon=args.horizon, elites=args.elites, cost=args.cost,
                            reduce=args.reduce, seed=args.seed, precision=args.precision, **budget)
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
          f"once; {device}, precision {mpc_cfg.precision or default_precision(device)}", flush=True)
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


def _export(args: argparse.Namespace) -> int:
    from jepa_engine.evaluation.mpc import default_elites
    from jepa_engine.integrations.export import ExportError, export_decision
    from jepa_engine.planning import PlannerConfig
    from jepa_engine.training.checkpoint import CheckpointError
    from jepa_engine.training.world_model import load_world_model

    elites = args.elites if args.elites is not None else default_elites(args.samples)
    if elites > args.samples:
        return _error("export", f"argument --elites: must be <= --samples = {args.samples}, got {elites}")
    if not args.out.endswith(".pt2"):
        return _error("export", f"argument --out: must be a .pt2 file name, got {args.out!r}")
    try:
        model, _ = load_world_model(args.checkpoint, device="cpu")
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        return _error("export", f"argument --checkpoint: {e}")
    config = PlannerConfig(horizon=args.horizon, action_dim=model.cfg.action_dim, samples=args.samples,
                           iterations=args.iterations, elites=elites, seed=args.seed)
    print(f"exporting the decision step: {args.planner} N={args.samples} x I={args.iterations} (K={elites}), "
          f"horizon {args.horizon}, {args.num_envs} env(s), seed {args.seed}; AOTInductor for {args.device}",
          flush=True)
    try:
        report = export_decision(model, config, args.out, mode=args.planner, num_envs=args.num_envs, cost=args.cost,
                                 reduce=args.reduce, device=args.device, histories=args.histories)
    except ExportError as e:
        return _error("export", str(e))
    shapes = ", ".join(f"{k.rsplit('.', 1)[1]} [{v}]" for k, v in report.meta.items()
                       if k.startswith("jepa_engine.input."))
    print(f"wrote {report.path}: export {report.export_s:.1f} s, compile {report.compile_s:.1f} s; inputs {shapes}; "
          f"history lengths {report.meta['jepa_engine.histories']}")
    return 0


def _profile(args: argparse.Namespace) -> int:
    from jepa_engine.comparison import ProfileConfig, run_profile, summary_lines

    given = {k: getattr(args, k) for k in ("preset", "out", "wm_checkpoint", "decoder_checkpoint", "budget_minutes",
                                           "decisions", "max_steps", "reasoning_tokens", "sizes", "budgets",
                                           "energy_seconds", "trials", "timing_seconds", "device", "seed",
                                           "success_max_evals", "precision") if getattr(args, k) is not None}
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


def _eval(args: argparse.Namespace) -> int:
    from jepa_engine.runtime import resolved_device
    from jepa_engine.training.checkpoint import CheckpointError

    try:
        from jepa_engine.integrations import swm_eval
        swm_eval.require_swm()
    except ImportError as e:
        return _error("eval", f"needs stable-worldmodel ({e}); install it with `make envs`")
    given = {k: getattr(args, k) for k in ("planner", "episodes", "goal_offset", "eval_budget", "horizon", "receding",
                                           "action_block", "samples", "iterations", "elites", "batch_size", "seed",
                                           "precision")}
    try:
        cfg = swm_eval.EvalConfig(env=args.env, baselines=not args.no_baselines,
                                  **{k: v for k, v in given.items() if v is not None})
        report, paths = swm_eval.run_eval(args.checkpoint, cfg, data=args.data, out=args.out,
                                          device=resolved_device(args.device or "cpu"))
    except CheckpointError as e:
        return _error("eval", f"argument --checkpoint: {e}")
    except (ValueError, KeyError) as e:
        return _error("eval", str(e).strip("'\""))
    print(swm_eval.markdown(report), end="")
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


def _gpu_report(args: argparse.Namespace) -> int:
    from jepa_engine import gpu_report

    return gpu_report.run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="jepa-engine", description="Fused Triton kernels and a fast JEPA engine.")
    sub = ap.add_subparsers(dest="command", required=True)
    ap.commands = sub.choices          # name -> subparser (its options for the did-you-mean of a typo)
    demo = sub.add_parser("demo", help="train a tiny JEPA on the built-in world (CPU ok), probe it, check the kernels")
    demo.add_argument("--out", default=os.path.join("runs", "demo"), help="run folder (default: runs/demo)")
    demo.set_defaults(func=_demo)
    train = sub.add_parser("train", help="train a JEPA world model (preset or JSON config) into a run folder")
    train.add_argument("--config", help="a preset name (demo, small, base) or a JSON file")
    train.add_argument("--out", required=True, help="run folder: config.json, metrics.jsonl, checkpoints")
    train.add_argument("--steps", type=int_at_least(1), help="override the total number of steps")
    train.add_argument("--device", type=known_device, help="override the device (cpu, cuda, cuda:1)")
    train_start = train.add_mutually_exclusive_group()
    train_start.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    train_start.add_argument("--overwrite", action="store_true",
                             help="delete the checkpoints already in --out and start afresh (without it, a fresh "
                                  "run into a folder that holds checkpoints stops with an error)")
    train.set_defaults(func=_train)
    twm = sub.add_parser("train-wm", help="train the action-conditioned world model (preset or JSON config)")
    twm.add_argument("--config", help="a preset name (demo, test, lewm) or a JSON file (default: demo, or with "
                     "--resume the run folder's config.json)")
    twm.add_argument("--out", default=os.path.join("runs", "wm"), help="run folder (default: runs/wm)")
    twm.add_argument("--steps", type=int_at_least(1), help="override the number of steps")
    twm.add_argument("--device", type=known_device, help="override the device (cpu, cuda, cuda:1)")
    twm_start = twm.add_mutually_exclusive_group()
    twm_start.add_argument("--resume", action="store_true", help="continue exactly from the newest checkpoint in --out")
    twm_start.add_argument("--overwrite", action="store_true",
                           help="delete the checkpoints already in --out and start afresh (without it, a fresh run "
                                "into a folder that holds checkpoints stops with an error)")
    twm.add_argument("--no-report", action="store_true", help="skip the physics probe / surprise report")
    twm.add_argument("--data", help="train on a dataset folder written by `collect` (streamed from disk; frame size "
                     "and action dim from its manifest; default config: the env's preset) instead of the built-in "
                     "world")
    twm.set_defaults(func=_train_wm)
    col = sub.add_parser("collect", help="roll a policy in a stable-worldmodel env into an on-disk trajectory dataset")
    col.add_argument("--env", required=True, help="environment id, e.g. swm/TwoRoom-v1, swm/PushT-v1, "
                                                  "swm/ReacherDMControl-v0")
    col.add_argument("--policy", default="random", help="expert (TwoRoom), weak (PushT) or random (default)")
    col.add_argument("--episodes", type=int_at_least(1), required=True, help="episodes to collect")
    col.add_argument("--steps", type=int_at_least(1), default=100,
                     help="transitions per episode at most; an episode also ends when the env terminates (default 100)")
    col.add_argument("--out", required=True, help="dataset folder (an interrupted collection resumes there)")
    col.add_argument("--size", type=int_at_least(8), default=64, help="frame height and width (default 64)")
    col.add_argument("--seed", type=int_at_least(0), default=0, help="episode e is reset with seed + e (default 0)")
    col.add_argument("--num-envs", type=int_at_least(1), default=4, help="envs stepped together (default 4)")
    col.add_argument("--shard-episodes", type=int_at_least(0), default=0,
                     help="episodes per shard (default 0: about 128 MiB of frames per shard)")
    col.add_argument("--workers", type=int_at_least(1), default=1,
                     help="shards collected at once in worker processes (the same data; default 1)")
    col.add_argument("--no-progress", action="store_true", help="no progress bar")
    col.set_defaults(func=_collect)
    plan = sub.add_parser("plan", help="MPC in the built-in world with a trained world model")
    plan.add_argument("--checkpoint", required=True, help="a world-model checkpoint (JSON file) or run folder")
    plan.add_argument("--planner", default="cem", choices=("cem", "mppi", "gradient"))
    plan.add_argument("--episodes", type=int_at_least(1), default=8, help="seeded episodes (default 8)")
    plan.add_argument("--num-envs", type=int_at_least(1),
                      help=f"episodes planned at once, batched (default: all, at most {PLAN_NUM_ENVS})")
    budgets = ", ".join(f"{p} {b['samples']}x{b['iterations']}" for (d, p), b in PLAN_BUDGETS.items() if d == "cpu")
    plan.add_argument("--samples", type=int_at_least(1),
                      help="N candidates per iteration (restarts for the gradient planner); default by device: "
                           f"CUDA 300x30 for every planner (LeWorldModel's budget), CPU {budgets} (N x I)")
    plan.add_argument("--iterations", type=int_at_least(1),
                      help="I iterations (Adam steps for the gradient planner); default by device, see --samples")
    plan.add_argument("--elites", type=int_at_least(1), help="K elites of CEM (default: 10%% of --samples, "
                                                              "at least 2, at most --samples)")
    plan.add_argument("--horizon", type=int_at_least(1), default=5)
    plan.add_argument("--cost", default="l2", choices=("l1", "l2"))
    plan.add_argument("--reduce", default="final", choices=("final", "sum"))
    plan.add_argument("--max-steps", type=int_at_least(1),
                      help="control steps per episode (default: 60 on CUDA, 40 on the CPU)")
    plan.add_argument("--seed", type=int_at_least(0), default=0)
    plan.add_argument("--precision", choices=("fp32", "tf32", "bf16"),
                      help="the planning rollout's products: fp32, tf32 (tensor cores on CUDA, emulated on the CPU) "
                           "or bf16 (default: tf32 on CUDA, fp32 on the CPU)")
    plan.add_argument("--device", type=known_device, help="cpu, cuda, cuda:1 (default: cuda if available)")
    plan.add_argument("--no-progress", action="store_true", help="no progress bar")
    plan.set_defaults(func=_plan)
    exp = sub.add_parser("export", help="a world model's decision step (encode, plan) as an AOTInductor package "
                                        "for the C++ runner jepa_plan")
    exp.add_argument("--checkpoint", required=True, help="a world-model checkpoint (JSON file) or run folder")
    exp.add_argument("--out", required=True, help="the package to write (.pt2)")
    exp.add_argument("--planner", default="cem", choices=("cem", "mppi"))
    exp.add_argument("--samples", type=int_at_least(1), default=300, help="N candidates per iteration (default 300)")
    exp.add_argument("--iterations", type=int_at_least(1), default=30, help="I iterations (default 30)")
    exp.add_argument("--horizon", type=int_at_least(1), default=5)
    exp.add_argument("--elites", type=int_at_least(1), help="K elites of CEM (default: 10%% of --samples, "
                                                             "at least 2, at most --samples)")
    exp.add_argument("--cost", default="l2", choices=("l1", "l2"))
    exp.add_argument("--reduce", default="final", choices=("final", "sum"))
    exp.add_argument("--num-envs", type=int_at_least(1), default=1, help="environments per decision (default 1)")
    exp.add_argument("--seed", type=int_at_least(0), default=0, help="the planner's sampling seed (default 0)")
    exp.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                     help="the package's device (default cpu); cuda compiles the planning ops' Triton kernels into it")
    exp.add_argument("--histories", default="all", choices=("all", "full"),
                     help="all (default): one model per history length 1..T, so an episode's first decisions plan "
                          "from the frames there are, as the Python MPC does; full: the T-frame model only (1/T of "
                          "the compile time)")
    exp.set_defaults(func=_export)
    prof = sub.add_parser("profile", help="JEPA planner vs token-by-token decoding: latency, energy, FLOPs, success")
    prof.add_argument("--quick", action="store_true",
                      help="a short run (well under a minute on 2 CPU cores with trained checkpoints): budgets "
                           "cem:64x5,mppi:32x3, L 0,64, sizes 1x,10x, 16 decisions, no compiled form, 0.1 s timing "
                           "windows, 1 energy trial, --budget-minutes 1.5; options given explicitly still apply")
    prof.add_argument("--preset", help="tiny (default), demo, or lewm (an untrained ~15M pair, timing only)")
    prof.add_argument("--out", help="run folder (default: runs/profile)")
    prof.add_argument("--wm-checkpoint", help="a trained world-model checkpoint (file or run folder)")
    prof.add_argument("--decoder-checkpoint", help="a trained decoder checkpoint (file or run folder)")
    prof.add_argument("--budget-minutes", type=number_at_least(0.0),
                      help="training time for models not given as checkpoints (0: untrained, timing only; default 3)")
    prof.add_argument("--decisions", type=int_at_least(1), help="seeded (start, goal) pairs (default 8)")
    prof.add_argument("--max-steps", type=int_at_least(1), help="control steps per success episode (default 40)")
    prof.add_argument("--reasoning-tokens", help="L sweep, comma-separated (default 0,64,256,1024)")
    prof.add_argument("--sizes", help="decoder size sweep, factors of the world model's size (default 1x,10x,100x)")
    prof.add_argument("--budgets", help="planner budgets PLANNER:NxI[:cold], comma-separated; the first is the "
                                        "reference (default cem:300x30,cem:100x10,cem:64x5,cem:64x5:cold,"
                                        "mppi:100x10,cem:32x3)")
    prof.add_argument("--no-compile", action="store_true", help="skip the compiled static-cache decoder form")
    prof.add_argument("--compile", action="store_true",
                      help="include the compiled static-cache decoder form (on by default, off with --quick)")
    prof.add_argument("--no-energy", action="store_true", help="skip energy measurement")
    prof.add_argument("--precision", choices=("fp32", "tf32", "bf16"),
                      help="the planners' rollout products (default: tf32 on CUDA, fp32 on the CPU); the eager "
                           "planner form and the decoders run at torch's default fp32")
    prof.add_argument("--energy-seconds", type=number_at_least(0.0, strict=True),
                      help="shortest energy window per trial (default 2)")
    prof.add_argument("--trials", type=int_at_least(1), help="energy trials per row (default 3)")
    prof.add_argument("--timing-seconds", type=number_at_least(0.0, strict=True),
                      help="time each latency row at least this long (default 0.5)")
    prof.add_argument("--device", type=known_device, help="cpu, cuda, cuda:1 (default: cuda if available)")
    prof.add_argument("--seed", type=int_at_least(0))
    prof.add_argument("--no-progress", action="store_true", help="no progress bar")
    prof.add_argument("--success-max-evals", type=int_at_least(-1),
                      help="measure success only for budgets with samples x iterations <= this "
                           "(default -1: auto = all on CUDA, 2000 on CPU)")
    prof.set_defaults(func=_profile)
    ev = sub.add_parser("eval", help="LeWorldModel's protocol in a stable-worldmodel env (World.evaluate): success, "
                        "plan latency, random and dataset-replay baselines")
    ev.add_argument("--env", required=True, help="environment id: swm/TwoRoom-v1, swm/PushT-v1, swm/ReacherDMControl-v0")
    ev.add_argument("--checkpoint", required=True, help="a world-model checkpoint (JSON file) or run folder")
    ev.add_argument("--data", help="dataset folder written by `collect` (default: the one the model was trained on)")
    ev.add_argument("--planner", choices=("cem", "mppi"), help="default cem")
    ev.add_argument("--episodes", type=int_at_least(1), help="(start, goal) pairs from the dataset (default 50)")
    ev.add_argument("--goal-offset", type=int_at_least(1), help="env steps from start to goal (default 25)")
    ev.add_argument("--eval-budget", type=int_at_least(1), help="env steps to reach the goal (default 50)")
    ev.add_argument("--horizon", type=int_at_least(1), help="model steps planned (default 5)")
    ev.add_argument("--receding", type=int_at_least(1), help="model steps executed per plan (default 5)")
    ev.add_argument("--action-block", type=int_at_least(1), help="env steps per model step (default: the checkpoint's)")
    ev.add_argument("--samples", type=int_at_least(1), help="N candidates per iteration (default 300)")
    ev.add_argument("--iterations", type=int_at_least(1), help="I iterations (default 30)")
    ev.add_argument("--elites", type=int_at_least(1), help="K elites of CEM (default 30)")
    ev.add_argument("--batch-size", type=int_at_least(1), help="environments planned at once (default: all)")
    ev.add_argument("--seed", type=int_at_least(0), help="draws the (start, goal) pairs and the planner (default 42)")
    ev.add_argument("--precision", choices=("fp32", "tf32", "bf16"),
                    help="the planner's rollout products (default: tf32 on CUDA, fp32 on the CPU)")
    ev.add_argument("--out", help="report folder (default: the run folder's eval/)")
    ev.add_argument("--device", type=known_device, help="cpu (default), cuda, cuda:1")
    ev.add_argument("--no-baselines", action="store_true", help="skip the random and dataset-replay rows")
    ev.set_defaults(func=_eval)
    sub.add_parser("audit", help="compile every kernel for sm_90a/sm_80, print registers/spills/smem").set_defaults(
        func=_audit)
    sub.add_parser("selfcheck", help="each kernel against its PyTorch reference").set_defaults(func=_selfcheck)
    led = sub.add_parser("ledger", help="per benchmark group and kernel: launched vs useful FLOPs, bytes, H100 roofline")
    led.add_argument("--group", help="one group (planning, cem, masked_attention, encoders, ema, latent_loss, train)")
    led.add_argument("--json", action="store_true", help="print JSON")
    led.set_defaults(func=_ledger)
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
            command.error("unrecognized arguments: " + " ".join(extra) + option_hint(extra, command.options))
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
