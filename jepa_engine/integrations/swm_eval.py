"""``jepa-engine eval``: LeWorldModel's evaluation protocol on stable-worldmodel's environments.

For ``episodes`` (episode, start row) pairs drawn with ``seed`` from a collected dataset (every row with
a frame ``goal_offset`` env steps later in its episode), all run at once in one ``World``::

    start  = the env set to the dataset's state at the start row        (the env's state setter)
    goal   = the dataset's frame and state goal_offset env steps later
    run    = at most eval_budget env steps;  success = the env's own `terminated` at any step

through ``World.evaluate(dataset=..., goal_offset=..., eval_budget=...)``, the same pairs for three
policies: the world model planned by :class:`~jepa_engine.integrations.stable_worldmodel.CEMSolver` /
``MPPISolver`` inside ``HistoryWorldModelPolicy`` (``WorldModelPolicy`` given the model's own history:
its last ``history`` frames ``action_block`` env steps apart and the actions between them, fewer at the
start of an episode; ``horizon`` model steps of ``action_block`` env steps, ``receding`` of them executed
before replanning), uniform random actions, and the dataset's own
actions replayed from the start row (what a perfect model of that trajectory could reach). Reported:
success rate, plan latency (median and p90 per planned batch and per environment), the planner budget;
written as JSON and markdown (atomically) into the run folder's ``eval/``.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from jepa_engine.kernels.precision import PRECISIONS, check_precision
from jepa_engine.training.checkpoint import atomic_write_text
from jepa_engine.training.world_model import load_world_model

from .stable_worldmodel import CEMSolver, MPPISolver, WorldModelCost, _history_policy_class, latency_ms, require_swm

__all__ = ["EvalConfig", "ENV_SETUP", "evaluate", "run_eval", "write_report", "sample_starts"]

SOLVERS = {"cem": CEMSolver, "mppi": MPPISolver}


def _setter(method: str, **args: str) -> dict:
    return {"method": method, "args": {k: {"value": v, "in_dataset": True} for k, v in args.items()}}


# How each env is put into a dataset row's state and given the goal's (LeWorldModel's eval configs):
# World.evaluate names the goal row's columns goal_<column>.
ENV_SETUP: dict[str, list[dict]] = {
    "swm/TwoRoom-v1": [_setter("_set_state", state="state"), _setter("_set_goal_state", goal_state="goal_state")],
    "swm/PushT-v1": [_setter("_set_state", state="state"), _setter("_set_goal_state", goal_state="goal_state")],
    "swm/ReacherDMControl-v0": [_setter("set_state", qpos="qpos", qvel="qvel"),
                                _setter("set_target_qpos", target_qpos="goal_qpos")],
}


@dataclass
class EvalConfig:
    env: str = "swm/TwoRoom-v1"
    planner: str = "cem"              # "cem" or "mppi"
    episodes: int = 50
    goal_offset: int = 25             # env steps from the start row to the goal row
    eval_budget: int = 50             # env steps to reach the goal
    horizon: int = 5                  # model steps planned
    receding: int = 5                 # model steps executed before replanning
    action_block: Optional[int] = None  # env steps per model step; None: the checkpoint's training config
    samples: int = 300
    iterations: int = 30
    elites: int = 30
    var_scale: float = 1.0
    temperature: float = 0.5
    batch_size: Optional[int] = None  # environments planned at once (None: all that replan)
    seed: int = 42
    baselines: bool = True
    precision: Optional[str] = None   # the planner's rollout: fp32, tf32, bf16 (None: tf32 on CUDA, fp32 on CPU)

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"EvalConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        if self.planner not in SOLVERS:
            raise bad("planner", f"one of {sorted(SOLVERS)}")
        for name in ("episodes", "goal_offset", "eval_budget", "horizon", "receding", "samples", "iterations",
                     "elites"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise bad(name, "an int >= 1")
        if self.receding > self.horizon:
            raise bad("receding", f"<= horizon = {self.horizon}")
        if self.elites > self.samples:
            raise bad("elites", f"<= samples = {self.samples}")
        if self.action_block is not None and not (isinstance(self.action_block, int) and self.action_block >= 1):
            raise bad("action_block", "an int >= 1 or None")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise bad("precision", f"one of {PRECISIONS} or None (the device's default)")


def sample_starts(lengths: np.ndarray, goal_offset: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` distinct (episode, start row) pairs, uniform over every row with a row ``goal_offset``
    later in its episode, drawn with ``seed``; sorted."""
    lengths = np.asarray(lengths, dtype=np.int64)
    valid = np.maximum(lengths - goal_offset, 0)                  # starts 0 .. L - goal_offset - 1
    total = int(valid.sum())
    if total < count:
        raise ValueError(f"episodes must be <= the {total} start rows with a goal {goal_offset} steps later in "
                         f"the dataset (episode lengths {lengths.min()}..{lengths.max()}), got {count}")
    flat = np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))
    bounds = np.cumsum(valid)
    ep = np.searchsorted(bounds, flat, side="right")
    start = flat - (bounds[ep] - valid[ep])
    return ep.astype(np.int64), start.astype(np.int64)


