"""Cost of predicted embeddings to a goal embedding, in one pass over a rollout's predictions.

Math (rows b of the rollout batch, steps h of the horizon H, features d of the embedding D)::

    dist[b, h] = sum_d (z[b, h, d] - goal[g(b), d])^2        (metric="l2": squared distance)
               = sum_d |z[b, h, d] - goal[g(b), d]|          (metric="l1")
    cost[b]    = dist[b, H-1]                                 (reduce="final")
               = sum_h w[h] * dist[b, h]                      (reduce="sum"; w = 1 unless weights)

``g(b) = b // (B // G)`` for a goal of ``G`` rows, G dividing B: ``G = 1`` scores every row against
one goal, ``G = B`` gives each row its own, and ``G = E`` with ``B = E * N`` scores the N candidates
of environment e against goal e without materialising the expanded goal.

Shapes and dtypes: z ``[B, H, D]`` and goal ``[G, D]`` of the same dtype (fp32, fp16, bf16),
weights fp32 ``[H]`` (only with ``reduce="sum"``). The cost is fp32 ``[B]``; math is fp32 whatever
the storage dtype. The forward is one Triton kernel reading each needed element of z once (with
``reduce="final"`` only the last step is read). The backward is a handful of elementwise torch ops
(``grad_z = grad[b] * w[h] * dl(z - goal)``, ``dl = 2x`` or ``sign(x)``), registered with
``torch.library.register_autograd``: it is as bandwidth-bound as a kernel would be, the gradient
planner calls it once per Adam step after a full predictor backward that costs far more, and the
ops are captured by CUDA graphs and ``torch.compile`` like any other.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _launch, _native
from ._launch import tl, triton
from ._registry import KernelSpec, register_kernel, signature

OP = "latent_cost"
METRICS = ("l2", "l1")
REDUCTIONS = ("final", "sum")


# --------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------
@triton.jit
def _latent_cost_fwd_kernel(
    # pointers
    z_ptr, goal_ptr, weights_ptr, cost_ptr,
    # sizes and strides (elements; the feature stride of z and goal is 1)
    B, H, D, rows_per_goal, stride_zb, stride_zh, stride_g,
    # meta-parameters
    L1: tl.constexpr, FINAL: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # First row in int64: B * H * D exceeds 2^31 for large batched rollouts.
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    r = tl.arange(0, BLOCK_M)
    rows = row0 + r
    row_ok = rows < B
    z_rows = z_ptr + rows * stride_zb
    g_rows = goal_ptr + (rows // rows_per_goal) * stride_g
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Steps: only the last one for reduce="final" (the other steps are never read).
    h0 = H - 1 if FINAL else 0
    for h in range(h0, H):
        step = tl.zeros([BLOCK_M], dtype=tl.float32)
        # Features in BLOCK_D chunks, fp32 accumulation; the goal tile is re-read per step from L1/L2.
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            ok = row_ok[:, None] & (cols[None, :] < D)
            z = tl.load(z_rows[:, None] + h * stride_zh + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            g = tl.load(g_rows[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            diff = z - g
            if L1:
                step += tl.sum(tl.abs(diff), axis=1)
            else:
                step += tl.sum(diff * diff, axis=1)
        if HAS_WEIGHTS:
            step = step * tl.load(weights_ptr + h)
        acc += step

    tl.store(cost_ptr + rows, acc, mask=row_ok)


# --------------------------------------------------------------------------------------------------
# Launcher: check constraints, allocate, pick the config, launch.
# --------------------------------------------------------------------------------------------------
# Tiles: _launch.ROW_TILES, as for latent_loss (a bandwidth-bound row reduction); the 192-dim
# LeWorldModel latent takes the 256-wide tile (one masked chunk per step).
def latent_cost_forward(z: torch.Tensor, goal: torch.Tensor, weights: Optional[torch.Tensor], metric: str,
                        reduce: str) -> torch.Tensor:
    if z.stride(-1) != 1:
        z = z.contiguous()
    if goal.stride(-1) != 1:
        goal = goal.contiguous()
    B, H, D = z.shape
    cost = torch.empty(B, device=z.device, dtype=torch.float32)
    cfg = _launch.row_tile(D, "latent_cost_fwd")
    grid = (_launch.cdiv(B, cfg.constexprs["BLOCK_M"]),)
    _latent_cost_fwd_kernel[grid](
        z, goal, weights if weights is not None else cost, cost,
        B, H, D, B // goal.shape[0], z.stride(0), z.stride(1), goal.stride(0),
        L1=metric == "l1", FINAL=reduce == "final", HAS_WEIGHTS=weights is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.constexprs,
    )
    return cost


def _variants():
    out = {}
    for name in _launch.TYPE_NAMES.values():
        sig = signature(_latent_cost_fwd_kernel, f"*{name}", {"weights_ptr": "*fp32", "cost_ptr": "*fp32"})
        out[f"{name}/l2/final"] = (sig, {"L1": False, "FINAL": True, "HAS_WEIGHTS": False})
        out[f"{name}/l1/sum/weights"] = (sig, {"L1": True, "FINAL": False, "HAS_WEIGHTS": True})
    return out


register_kernel(KernelSpec("latent_cost_fwd", _latent_cost_fwd_kernel, _variants(), _launch.ROW_TILES,
                           search_space=_launch.search_space(_launch.ROW_TABLE, _launch.ROW_CANDIDATES)))


# --------------------------------------------------------------------------------------------------
# Reference (the specification) and the backward
# --------------------------------------------------------------------------------------------------
def _step_weights(H: int, reduce: str, weights: Optional[torch.Tensor], device) -> torch.Tensor:
    """w[h] of the module docstring as an fp32 [H] tensor (one-hot on the last step for "final")."""
    if weights is not None:
        return weights.float()
    if reduce == "sum":
        return torch.ones(H, device=device)
    w = torch.zeros(H, device=device)
    w[-1] = 1.0
    return w


def latent_cost_reference(z: torch.Tensor, goal: torch.Tensor, *, metric: str = "l2", reduce: str = "final",
                          weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain PyTorch (differentiable): fp32 distance per step, then the last step or the weighted sum."""
    B, H, D = z.shape
    G = goal.shape[0]
    zz = z[:, -1:] if reduce == "final" else z                                   # only the steps used
    diff = zz.float().reshape(G, B // G, zz.shape[1], D) - goal.float()[:, None, None, :]
    dist = (diff.abs() if metric == "l1" else diff.square()).sum(-1).reshape(B, zz.shape[1])   # [B, H or 1]
    if reduce == "final":
        return dist[:, 0]
    return dist @ weights.float() if weights is not None else dist.sum(-1)


def latent_cost_backward(grad: torch.Tensor, z: torch.Tensor, goal: torch.Tensor, weights: Optional[torch.Tensor],
                         metric: str, reduce: str, need_goal: bool):
    """(grad_z [B, H, D], grad_goal [G, D] or None) of the cost, in fp32 math, cast to the inputs' dtype."""
    B, H, D = z.shape
    G = goal.shape[0]
    w = _step_weights(H, reduce, weights, z.device)                             # [H]
    diff = z.float().reshape(G, B // G, H, D) - goal.float()[:, None, None, :]
    dl = diff.sign() if metric == "l1" else 2.0 * diff
    scale = grad.float().reshape(G, B // G, 1, 1) * w.view(1, 1, H, 1)
    g = (dl * scale).view(B, H, D)
    grad_goal = (-g.view(G, B // G * H, D).sum(1)).to(goal.dtype) if need_goal else None
    return g.to(z.dtype), grad_goal


# --------------------------------------------------------------------------------------------------
# Public op: validation, dispatch, autograd, torch.library registration
# --------------------------------------------------------------------------------------------------
# The op's schema: defined in C++ (csrc/losses.cpp, with its CPU kernel) when the native library is
# loaded, else here.
SCHEMA = "latent_cost(Tensor z, Tensor goal, Tensor? weights, str metric, str reduce) -> Tensor"


def _forward_kernel(z, goal, weights, metric, reduce):
    """The Python kernel of the op: the Triton kernel, or the reference."""
    if _launch.backend_for(OP, z.device) == "triton":
        return latent_cost_forward(z, goal, weights, metric, reduce)
    return latent_cost_reference(z, goal, metric=metric, reduce=reduce, weights=weights)


def _forward_fake(z, goal, weights, metric, reduce):
    return z.new_empty((z.shape[0],), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    z, goal, weights, metric, reduce = inputs
    ctx.save_for_backward(z, goal, weights)
    ctx.metric, ctx.reduce = metric, reduce


def _backward(ctx, grad):
    z, goal, weights = ctx.saved_tensors
    need_z, need_goal = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_z or need_goal):
        return None, None, None, None, None
    g_z, g_goal = latent_cost_backward(grad, z, goal, weights, ctx.metric, ctx.reduce, need_goal)
    return (g_z if need_z else None), g_goal, None, None, None


_latent_cost_op = _native.Op(OP, SCHEMA, _forward_kernel, _forward_fake, backward=_backward,
                             setup_context=_setup_context)
# Plain CPU calls that need no gradient (the sampling planners' cost) take the C++ kernel; those that
# need one (the gradient planner) keep the reference ops under autograd. Measured (csrc/losses.cpp's
# kernel against latent_cost_reference, 2-core AMD EPYC with AVX2, shared with other jobs: best of
# repeats, 1 thread; the public function both ways):
#   forward, B x H x D = 300 x 5 x 192 (CEM 300 candidates), fp32 l2: final 19 against 76 us, sum 38
#     against 174 us; 2400 x 5 x 192 with 8 goals: 141 against 315 / 253 against 3040 us; bf16 2.5-6x;
#     2 threads: 23 / 84 us on 300 x 5 x 192, 532 / 273 us with 8 goals; the reference above 3000 us there;
#   forward + backward, the C++ forward under the registered formula against autograd through the
#     reference: 0.34-1.4x, slower at most shapes (300 x 5 x 192 fp32 l2/final: 938 against 433 us).
_NATIVE = OP in _native.native_ops()


def _native_runs(z, goal, weights) -> bool:
    """Whether the public op takes the C++ kernel: the library defines it, the call is a plain CPU call
    (:func:`_native.cpu_kernel_runs`) and nothing traces it (a traced graph keeps the reference ops)."""
    return (_NATIVE and not torch.compiler.is_compiling()
            and _native.cpu_kernel_runs(z, goal, *(() if weights is None else (weights,))))


def latent_cost(z: torch.Tensor, goal: torch.Tensor, *, metric: str = "l2", reduce: str = "final",
                weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Distance of predicted embeddings to a goal embedding (see the module docstring).

    Args:
        z: ``[B, H, D]`` predicted embeddings of B rollouts over H steps (fp32, fp16 or bf16).
        goal: ``[G, D]`` goal embeddings, same dtype and device; G divides B (1, B, or the number of
            environments when B = environments * candidates, candidates of one environment adjacent).
        metric: ``"l2"`` (squared Euclidean) or ``"l1"``.
        reduce: ``"final"`` (last step) or ``"sum"`` (over the horizon).
        weights: optional fp32 ``[H]`` per-step weights, only with ``reduce="sum"``.

    Returns:
        fp32 ``[B]``; differentiable in z and goal.
    """
    native = _native_runs(z, goal, weights)
    grad = native and torch.is_grad_enabled() and (z.requires_grad or goal.requires_grad
                                                   or (weights is not None and weights.requires_grad))
    if native and not grad and type(metric) is str and type(reduce) is str:
        # The C++ kernel makes the checks below itself, in the same order, with the same messages; below
        # autograd, since nothing needs a gradient.
        with torch._C._AutoDispatchBelowAutograd():
            return _latent_cost_op.op(z, goal, weights, metric, reduce)
    check = _launch.check_tensor
    check(OP, "z", z, ndim=3, dtypes=_launch.FLOAT_DTYPES)
    B, H, D = z.shape
    check(OP, "goal", goal, ndim=2, dtypes=_launch.FLOAT_DTYPES, device=z.device)
    _launch.check_same_dtype(OP, "goal", goal, "z", z)
    if goal.shape[1] != D:
        raise ValueError(f"{OP}: goal must be [G, D] with D = {D} (z's embedding dim), got {list(goal.shape)}")
    if B % goal.shape[0]:
        raise ValueError(f"{OP}: goal rows G = {goal.shape[0]} must divide the batch B = {B} (z is {list(z.shape)})")
    if metric not in METRICS:
        raise ValueError(f"{OP}: metric must be one of {METRICS}, got {metric!r}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"{OP}: reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if weights is not None:
        if reduce != "sum":
            raise ValueError(f"{OP}: weights apply to reduce='sum' only, got reduce={reduce!r}")
        check(OP, "weights", weights, ndim=1, dtypes=(torch.float32,), device=z.device)
        _launch.check_shape(OP, "weights", weights, (H,), "[H]")
    if native and not grad:
        with torch._C._AutoDispatchBelowAutograd():
            return _latent_cost_op.op(z, goal, weights, metric, reduce)
    if _launch.backend_for(OP, z.device) == "reference":
        # Plain differentiable torch ops: autograd and torch.compile see through them.
        return latent_cost_reference(z, goal, metric=metric, reduce=reduce, weights=weights)
    return _latent_cost_op(z, goal, weights, metric, reduce)
