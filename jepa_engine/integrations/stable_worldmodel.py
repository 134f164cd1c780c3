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

from jepa_engine.models.world_model import WorldModel
from jepa_engine.planning import PlannerConfig
from jepa_engine.planning.latent_cost import COSTS, REDUCTIONS, latent_cost
from jepa_engine.planning.sampling import CEMPlanner, MPPIPlanner

__all__ = ["CACHE_KEY", "CEMSolver", "MPPISolver", "WorldModelCost", "frames_for_model", "require_swm"]

CACHE_KEY = "_jepa_latents"     # info_dict key of the per-solve embeddings and cost function
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

    Args:
        model: the world model (put in eval mode, its parameters frozen while planning).
        cost, reduce: the latent distance (``"l1"`` / ``"l2"``) and where it is read (``"final"``: the
            last predicted step; ``"sum"``: every step), as :func:`jepa_engine.planning.latent_cost`.
        pixels_key, goal_key, action_key: the info_dict keys of the observed frames, the goal frame and
            the actions that led to each observed frame (read only for a history of 2+ frames).
        preprocess: ``frames [N, ...] -> [N, in_chans, img, img]``; default :func:`frames_for_model`.
    """

    def __init__(self, model: WorldModel, cost: str = "l2", reduce: str = "final", pixels_key: str = "pixels",
                 goal_key: str = "goal", action_key: str = "action",
                 preprocess: Optional[Callable[[torch.Tensor, WorldModel], torch.Tensor]] = None):
        if not isinstance(model, WorldModel):
            raise TypeError(f"WorldModelCost: model must be a jepa_engine WorldModel, got {type(model).__name__}")
        if cost not in COSTS:
            raise ValueError(f"WorldModelCost: cost must be one of {COSTS}, got {cost!r}")
        if reduce not in REDUCTIONS:
            raise ValueError(f"WorldModelCost: reduce must be one of {REDUCTIONS}, got {reduce!r}")
        self.model = model.eval().requires_grad_(False)
        self.cost, self.reduce = cost, reduce
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
    def latents(self, info_dict: dict, B: int) -> dict:
        """``{"z_hist" [B, t, D], "past" [B, t-1, A], "z_goal" [B, D], "cost_fn"}`` for this solve:
        computed on the first call and kept in ``info_dict[CACHE_KEY]``."""
        cached = info_dict.get(CACHE_KEY)
        if cached is not None and cached["z_goal"].shape[0] == B:
            return cached
        m, dev = self.model, self.device
        for key in (self.pixels_key, self.goal_key):
            if key not in info_dict:
                raise KeyError(f"WorldModelCost: info_dict has no {key!r} (keys: {sorted(info_dict)})")
        pixels = _first_sample(info_dict[self.pixels_key], self.pixels_key, B)            # [B, T, ...]
        goal = _first_sample(info_dict[self.goal_key], self.goal_key, B)[:, -1]           # [B, ...]
        t = min(pixels.shape[1], m.cfg.history)
        pixels = pixels[:, -t:]
        with torch.no_grad():
            frames = torch.cat([pixels.flatten(0, 1), goal], 0).to(dev)
            z = m.encode(self.preprocess(frames, m)).float()
        self.encodes += 1
        z_hist, z_goal = z[:B * t].view(B, t, -1), z[B * t:]
        A = self.action_dim
        if t > 1:      # the action between frames j and j+1 led to frame j+1
            if self.action_key not in info_dict:
                raise KeyError(f"WorldModelCost: a history of {t} frames needs info_dict[{self.action_key!r}]")
            past = _first_sample(info_dict[self.action_key], self.action_key, B)[:, -(t - 1):]
            if past.shape[-1] != A:
                raise ValueError(f"WorldModelCost: info_dict[{self.action_key!r}] must hold actions of the model's "
                                 f"action_dim = {A}, got {past.shape[-1]}")
            past = past.to(dev, torch.float32)
        else:
            past = torch.zeros(B, 0, A, device=dev)
        cached = {"z_hist": z_hist, "past": past, "z_goal": z_goal,
                  "cost_fn": latent_cost(m, z_hist, past, z_goal, self.cost, self.reduce)}
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