def _replay_policy(actions: np.ndarray):
    """A stable-worldmodel policy that plays ``actions [E, T, A]`` step by step (zeros after them)."""
    swm = require_swm()

    class DatasetReplay(swm.policy.BasePolicy):
        def __init__(self):
            super().__init__()
            self.type, self.t = "replay", 0

        def get_action(self, info_dict, **kwargs):
            E, T, A = actions.shape
            a = actions[:, self.t] if self.t < T else np.zeros((E, A), np.float32)
            self.t += 1
            return np.nan_to_num(a).reshape(self.env.action_space.shape).astype(np.float32)

    return DatasetReplay()


def evaluate(model, data_path, cfg: EvalConfig, device="cpu", log=print) -> dict[str, Any]:
    """Run the protocol (module docstring) for ``model`` on the dataset at ``data_path``; returns the report."""
    swm = require_swm()
    from .swm_data import TrajectoryDataset, check_env_id, swm_dataset, world_kwargs

    check_env_id(cfg.env)
    if cfg.env not in ENV_SETUP:
        raise ValueError(f"env must be one of {sorted(ENV_SETUP)} (an env whose state a dataset row can set), "
                         f"got {cfg.env!r}")
    data = TrajectoryDataset(data_path)
    if data.env_id != cfg.env:
        raise ValueError(f"the dataset must be collected in env = {cfg.env}, got {data.env_id} ({data_path})")
    env_a = data.action_dim
    block = cfg.action_block
    if block is None:
        if model.cfg.action_dim % env_a:
            raise ValueError(f"the world model's action_dim must be a multiple of the env's action dim {env_a}, got "
                             f"{model.cfg.action_dim}")
        block = model.cfg.action_dim // env_a
    if model.cfg.action_dim != env_a * block:
        raise ValueError(f"the world model's action_dim must be the env's action dim x action_block = {env_a} x "
                         f"{block} = {env_a * block}, got {model.cfg.action_dim}")
    if cfg.horizon * block > cfg.eval_budget:
        raise ValueError(f"horizon x action_block must be <= eval_budget = {cfg.eval_budget}, got {cfg.horizon} x "
                         f"{block}")
    eps, starts = sample_starts(data.lengths, cfg.goal_offset, cfg.episodes, cfg.seed)
    H, W = data.frame_size
    n = cfg.episodes
    world = swm.World(cfg.env, num_envs=n, image_shape=(H, W), max_episode_steps=2 * cfg.eval_budget,
                      **world_kwargs(cfg.env, (H, W)))
    dataset = swm_dataset(data_path)
    kwargs = dict(dataset=dataset, episodes_idx=eps.tolist(), start_steps=starts.tolist(),
                  goal_offset=cfg.goal_offset, eval_budget=cfg.eval_budget, callables=ENV_SETUP[cfg.env])
    rows = []

    def run(name: str, policy, **extra) -> dict:
        world.set_policy(policy)
        t0 = time.perf_counter()
        res = world.evaluate(**kwargs)
        wall = time.perf_counter() - t0
        ok = np.asarray(res["episode_successes"], dtype=bool)
        row = {"policy": name, "success_rate": float(ok.mean()), "successes": int(ok.sum()), "episodes": int(n),
               "wall_s": round(wall, 3), **extra}
        rows.append(row)
        if log:
            log(f"{name}: {row['successes']}/{n} = {row['success_rate']:.0%} in {wall:.1f} s")
        return row

    try:
        cost = WorldModelCost(model.to(device), precision=cfg.precision)
        Solver = SOLVERS[cfg.planner]
        solver = Solver(cost, batch_size=cfg.batch_size, num_samples=cfg.samples, var_scale=cfg.var_scale,
                        n_steps=cfg.iterations, topk=cfg.elites, temperature=cfg.temperature, device=device,
                        seed=cfg.seed)
        plan = swm.PlanConfig(horizon=cfg.horizon, receding_horizon=cfg.receding, action_block=block,
                              history_len=model.cfg.history)
        with torch.no_grad():
            row = run(f"jepa {cfg.planner} {cfg.samples}x{cfg.iterations}",
                      _history_policy_class()(solver=solver, config=plan))
        lat = latency_ms(solver.timings)
        row["plan_ms"] = lat
        row["plan_ms_per_env"] = {k: (lat[k] / lat["envs_per_plan"] if lat["plans"] else float("nan"))
                                  for k in ("median", "p90")}
        if cfg.baselines:
            run("random actions", swm.policy.RandomPolicy(seed=cfg.seed))
            acts = np.zeros((n, cfg.eval_budget, env_a), np.float32)
            for i, (e, s) in enumerate(zip(eps, starts)):
                a = data.rows(int(e), int(s), int(min(s + cfg.eval_budget, data.lengths[e])), ["action"])["action"]
                acts[i, :len(a)] = np.nan_to_num(np.asarray(a, np.float32))
            run("dataset replay", _replay_policy(acts))
    finally:
        world.close()
    return {
        "env": cfg.env, "dataset": str(Path(data_path).resolve()), "config": asdict(cfg), "action_block": block,
        "protocol": {"episodes": n, "goal_offset": cfg.goal_offset, "eval_budget": cfg.eval_budget,
                     "frame_size": [H, W], "history": model.cfg.history,
                     "starts": [[int(e), int(s)] for e, s in zip(eps, starts)]},
        "budget": {"planner": cfg.planner, "samples": cfg.samples, "iterations": cfg.iterations,
                   "elites": cfg.elites, "horizon": cfg.horizon, "receding": cfg.receding, "action_block": block,
                   "candidate_rollouts_per_plan": cfg.samples * cfg.iterations,
                   "precision": check_precision("eval", cfg.precision, device)},
        "rows": rows,
        "machine": {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu": platform.processor() or platform.machine()},
    }


def _fmt_ms(v: float) -> str:
    return "-" if v != v else f"{v:.1f}"


def markdown(report: dict) -> str:
    b = report["budget"]
    lines = [f"# {report['env']}: LeWorldModel's protocol ({report['protocol']['episodes']} episodes)", "",
             f"Goal {report['protocol']['goal_offset']} env steps ahead of a dataset frame, "
             f"{report['protocol']['eval_budget']} steps to reach it; dataset `{report['dataset']}`.", "",
             f"Planner budget: {b['planner'].upper()} {b['samples']} x {b['iterations']} (K = {b['elites']}), horizon "
             f"{b['horizon']} model steps of {b['action_block']} env steps, {b['receding']} executed per plan; "
             f"planned from the last {report['protocol'].get('history', 1)} frame(s); precision "
             f"{b.get('precision', 'fp32')}.", "",
             "| policy | success | plan latency median / p90 (ms per plan) | per environment (ms) | envs per plan |",
             "|---|---|---|---|---|"]
    for r in report["rows"]:
        lat, per = r.get("plan_ms"), r.get("plan_ms_per_env")
        plan = f"{_fmt_ms(lat['median'])} / {_fmt_ms(lat['p90'])}" if lat else "-"
        env = f"{_fmt_ms(per['median'])} / {_fmt_ms(per['p90'])}" if per else "-"
        envs = f"{lat['envs_per_plan']:.1f}" if lat else "-"
        lines.append(f"| {r['policy']} | {r['successes']}/{r['episodes']} = {r['success_rate']:.0%} | {plan} | {env} "
                     f"| {envs} |")
    m = report["machine"]
    lines += ["", f"Device {m['device']} ({m['cpu']}, {m['threads']} threads), torch {m['torch']}."]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir) -> tuple[Path, Path]:
    """``eval-<env>-<planner>.json`` and ``.md`` in ``out_dir``, each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"eval-{report['env'].split('/')[-1]}-{report['budget']['planner']}"
    paths = out / f"{stem}.json", out / f"{stem}.md"
    atomic_write_text(paths[0], json.dumps(report, indent=1) + "\n")
    atomic_write_text(paths[1], markdown(report))
    return paths


def run_eval(checkpoint, cfg: EvalConfig, data: Optional[str] = None, out: Optional[str] = None,
             device="cpu", log=print) -> tuple[dict, tuple[Path, Path]]:
    """``jepa-engine eval``: load the world model from ``checkpoint`` (a file or run folder), evaluate it on
    ``data`` (default: the dataset it was trained on), write the report into ``out`` (default: the run
    folder's ``eval/``)."""
    model, train_cfg = load_world_model(checkpoint, device=device)
    data = data or getattr(train_cfg, "data", "") or None
    if not data:
        raise ValueError(f"--data: the checkpoint {checkpoint} was not trained on a collected dataset; name one "
                         f"(jepa-engine collect --out DIR)")
    if not Path(data).is_dir():
        raise ValueError(f"--data must be a dataset folder (jepa-engine collect --out DIR), got {data!r}")
    if cfg.action_block is None and getattr(train_cfg, "action_block", None):
        cfg.action_block = int(train_cfg.action_block)
    run_dir = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    report = evaluate(model, data, cfg, device=device, log=log)
    report["checkpoint"] = str(Path(checkpoint).resolve())
    return report, write_report(report, out or run_dir / "eval")
