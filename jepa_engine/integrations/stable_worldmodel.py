"""jepa_engine world models and planners inside stable-worldmodel (0.1.1; ``make envs`` installs it).

Two adapters, each usable on its own:

- :class:`WorldModelCost` is a stable-worldmodel ``Costable``: any jepa_engine action-conditioned
  :class:`~jepa_engine.models.world_model.WorldModel` scores action candidates in latent space, so it
  plans inside stable-worldmodel's ``World`` / ``WorldModelPolicy`` with any of its solvers::

      get_cost(info_dict, candidates [B, S, H, A]) -> costs [B, S]     (fp32, lower is better)

  ``info_dict`` is what a solver passes: every tensor broadcast to ``[B, S, T, ...]`` (``pixels`` and
  ``goal`` frames ``[B, S, T, h, w, c]`` uint8, or channel-first floats after a policy transform). The
  history embeddings ``z_hist [B, t, D]``, the past actions and the goal embedding ``z_goal [B, D]`` are
  computed on the first call of a solve and kept in the dict (key :data:`CACHE_KEY`): a solver reuses the
  dict across its iterations, so the encoder runs once per solve and each iteration only rolls the
  candidates through the predictor (:func:`jepa_engine.planning.latent_cost`: the fused rollout, shared
  history prefix, goal distance in the last step's pass).

- :class:`CEMSolver` / :class:`MPPISolver` have stable-worldmodel's solver interface (the constructor
  of its ``CEMSolver`` / ``MPPISolver``, ``configure(action_space=, n_envs=, config=)``,
  ``solve(info_dict, init_action) -> {"actions": [B, H, A], ...}``) and run jepa_engine's CEM / MPPI
  (:mod:`jepa_engine.planning.sampling`: fused clipped sampling, elite refit on device, no host sync
  inside a plan) on ANY ``Costable``. Replacing ``from stable_worldmodel.solver import CEMSolver`` by
  ``from jepa_engine.integrations.stable_worldmodel import CEMSolver`` is the whole change. Candidates
  stay inside the action space's bounds (stable-worldmodel's own solvers leave them unbounded).

- :class:`HistoryWorldModelPolicy` is stable-worldmodel's ``WorldModelPolicy`` that also hands the solver
  each environment's recent past, for a model trained on a history of h > 1 frames: ``WorldModelPolicy``
  passes only the current observation, and ``PlanConfig.history_len`` is a field it never reads. This
  policy reads it: the last ``history_len`` frames ``action_block`` env steps apart (``pixels [B, T, ...]``)
  and the blocks of env actions taken between them (:data:`PAST_ACTION_KEY`, ``[B, T-1, A]``), fewer at
  the start of an episode (:data:`HISTORY_KEY` ``[B, 1]``: the real frames per environment, the rest
  left padding), as :class:`jepa_engine.evaluation.mpc.MPC` and the training windows build them. With
  ``history_len = 1`` it is ``WorldModelPolicy`` itself.

Shapes: B environments of a solve, S candidates (``num_samples``), H = ``PlanConfig.horizon`` steps,
A = env action dim x ``PlanConfig.action_block`` (one model action is a block of env actions).
stable_worldmodel is imported where it is used, so importing this module needs only torch.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from jepa_engine.kernels.precision import check_precision
from jepa_engine.models.world_model import WorldModel
from jepa_engine.planning import PlannerConfig
from jepa_engine.planning.latent_cost import COSTS, REDUCTIONS, latent_cost
from jepa_engine.planning.sampling import CEMPlanner, MPPIPlanner

# HistoryWorldModelPolicy subclasses stable-worldmodel's policy: built on first access (module __getattr__),
# so it stays out of __all__ and importing this module needs only torch.
__all__ = ["CACHE_KEY", "HISTORY_KEY", "PAST_ACTION_KEY", "CEMSolver", "FrameHistory", "MPPISolver",
           "WorldModelCost", "frames_for_model", "require_swm"]

CACHE_KEY = "_jepa_latents"     # info_dict key of the per-solve embeddings and cost function
HISTORY_KEY = "history_len"     # info_dict key: [B, 1] the real (trailing) frames of each row's pixels
PAST_ACTION_KEY = "past_action"  # info_dict key: [B, T-1, A] the model actions between the history's frames
SWM_VERSION = "0.1.1"


def require_swm():
    """``import stable_worldmodel``, or an ImportError saying how to install it."""
    try:
        import stable_worldmodel
    except ImportError as e:
        raise ImportError(f"stable-worldmodel is not installed ({e}); `make envs` installs stable-worldmodel=="
                          f"{SWM_VERSION} and the packages its envs need, keeping the CPU torch") from e
    return stable_worldmodel


def frames_for_model(frames: torch.Tensor, model: WorldModel) -> torch.Tensor:
    """Env frames ``[N, h, w, c]`` (uint8 0..255, as stable-worldmodel renders them) or ``[N, c, h, w]``
    (floats, after a policy transform) -> the model's input ``[N, in_chans, img, img]`` in [0, 1]:
    channel-first, resized (bilinear, antialiased) when the size differs, averaged to grey for a
    one-channel model."""
    cfg = model.cfg
    if frames.dim() != 4:
        raise ValueError(f"frames_for_model: frames must be [N, h, w, c] or [N, c, h, w], got {list(frames.shape)}")
    x = frames
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):     # channels last
        x = x.permute(0, 3, 1, 2)
    x = x.float() / 255.0 if not x.is_floating_point() else x.float()
    if x.shape[1] != cfg.in_chans:
        if cfg.in_chans == 1:
            x = x.mean(dim=1, keepdim=True)
        else:
            raise ValueError(f"frames_for_model: frames have {x.shape[1]} channels, the model takes "
                             f"in_chans = {cfg.in_chans}")
    if tuple(x.shape[-2:]) != (cfg.img_size, cfg.img_size):
        x = F.interpolate(x, size=(cfg.img_size, cfg.img_size), mode="bilinear", antialias=True, align_corners=False)
    return x.contiguous()


def _first_sample(v: torch.Tensor, name: str, B: int) -> torch.Tensor:
    """``v [B, S, T, ...]`` (the solver's broadcast) -> ``[B, T, ...]``: sample 0, every sample is the same."""
    if not torch.is_tensor(v):
        v = torch.as_tensor(np.asarray(v))
    if v.dim() < 3 or v.shape[0] != B:
        raise ValueError(f"WorldModelCost: info_dict[{name!r}] must be [B, S, T, ...] with B = {B}, "
                         f"got {list(v.shape)}")
    return v[:, 0]


class WorldModelCost:
    """A jepa_engine :class:`WorldModel` as a stable-worldmodel ``Costable`` (see the module docstring).

    The history of a row is the last ``t = min(T, history_len, model history)`` of its ``T`` frames
    (``history_len``: ``info_dict[HISTORY_KEY]`` where given, else T) with the ``t - 1`` model actions
    between them (the last ones of ``info_dict[action_key]``); rows of different ``t`` (environments at
    different points of their episodes) are rolled out in one group per ``t``.

    Args:
        model: the world model (put in eval mode, its parameters frozen while planning).
        cost, reduce: the latent distance (``"l1"`` / ``"l2"``) and where it is read (``"final"``: the
            last predicted step; ``"sum"``: every step), as :func:`jepa_engine.planning.latent_cost`.
        pixels_key, goal_key, action_key: the info_dict keys of the observed frames, the goal frame and
            the model actions between the observed frames (read only for a history of 2+ frames; default
            :data:`PAST_ACTION_KEY`, which :class:`HistoryWorldModelPolicy` writes).
        preprocess: ``frames [N, ...] -> [N, in_chans, img, img]``; default :func:`frames_for_model`.
    """

    def __init__(self, model: WorldModel, cost: str = "l2", reduce: str = "final", pixels_key: str = "pixels",
                 goal_key: str = "goal", action_key: str = PAST_ACTION_KEY,
                 preprocess: Optional[Callable[[torch.Tensor, WorldModel], torch.Tensor]] = None,
                 precision: Optional[str] = None):
        if not isinstance(model, WorldModel):
            raise TypeError(f"WorldModelCost: model must be a jepa_engine WorldModel, got {type(model).__name__}")
        if cost not in COSTS:
            raise ValueError(f"WorldModelCost: cost must be one of {COSTS}, got {cost!r}")
        if reduce not in REDUCTIONS:
            raise ValueError(f"WorldModelCost: reduce must be one of {REDUCTIONS}, got {reduce!r}")
        self.model = model.eval().requires_grad_(False)
        self.cost, self.reduce = cost, reduce
        if precision is not None:
            check_precision("WorldModelCost", precision)
        self.precision = precision       # the rollout's (None: tf32 on CUDA, fp32 elsewhere)
        self.pixels_key, self.goal_key, self.action_key = pixels_key, goal_key, action_key
        self.preprocess = preprocess or frames_for_model
        self.encodes = 0                 # encoder passes (history + goal) so far: one per solve

    @property
    def action_dim(self) -> int:
        """A: the model's action (env action dim x action_block)."""
        return self.model.cfg.action_dim

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def parameters(self):
        """The model's parameters (stable-worldmodel's solvers read their dtype)."""
        return self.model.parameters()

    # ---------------------------------------------------------------------------------------------
    def _history_lengths(self, info_dict: dict, B: int, T: int) -> torch.Tensor:
        """``t [B]``: the history frames of each row (module docstring), at least 1."""
        cap = min(T, self.model.cfg.history)
        if HISTORY_KEY not in info_dict:
            return torch.full((B,), cap, dtype=torch.int64)
        n = _first_sample(info_dict[HISTORY_KEY], HISTORY_KEY, B).reshape(B, -1)[:, -1].to("cpu", torch.int64)
        if bool((n < 1).any()):
            raise ValueError(f"WorldModelCost: info_dict[{HISTORY_KEY!r}] must be >= 1 (real frames per row), got "
                             f"{n.tolist()}")
        return n.clamp(max=cap)

    def latents(self, info_dict: dict, B: int) -> dict:
        """``{"groups": [(rows, z_hist [b, t, D], past [b, t-1, A])], "z_goal" [B, D], "cost_fn"}`` for this
        solve (one group per history length t; ``rows`` None when one group holds every row, then also
        ``"z_hist"`` and ``"past"``): computed on the first call and kept in ``info_dict[CACHE_KEY]``."""
        cached = info_dict.get(CACHE_KEY)
        if cached is not None and cached["z_goal"].shape[0] == B:
            return cached
        m, dev, A = self.model, self.device, self.action_dim
        for key in (self.pixels_key, self.goal_key):
            if key not in info_dict:
                raise KeyError(f"WorldModelCost: info_dict has no {key!r} (keys: {sorted(info_dict)})")
        pixels = _first_sample(info_dict[self.pixels_key], self.pixels_key, B)            # [B, T, ...]
        goal = _first_sample(info_dict[self.goal_key], self.goal_key, B)[:, -1]           # [B, ...]
        T = pixels.shape[1]
        lengths = self._history_lengths(info_dict, B, T)
        ts = sorted(set(lengths.tolist()))
        groups = [(torch.nonzero(lengths == t).flatten(), t) for t in ts]
        actions = None
        if ts[-1] > 1:      # the model action between frames j and j+1 led to frame j+1
            if self.action_key not in info_dict:
                raise KeyError(f"WorldModelCost: a history of {ts[-1]} frames needs info_dict[{self.action_key!r}] "
                               f"(the model actions between the frames; keys: {sorted(info_dict)})")
            actions = _first_sample(info_dict[self.action_key], self.action_key, B)
            if actions.dim() != 3 or actions.shape[-1] != A or actions.shape[1] < ts[-1] - 1:
                raise ValueError(f"WorldModelCost: info_dict[{self.action_key!r}] must be [B, S, >= {ts[-1] - 1}, A] "
                                 f"with A = the model's action_dim = {A}, got sample 0 of shape {list(actions.shape)}")
        pick = (lambda v, rows: v) if len(groups) == 1 else (lambda v, rows: v[rows])   # noqa: E731
        with torch.no_grad():
            frames = [pick(pixels, rows)[:, T - t:].flatten(0, 1) for rows, t in groups] + [goal]
            z = m.encode(self.preprocess(torch.cat(frames, 0).to(dev), m)).float()
        self.encodes += 1
        z_goal, cached, at = z[-B:], {"groups": []}, 0
        fns = []
        for rows, t in groups:
            z_hist = z[at:at + len(rows) * t].view(len(rows), t, -1)
            at += len(rows) * t
            if t > 1:
                past = pick(actions, rows)[:, actions.shape[1] - (t - 1):].to(dev, torch.float32)
            else:
                past = torch.zeros(len(rows), 0, A, device=dev)
            whole = len(groups) == 1
            rows_dev = None if whole else rows.to(dev)
            cached["groups"].append((rows_dev, z_hist, past))
            fns.append((rows_dev, latent_cost(m, z_hist, past, z_goal if whole else z_goal[rows_dev], self.cost,
                                              self.reduce, precision=self.precision)))
            if whole:
                cached.update(z_hist=z_hist, past=past)
        if len(fns) == 1:
            cost_fn = fns[0][1]
        else:
            def cost_fn(c: torch.Tensor) -> torch.Tensor:
                out = torch.empty(c.shape[:2], device=c.device, dtype=torch.float32)
                for rows, fn in fns:
                    out[rows] = fn(c[rows]).float()
                return out
        cached.update(z_goal=z_goal, lengths=lengths, cost_fn=cost_fn)
        info_dict[CACHE_KEY] = cached
        return cached

    def get_cost(self, info_dict: dict, action_candidates: torch.Tensor) -> torch.Tensor:
        """``action_candidates [B, S, H, A]`` -> costs ``[B, S]`` (fp32)."""
        c = action_candidates
        A = self.action_dim
        if c.dim() != 4 or c.shape[-1] != A:
            raise ValueError(f"WorldModelCost.get_cost: action_candidates must be [B, S, H, A] with A = the model's "
                             f"action_dim = {A} (env action dim x PlanConfig.action_block), got {list(c.shape)}")
        lat = self.latents(info_dict, c.shape[0])
        with torch.no_grad():
            return lat["cost_fn"](c.to(self.device, torch.float32)).float()

    criterion = get_cost     # stable-worldmodel's Costable protocol names both


# --------------------------------------------------------------------------------------------------
# Solvers
# --------------------------------------------------------------------------------------------------
class _JepaSolver:
    """stable-worldmodel's solver interface over a jepa_engine sampling planner (CEM / MPPI).

    Args (stable-worldmodel's names): model (any Costable), batch_size (environments planned at once;
    None: all of a solve), num_samples (N), var_scale (initial std), n_steps (iterations), topk (CEM
    elites K), temperature (MPPI), device, seed. jepa_engine's: min_std (floor of the refit std),
    momentum (weight of the previous mean/std), bounds (``(low, high)``, scalars or ``[A_env]`` /
    ``[A]``; default the action space's box, for actions planned in the env's own units).

    Each solve draws from the Philox stream ``(seed, offset)``; the offset advances by the numbers
    drawn, so consecutive solves draw fresh candidates and a run is reproducible from its seed.
    ``timings`` keeps ``(milliseconds, environments)`` per planned batch (synchronised on CUDA).
    """

    planner_class = CEMPlanner

    def __init__(self, model, batch_size: Optional[int] = None, num_samples: int = 300, var_scale: float = 1.0,
                 n_steps: int = 30, topk: int = 30, temperature: float = 0.5, device: str | torch.device = "cpu",
                 seed: int = 1234, min_std: float = 0.05, momentum: float = 0.0,
                 bounds: Optional[tuple[Any, Any]] = None):
        if not callable(getattr(model, "get_cost", None)):
            raise TypeError(f"{type(self).__name__}: model must be a Costable (get_cost(info_dict, candidates) -> "
                            f"[B, S]), got {type(model).__name__}")
        if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"{type(self).__name__}: batch_size must be an int >= 1 or None, got {batch_size!r}")
        self.model = model
        self.batch_size = batch_size
        self.num_samples, self.var_scale, self.n_steps, self.topk = num_samples, var_scale, n_steps, topk
        self.temperature, self.min_std, self.momentum = temperature, min_std, momentum
        self.device = torch.device(device)
        self.seed = int(seed)
        self.offset = 0
        self.user_bounds = bounds
        self.timings: list[tuple[float, int]] = []
        self._config = None
        # the checks of PlannerConfig, before any env exists
        PlannerConfig(samples=num_samples, iterations=n_steps, elites=topk, temperature=temperature,
                      init_std=var_scale, min_std=min_std, momentum=momentum, seed=self.seed)

    # ---- stable-worldmodel's Solver protocol
    def configure(self, *, action_space, n_envs: int, config: Any) -> None:
        """Called by ``WorldModelPolicy.set_env``: the (batched) action space, environments, PlanConfig."""
        shape = tuple(action_space.shape)
        self._n_envs, self._config = n_envs, config
        self._env_action_dim = int(np.prod(shape[1:])) if len(shape) > 1 else int(np.prod(shape))
        A = self.action_dim
        want = getattr(self.model, "action_dim", None)
        if want is not None and want != A:
            raise ValueError(f"{type(self).__name__}.configure: the cost's action_dim must be the env's action dim "
                             f"x PlanConfig.action_block = {self._env_action_dim} x {config.action_block} = {A}, "
                             f"got {want}")
        self.low, self.high = self._bounds(action_space)
        self.planner = self.planner_class(PlannerConfig(
            horizon=config.horizon, action_dim=A, samples=self.num_samples, iterations=self.n_steps,
            elites=self.topk, temperature=self.temperature, momentum=self.momentum, init_std=self.var_scale,
            min_std=self.min_std, low=float(self.low.min()), high=float(self.high.max()), seed=self.seed))

    def _bounds(self, action_space) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension bounds ``[A]`` fp32: the user's, else the space's box repeated action_block times."""
        A, a = self.action_dim, self._env_action_dim
        if self.user_bounds is not None:
            lo, hi = (torch.as_tensor(np.asarray(b, dtype=np.float32)).flatten() for b in self.user_bounds)
        else:
            if not hasattr(action_space, "low"):
                raise TypeError(f"{type(self).__name__}: the action space must be a Box (continuous actions), got "
                                f"{type(action_space).__name__}")
            lo = torch.as_tensor(np.asarray(action_space.low, dtype=np.float32).reshape(-1, a)[0])
            hi = torch.as_tensor(np.asarray(action_space.high, dtype=np.float32).reshape(-1, a)[0])
        out = []
        for name, b in (("low", lo), ("high", hi)):
            if b.numel() == 1:
                b = b.expand(A)
            elif b.numel() == a:
                b = b.repeat(A // a)
            elif b.numel() != A:
                raise ValueError(f"{type(self).__name__}: bounds {name} must be a scalar, [{a}] or [{A}], "
                                 f"got {b.numel()} values")
            out.append(b.to(self.device, torch.float32).contiguous())
        if not bool((out[0] < out[1]).all()):
            raise ValueError(f"{type(self).__name__}: bounds must have low < high in every dimension, got "
                             f"low {out[0].tolist()}, high {out[1].tolist()}")
        return out[0], out[1]

    @property
    def n_envs(self) -> int:
        return self._n_envs

    @property
    def action_dim(self) -> int:
        """Flattened action dimension including action_block grouping."""
        return self._env_action_dim * self._config.action_block

    @property
    def horizon(self) -> int:
        return self._config.horizon

    def __call__(self, *args, **kwargs) -> dict:
        return self.solve(*args, **kwargs)

    # ---- planning
    def _expand(self, info_dict: dict, lo: int, hi: int) -> dict:
        """Rows lo..hi-1 of every entry, broadcast over the N candidates (``[b, N, ...]``) as
        stable-worldmodel's solvers pass them to ``get_cost``."""
        N, out = self.num_samples, {}
        for k, v in info_dict.items():
            if torch.is_tensor(v):
                v = v[lo:hi].to(self.device)
                v = v.unsqueeze(1).expand(v.shape[0], N, *v.shape[1:])
            elif isinstance(v, np.ndarray):
                v = np.repeat(v[lo:hi, None], N, axis=1)
            elif isinstance(v, list):
                v = v[lo:hi]
            out[k] = v
        return out

    def solve(self, info_dict: dict, init_action: Optional[torch.Tensor] = None) -> dict:
        """Plan ``[B, H, A]`` for the B environments of ``info_dict`` (warm-started from ``init_action
        [B, t, A]``, t <= H, the rest padded as stable-worldmodel pads it)."""
        if self._config is None:
            raise RuntimeError(f"{type(self).__name__}.solve: call configure() first (WorldModelPolicy.set_env does)")
        from stable_worldmodel.solver.utils import prepare_init_action

        B = len(next(iter(info_dict.values())))
        H, A, N = self.horizon, self.action_dim, self.num_samples
        if init_action is not None and (init_action.dim() != 3 or init_action.shape[0] != B
                                        or init_action.shape[2] != A or init_action.shape[1] > H):
            raise ValueError(f"{type(self).__name__}.solve: init_action must be [B, t, A] with B = {B}, t <= {H}, "
                             f"A = {A}, got {list(init_action.shape)}")
        with torch.no_grad():
            init = prepare_init_action(self.model, info_dict, init_action, H, n_envs=B, action_dim=A)
            mean = init.reshape(B, H * A).to(self.device, torch.float32)
            mean = torch.maximum(torch.minimum(mean, self.high.repeat(H)), self.low.repeat(H))
            std = torch.full_like(mean, float(self.var_scale))
            step = self.batch_size or B
            means, stds, costs = [], [], []
            for lo in range(0, B, step):
                hi = min(B, lo + step)
                t0 = time.perf_counter()
                expanded = self._expand(info_dict, lo, hi)
                cost_fn = lambda a, x=expanded: self.model.get_cost(x, a)   # noqa: E731
                rng = torch.tensor([self.seed, self.offset], dtype=torch.int64, device=self.device)
                m, s, best = self.planner.iterate(cost_fn, mean[lo:hi].contiguous(), std[lo:hi].contiguous(),
                                                  self.low, self.high, rng)
                self.offset = int(rng[1])
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.timings.append((1e3 * (time.perf_counter() - t0), hi - lo))
                means.append(m), stds.append(s), costs.append(best)
            mean, std = torch.cat(means), torch.cat(stds)
            actions = torch.maximum(torch.minimum(mean.view(B, H, A), self.high), self.low)
        return {"actions": actions.cpu(), "costs": torch.cat(costs).cpu().tolist(), "mean": [mean.view(B, H, A).cpu()],
                "var": [std.view(B, H, A).cpu()]}


