"""The planners' cost in latent space: ``latent_cost(model, z_hist, past_actions, z_goal)`` is a function
``actions [E, N, H, A] -> [E, N]``, the distance of the world model's predicted embeddings to the goal
embedding (L1 or L2; the last predicted step or the sum over the horizon)."""
from __future__ import annotations

import torch

from jepa_engine.kernels import latent_cost as fused_latent_cost
from jepa_engine.kernels.precision import check_precision, matmul_precision
from jepa_engine.models.world_model import WorldModel

from .base import CostFn
from .rollout import FusedRollout

COSTS = ("l1", "l2")
REDUCTIONS = ("final", "sum")


def latent_cost(model: WorldModel, z_hist: torch.Tensor, past_actions: torch.Tensor, z_goal: torch.Tensor,
                cost: str = "l2", reduce: str = "final", fused: bool = True, precision: str | None = None) -> CostFn:
    """The planners' cost: ``actions [E, N, H, A] -> [E, N]``, the distance of the predicted embeddings
    to the goal embedding. z_hist [E, h, D], past_actions [E, h-1, A], z_goal [E, D].

    Without a gradient to record (CEM, MPPI) the rollout runs through :class:`FusedRollout` (shared
    history prefix, last-row-only last block, fused linear pieces, the cost in the last step's pass);
    when the actions or the history require grad (the gradient planner) through the differentiable
    ``model.rollout`` and the fused ``latent_cost`` op; ``fused=False`` takes that path always (the
    straightforward rollout, for comparisons). The fused rollout reads the model's weights on the first
    call: build a new cost function after changing them.

    ``precision``: ``"fp32"``, ``"tf32"`` or ``"bf16"`` (:mod:`jepa_engine.kernels.precision`; None: the
    device's default, TF32 on CUDA, fp32 elsewhere). The fused rollout runs at it (TF32 emulated off
    CUDA); the differentiable path runs fp32 / TF32 products as torch's matmul flag allows and bf16
    under autocast."""
    if cost not in COSTS:
        raise ValueError(f"latent_cost: cost must be one of {COSTS}, got {cost!r}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"latent_cost: reduce must be one of {REDUCTIONS}, got {reduce!r}")
    D, A = model.cfg.embed_dim, model.cfg.action_dim
    if z_hist.dim() != 3 or z_hist.shape[2] != D:
        raise ValueError(f"latent_cost: z_hist must be [E, h, {D}], got {list(z_hist.shape)}")
    E, h, _ = z_hist.shape
    if tuple(z_goal.shape) != (E, D):
        raise ValueError(f"latent_cost: z_goal must be [E, D] = [{E}, {D}], got {list(z_goal.shape)}")
    if tuple(past_actions.shape) != (E, h - 1, A):
        raise ValueError(f"latent_cost: past_actions must be [E, h-1, A] = [{E}, {h - 1}, {A}], "
                         f"got {list(past_actions.shape)}")

    asked = precision                        # None: FusedRollout takes the model's dtype's default
    precision = check_precision("latent_cost", precision, z_hist.device)
    engine: list[FusedRollout] = []          # built on the first call that needs no gradient

    def cost_fn(actions: torch.Tensor) -> torch.Tensor:
        E_, N, H, A_ = actions.shape
        if E_ != E or A_ != A:
            raise ValueError(f"latent_cost: actions must be [E, N, H, A] with E = {E}, A = {A}, "
                             f"got {list(actions.shape)}")
        if fused and not (torch.is_grad_enabled() and (actions.requires_grad or z_hist.requires_grad)):
            if not engine:
                engine.append(FusedRollout(model, precision=asked))
            return engine[0].cost(z_hist, past_actions, actions, z_goal, cost, reduce)
        zh = z_hist[:, None].expand(E, N, h, D).reshape(E * N, h, D)
        pa = past_actions[:, None].expand(E, N, h - 1, A).reshape(E * N, h - 1, A)
        with matmul_precision(precision), torch.autocast(z_hist.device.type, torch.bfloat16,
                                                         enabled=precision == "bf16"):
            z = model.rollout(zh, actions.reshape(E * N, H, A), past_actions=pa)             # [E*N, H, D]
        # One fused pass over the predictions; goal row e scores the N candidates of environment e.
        return fused_latent_cost(z, z_goal.to(z.dtype), metric=cost, reduce=reduce).view(E, N)

    return cost_fn