class CEMSolver(_JepaSolver):
    """Cross-entropy method: stable-worldmodel's ``CEMSolver`` interface, jepa_engine's fused CEM."""

    planner_class = CEMPlanner


class MPPISolver(_JepaSolver):
    """MPPI: stable-worldmodel's ``MPPISolver`` interface, jepa_engine's fused MPPI (softmax over every
    candidate at ``temperature``; ``topk`` is accepted and unused)."""

    planner_class = MPPIPlanner


def latency_ms(timings: Sequence[tuple[float, int]]) -> dict:
    """Median and 90th percentile of the planned batches' wall times (ms), with the environments per batch."""
    if not timings:
        return {"median": float("nan"), "p90": float("nan"), "plans": 0, "envs_per_plan": 0.0}
    t = sorted(ms for ms, _ in timings)
    q = lambda f: t[min(len(t) - 1, int(f * (len(t) - 1) + 0.5))]  # noqa: E731
    return {"median": q(0.5), "p90": q(0.9), "plans": len(t),
            "envs_per_plan": sum(e for _, e in timings) / len(timings)}


# --------------------------------------------------------------------------------------------------
# History: the past frames and actions of each environment, for models trained on h > 1 frames
# --------------------------------------------------------------------------------------------------
def _numpy(v) -> np.ndarray:
    return v.detach().cpu().numpy() if torch.is_tensor(v) else np.asarray(v)


class FrameHistory:
    """The recent past of ``n_envs`` environments, as a world model of ``history`` frames ``action_block``
    env steps apart was trained on (:class:`~jepa_engine.training.trajectory_data.DiskTrajectoryStream`'s
    windows)::

        observe(frames [n, ...])       the frame each environment shows now (env step s)
        record(actions [n, a])         the env action each one takes from it
        stacked() -> pixels [n, T, ...]   frames s - (t-1) k, ..., s - k, s         (k = action_block)
                     past   [n, T-1, k a] the k env actions after each of them but the last, concatenated
                     lengths [n]          t = min(history, s // k + 1): fewer frames early in an episode

    Rows with ``t < T`` are padded on the left (the earliest frame repeated, zero actions); ``lengths``
    says how many trailing entries are real. ``reset(mask)`` starts new episodes; an environment observed
    twice without an action recorded between starts a new one too.
    """

    def __init__(self, n_envs: int, history: int, action_block: int = 1, action_dim: Optional[int] = None):
        for name, v in (("n_envs", n_envs), ("history", history), ("action_block", action_block)):
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"FrameHistory: {name} must be an int >= 1, got {v!r}")
        self.n, self.h, self.k, self.action_dim = n_envs, history, action_block, action_dim
        self.span = (history - 1) * action_block      # env steps from the oldest frame kept to the newest
        self.frames: list[list[np.ndarray]] = [[] for _ in range(n_envs)]
        self.actions: list[list[np.ndarray]] = [[] for _ in range(n_envs)]   # actions[i][p] leaves frames[i][p]

    def reset(self, mask=None) -> None:
        rows = range(self.n) if mask is None else np.flatnonzero(np.asarray(mask, dtype=bool).reshape(-1))
        for i in rows:
            self.frames[i].clear()
            self.actions[i].clear()

    def observe(self, frames) -> None:
        frames = _numpy(frames)
        if len(frames) != self.n:
            raise ValueError(f"FrameHistory.observe: frames must hold n_envs = {self.n} rows, got {len(frames)}")
        for i in range(self.n):
            f, a = self.frames[i], self.actions[i]
            if len(a) != len(f):                 # no action recorded after the last frame: start afresh
                f.clear()
                a.clear()
            f.append(frames[i].copy())
            del f[:max(0, len(f) - (self.span + 1))]
            del a[:max(0, len(a) - (len(f) - 1))]

    def record(self, actions) -> None:
        actions = _numpy(actions).reshape(self.n, -1).astype(np.float32)
        if self.action_dim is None:
            self.action_dim = actions.shape[1]
        elif actions.shape[1] != self.action_dim:
            raise ValueError(f"FrameHistory.record: actions must be [{self.n}, {self.action_dim}], got "
                             f"{list(actions.shape)}")
        for i in range(self.n):
            if len(self.actions[i]) < len(self.frames[i]):
                self.actions[i].append(actions[i].copy())

    def lengths(self) -> np.ndarray:
        """``t [n]``: the frames each environment's history has now (0 before its first frame)."""
        return np.array([min(self.h, (len(f) - 1) // self.k + 1) if f else 0 for f in self.frames], np.int64)

    def stacked(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lengths = self.lengths()
        if (lengths < 1).any():
            raise RuntimeError(f"FrameHistory.stacked: environments {np.flatnonzero(lengths < 1).tolist()} have no "
                               f"frame yet (observe() first)")
        T, k = int(lengths.max()), self.k
        first = self.frames[0][-1]
        pixels = np.empty((self.n, T, *first.shape), first.dtype)
        past = np.zeros((self.n, T - 1, k * (self.action_dim or 0)), np.float32)
        for i, t in enumerate(lengths.tolist()):
            f, acts = self.frames[i], self.actions[i]
            idx = [len(f) - 1 - (t - 1 - j) * k for j in range(t)]     # positions of the t frames
            pixels[i, T - t:] = np.stack([f[p] for p in idx])
            pixels[i, :T - t] = f[idx[0]]
            for j in range(t - 1):
                past[i, T - t + j] = np.concatenate(acts[idx[j]:idx[j] + k])
        return pixels, past, lengths


def _history_policy_class():
    """``HistoryWorldModelPolicy``, built on first use (it subclasses stable-worldmodel's policy)."""
    global _HISTORY_POLICY
    if _HISTORY_POLICY is not None:
        return _HISTORY_POLICY
    swm = require_swm()

    class HistoryWorldModelPolicy(swm.policy.WorldModelPolicy):
        """stable-worldmodel's ``WorldModelPolicy`` planning from the last ``config.history_len`` frames
        (module docstring; ``config.action_block`` env steps apart) and the actions between them.

        Episode starts: ``set_env`` (``World.set_policy``) clears every environment's history, and one
        environment's history and queued actions are cleared when its episode ``id`` changes (a reset)
        or ``World`` flags it in a new ``_needs_flush`` (World leaves the old flags in its info dict). ``World.evaluate(dataset=...)`` writes the dataset's columns into the first
        observation only, so an id change after an episode's first frame keeps that frame. With
        ``history_len = 1`` every call is ``WorldModelPolicy.get_action`` itself.
        """

        def __init__(self, solver, config, **kwargs):
            h = getattr(config, "history_len", 1)
            if not (isinstance(h, int) and not isinstance(h, bool) and h >= 1):
                raise ValueError(f"HistoryWorldModelPolicy: config.history_len must be an int >= 1, got {h!r}")
            super().__init__(solver=solver, config=config, **kwargs)
            self.type = "world_model_history"
            self.history: Optional[FrameHistory] = None
            self._ids: Optional[np.ndarray] = None
            self._flush = None

        @property
        def history_len(self) -> int:
            return self.cfg.history_len

        def set_env(self, env: Any) -> None:
            super().set_env(env)
            self.history = FrameHistory(getattr(env, "num_envs", 1), self.history_len, self.cfg.action_block,
                                        int(np.prod(env.single_action_space.shape)))
            self._ids, self._flush = None, None

        def _new_episodes(self, info_dict: dict) -> None:
            hist, n = self.history, self.history.n
            flush = info_dict.get("_needs_flush")
            if flush is not None and flush is not self._flush:      # World leaves it in place after use
                self._flush = flush
                self._restart(_numpy(flush).astype(bool).reshape(-1))
            ids = info_dict.get("id")
            if ids is None:
                return
            ids = _numpy(ids).reshape(n, -1)[:, -1].copy()
            if self._ids is not None:
                changed = ids != self._ids
                fresh = np.array([len(f) <= 1 for f in hist.frames])   # the dataset's first frame
                self._restart(changed & ~fresh)
            self._ids = ids

        def _restart(self, envs: np.ndarray) -> None:
            """New episodes in ``envs`` (a mask): their histories, and the actions left of their last plan
            and its warm start. (``World.evaluate(dataset=...)`` freezes an env whose episode ends before
            the others' with the rest of its action block queued, and its next evaluation resets the env
            without a ``_needs_flush``: the queue would run in the new episode.)"""
            self.history.reset(envs)
            for i in np.flatnonzero(envs):
                self._action_buffer[i].clear()
                if self._next_init is not None:
                    self._next_init[i] = 0

        def get_action(self, info_dict: dict, **kwargs: Any) -> np.ndarray:
            if self.history_len == 1:
                return super().get_action(info_dict, **kwargs)
            n = self.env.num_envs
            self._new_episodes(info_dict)
            self.history.observe(_numpy(info_dict["pixels"])[:, -1])
            info = dict(info_dict)
            terminated = info_dict.get("terminated")
            dead = (np.zeros(n, bool) if terminated is None
                    else _numpy(terminated).astype(bool).reshape(n, -1)[:, -1])
            flush = info_dict.get("_needs_flush")
            flushed = np.zeros(n, bool) if flush is None else _numpy(flush).astype(bool).reshape(-1)
            if any((len(self._action_buffer[i]) == 0 or flushed[i]) and not dead[i] for i in range(n)):
                pixels, past, lengths = self.history.stacked()          # only when a solve follows
                info.update({"pixels": pixels, PAST_ACTION_KEY: past, HISTORY_KEY: lengths[:, None]})
            action = super().get_action(info, **kwargs)
            planned = action
            if "action" in self.process:        # back to the planner's units, as the model was given them
                planned = self.process["action"].transform(np.asarray(action).reshape(n, -1))
            self.history.record(np.asarray(planned).reshape(n, -1))
            return action

    _HISTORY_POLICY = HistoryWorldModelPolicy
    return _HISTORY_POLICY


_HISTORY_POLICY = None


def __getattr__(name: str):
    if name == "HistoryWorldModelPolicy":
        return _history_policy_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
