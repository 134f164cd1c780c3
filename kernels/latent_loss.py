"""Fused JEPA latent loss: smooth-L1 or L2 between predicted and target embeddings.

Math (rows m over every leading dim, features d over the last dim D, ``keep`` the per-token mask)::

    l(x)     = 0.5 x^2 / beta if |x| < beta else |x| - 0.5 beta     (smooth_l1; beta = 0 is L1)
             = x^2                                                  (l2)
    row[m]   = mean_d l(pred[m, d] - target[m, d])
    loss     = sum_m keep[m] * row[m] / max(sum_m keep[m], 1)

so the loss is the mean over kept tokens of the per-token mean over features (the I-JEPA loss on the
gathered target tokens, without gathering them). No kept token gives 0, never NaN.

Shapes: pred and target ``[..., D]`` (same shape and dtype: fp32, fp16, bf16), mask bool ``[...]``
(True = the token counts). The loss is an fp32 scalar; math is fp32 whatever the storage dtype.
The forward writes one fp32 partial per row (no atomics: deterministic), summed on device; the
backward scales by a device scalar, so neither direction synchronises with the host.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _launch, _native
from ._launch import tl, triton
from ._registry import KernelSpec, register_kernel, signature

OP = "latent_loss"
KINDS = ("smooth_l1", "l2")


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _diff_tile(pred_ptr, target_ptr, r, cols, tile_ok, stride_pred, stride_target):
    """pred - target on a [rows, cols] tile, in fp32 (masked entries are 0)."""
    p = tl.load(pred_ptr + r[:, None] * stride_pred + cols[None, :], mask=tile_ok, other=0.0)
    t = tl.load(target_ptr + r[:, None] * stride_target + cols[None, :], mask=tile_ok, other=0.0)
    return p.to(tl.float32) - t.to(tl.float32)


@triton.jit
def _latent_loss_fwd_kernel(
    # pointers
    pred_ptr, target_ptr, keep_ptr, row_loss_ptr,
    # sizes and strides (elements)
    M, D, stride_pred, stride_target,
    # loss parameters (inv_beta = 1 / beta, 0 when beta = 0)
    beta, inv_beta,
    # meta-parameters
    HAS_MASK: tl.constexpr, SMOOTH_L1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # The program's first row in int64 (M * D can exceed 2^31); offsets inside the tile stay int32,
    # which keeps per-element address arithmetic (and registers) small.
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    pred_ptr += row0 * stride_pred
    target_ptr += row0 * stride_target
    r = tl.arange(0, BLOCK_M)
    row_ok = r < M - row0
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Sweep the features in BLOCK_D chunks, accumulating the elementwise loss in fp32.
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        tile_ok = row_ok[:, None] & (cols[None, :] < D)
        diff = _diff_tile(pred_ptr, target_ptr, r, cols, tile_ok, stride_pred, stride_target)
        if SMOOTH_L1:
            ad = tl.abs(diff)
            # beta = 0 never takes the quadratic branch: plain L1.
            elem = tl.where(ad < beta, 0.5 * diff * diff * inv_beta, ad - 0.5 * beta)
        else:
            elem = diff * diff
        acc += tl.sum(elem, axis=1)

    # Per-token mean over features, zeroed where the token is not kept.
    acc = acc / D
    if HAS_MASK:
        keep = tl.load(keep_ptr + row0 + r, mask=row_ok, other=0).to(tl.float32)
        acc = acc * keep
    tl.store(row_loss_ptr + row0 + r, acc, mask=row_ok)


@triton.jit
def _latent_loss_bwd_kernel(
    # pointers
    pred_ptr, target_ptr, keep_ptr, scale_ptr, grad_pred_ptr, grad_target_ptr,
    # sizes and strides (elements; the gradients are contiguous [M, D])
    M, D, stride_pred, stride_target,
    # loss parameters (inv_beta = 1 / beta, 0 when beta = 0)
    beta, inv_beta,
    # meta-parameters
    HAS_MASK: tl.constexpr, SMOOTH_L1: tl.constexpr, GRAD_TARGET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    pred_ptr += row0 * stride_pred
    target_ptr += row0 * stride_target
    grad_pred_ptr += row0 * D
    grad_target_ptr += row0 * D
    r = tl.arange(0, BLOCK_M)
    row_ok = r < M - row0
    # scale = grad_loss / (max(kept, 1) * D), computed on device by the launcher.
    scale = tl.load(scale_ptr).to(tl.float32)
    row_scale = tl.zeros([BLOCK_M], dtype=tl.float32) + scale
    if HAS_MASK:
        row_scale = row_scale * tl.load(keep_ptr + row0 + r, mask=row_ok, other=0).to(tl.float32)

    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        tile_ok = row_ok[:, None] & (cols[None, :] < D)
        diff = _diff_tile(pred_ptr, target_ptr, r, cols, tile_ok, stride_pred, stride_target)
        if SMOOTH_L1:
            sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
            dl = tl.where(tl.abs(diff) < beta, diff * inv_beta, sign)
        else:
            dl = 2.0 * diff
        g = dl * row_scale[:, None]
        offs = r[:, None] * D + cols[None, :]
        tl.store(grad_pred_ptr + offs, g.to(grad_pred_ptr.dtype.element_ty), mask=tile_ok)
        if GRAD_TARGET:
            tl.store(grad_target_ptr + offs, (-g).to(grad_target_ptr.dtype.element_ty), mask=tile_ok)


# --------------------------------------------------------------------------------------------------
# Launchers: check constraints, allocate, pick the config, launch.
# --------------------------------------------------------------------------------------------------
def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [M, D] with unit feature stride (a copy only when the input needs one)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _keep_rows(mask: Optional[torch.Tensor], ref: torch.Tensor) -> torch.Tensor:
    # bool -> uint8 view for the kernel; a dummy pointer when there is no mask (HAS_MASK=False).
    return mask.reshape(-1).contiguous().view(torch.uint8) if mask is not None else ref


def latent_loss_forward(pred, target, mask, kind: str, beta: float) -> torch.Tensor:
    p2, t2 = _as_rows(pred), _as_rows(target)
    M, D = p2.shape
    row_loss = torch.empty(M, device=pred.device, dtype=torch.float32)
    cfg = _launch.row_tile(D, "latent_loss_fwd")
    grid = (_launch.cdiv(M, cfg.constexprs["BLOCK_M"]),)
    _latent_loss_fwd_kernel[grid](
        p2, t2, _keep_rows(mask, row_loss), row_loss,
        M, D, p2.stride(0), t2.stride(0), float(beta), 1.0 / beta if beta > 0 else 0.0,
        HAS_MASK=mask is not None, SMOOTH_L1=kind == "smooth_l1",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.constexprs,
    )
    kept = mask.sum() if mask is not None else torch.full((), M, device=pred.device)
    return row_loss.sum() / kept.clamp_min(1).to(torch.float32)


def latent_loss_backward(grad, pred, target, mask, kind: str, beta: float, grad_target: bool):
    p2, t2 = _as_rows(pred), _as_rows(target)
    M, D = p2.shape
    kept = mask.sum() if mask is not None else torch.full((), M, device=pred.device)
    scale = (grad.to(torch.float32) / (kept.clamp_min(1).to(torch.float32) * D)).reshape(1)
    d_pred = torch.empty((M, D), device=pred.device, dtype=pred.dtype)
    d_target = torch.empty((M, D), device=pred.device, dtype=target.dtype) if grad_target else d_pred
    cfg = _launch.row_tile(D, "latent_loss_bwd")
    grid = (_launch.cdiv(M, cfg.constexprs["BLOCK_M"]),)
    _latent_loss_bwd_kernel[grid](
        p2, t2, _keep_rows(mask, scale), scale, d_pred, d_target,
        M, D, p2.stride(0), t2.stride(0), float(beta), 1.0 / beta if beta > 0 else 0.0,
        HAS_MASK=mask is not None, SMOOTH_L1=kind == "smooth_l1", GRAD_TARGET=grad_target,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.constexprs,
    )
    return d_pred.view(pred.shape), (d_target.view(target.shape) if grad_target else None)


# Types of the runtime arguments that are not the storage dtype's pointers or i32 sizes/strides.
_TYPES = {"keep_ptr": "*u8", "beta": "fp32", "inv_beta": "fp32"}


def _variants(kernel, types: dict, extra: dict) -> dict:
    out = {}
    for name in _launch.TYPE_NAMES.values():
        sig = signature(kernel, f"*{name}", {**_TYPES, **types})
        out[f"{name}/smooth_l1/mask"] = (sig, {"HAS_MASK": True, "SMOOTH_L1": True, **extra})
        out[f"{name}/l2"] = (sig, {"HAS_MASK": False, "SMOOTH_L1": False, **extra})
    return out


register_kernel(KernelSpec("latent_loss_fwd", _latent_loss_fwd_kernel,
                           _variants(_latent_loss_fwd_kernel, {"row_loss_ptr": "*fp32"}, {}), _launch.ROW_TILES,
                           search_space=_launch.search_space(_launch.ROW_TABLE, _launch.ROW_CANDIDATES)))
register_kernel(KernelSpec("latent_loss_bwd", _latent_loss_bwd_kernel,
                           _variants(_latent_loss_bwd_kernel, {"scale_ptr": "*fp32"}, {"GRAD_TARGET": True}),
                           _launch.ROW_TILES,
                           search_space=_launch.search_space(_launch.ROW_TABLE, _launch.ROW_CANDIDATES)))


# --------------------------------------------------------------------------------------------------
# Reference (the specification)
# --------------------------------------------------------------------------------------------------
def latent_loss_reference(pred, target, mask=None, *, kind: str = "smooth_l1", beta: float = 1.0):
    """Plain PyTorch: fp32 elementwise loss, mean over features, masked mean over tokens."""
    p, t = pred.float(), target.float()
    if kind == "smooth_l1":
        elem = F.smooth_l1_loss(p, t, reduction="none", beta=beta) if beta > 0 else (p - t).abs()
    else:
        elem = (p - t).square()
    per_token = elem.mean(dim=-1)
    if mask is None:
        return per_token.mean()
    keep = mask.to(per_token.dtype)
    return (per_token * keep).sum() / keep.sum().clamp_min(1)


def latent_loss_backward_reference(grad, pred, target, mask=None, *, kind: str = "smooth_l1", beta: float = 1.0):
    """Gradients of :func:`latent_loss_reference` w.r.t. pred and target, written out (the custom
    op's body runs below autograd, so the reference backward cannot call autograd)."""
    diff = pred.float() - target.float()
    if kind == "smooth_l1":
        # where(|x| < beta, x / beta, sign(x)) in one op
        dl = (diff / beta).clamp(-1.0, 1.0) if beta > 0 else diff.sign()
    else:
        dl = 2.0 * diff
    D = pred.shape[-1]
    if mask is None:
        keep, kept = 1.0, diff[..., 0].numel()
    else:
        keep = mask.to(torch.float32).unsqueeze(-1)
        kept = mask.sum().clamp_min(1)
    g = dl * keep * (grad.float() / (kept * D))
    return g.to(pred.dtype), (-g).to(target.dtype)


# --------------------------------------------------------------------------------------------------
# Public op: validation, dispatch, autograd, torch.library registration
# --------------------------------------------------------------------------------------------------
# The forward's schema: defined in C++ (csrc/losses.cpp, with its CPU kernel) when the native library is
# loaded, else here. The backward stays a Python op (a C++ process plans, it does not train).
SCHEMA = "latent_loss(Tensor pred, Tensor target, Tensor? mask, str kind, float beta) -> Tensor"


def _forward_kernel(pred, target, mask, kind, beta):
    """The Python kernel of the forward op: the Triton kernel, or the reference."""
    if _launch.backend_for(OP, pred.device) == "triton":
        return latent_loss_forward(pred, target, mask, kind, beta)
    return latent_loss_reference(pred, target, mask, kind=kind, beta=beta)


def _forward_fake(pred, target, mask, kind, beta):
    return pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("jepa_engine::latent_loss_backward", mutates_args=())
def _latent_loss_backward_op(grad: torch.Tensor, pred: torch.Tensor, target: torch.Tensor,
                             mask: Optional[torch.Tensor], kind: str, beta: float
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    if _launch.backend_for(OP, pred.device) == "triton":
        d_pred, d_target = latent_loss_backward(grad, pred, target, mask, kind, beta, True)
        return d_pred, d_target
    d_pred, d_target = latent_loss_backward_reference(grad, pred, target, mask, kind=kind, beta=beta)
    return d_pred, d_target


@_latent_loss_backward_op.register_fake
def _(grad, pred, target, mask, kind, beta):
    return torch.empty_like(pred), torch.empty_like(target)


def _setup_context(ctx, inputs, output):
    pred, target, mask, kind, beta = inputs
    ctx.save_for_backward(pred, target, mask)
    ctx.kind, ctx.beta = kind, beta


def _backward(ctx, grad):
    pred, target, mask = ctx.saved_tensors
    d_pred, d_target = _latent_loss_backward_op(grad, pred, target, mask, ctx.kind, ctx.beta)
    return (d_pred if ctx.needs_input_grad[0] else None,
            d_target if ctx.needs_input_grad[1] else None, None, None, None)


_latent_loss_op = _native.Op(OP, SCHEMA, _forward_kernel, _forward_fake, backward=_backward,
                             setup_context=_setup_context)
# Plain CPU calls that need no gradient take the C++ kernel; those that need one keep the reference ops
# under autograd. Measured (csrc/losses.cpp's kernel against latent_loss_reference, 2-core AMD EPYC with
# AVX2, shared with other jobs: best of repeats, masked 90%, 1 thread; the public function both ways):
#   forward, M x D = 64 x 33 / 640 x 192 / 2560 x 384 / 20480 x 768, fp32 smooth_l1:
#     31 / 92 / 239 / 18600 us against 174 / 435 / 858 / 117000 us (3.6-6.3x; l2 and bf16 4-70x);
#     2 threads: 28 / 83 / 205 / 13700 us; the reference 156 us at 64 x 33, 270-455 us at 2560 x 384 (the
#     closest case), 169000 us at 20480 x 768;
#   forward + backward, the C++ forward under the registered formula (its backward is the written-out
#     latent_loss_backward_reference, which allocates the fp32 difference) against autograd through the
#     reference: 0.28-1.8x, slower at most shapes (640 x 192 fp32 smooth_l1: 1160 against 540 us).
_NATIVE = OP in _native.native_ops()


def _native_runs(pred, target, mask) -> bool:
    """Whether the public op takes the C++ kernel: the library defines it, the call is a plain CPU call
    (:func:`_native.cpu_kernel_runs`) and nothing traces it (a traced graph keeps the reference ops)."""
    return (_NATIVE and not torch.compiler.is_compiling()
            and _native.cpu_kernel_runs(pred, target, *(() if mask is None else (mask,))))


def latent_loss(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                kind: str = "smooth_l1", beta: float = 1.0) -> torch.Tensor:
    """JEPA latent loss between predicted and target embeddings, averaged over the kept tokens.

    Args:
        pred: ``[..., D]`` predicted embeddings (fp32, fp16 or bf16).
        target: ``[..., D]`` target embeddings, same shape, dtype and device as ``pred``.
        mask: optional bool ``[...]`` (``pred.shape[:-1]``); True = the token counts in the loss.
        kind: ``"smooth_l1"`` (I-JEPA) or ``"l2"``.
        beta: smooth-L1 threshold (>= 0; 0 gives L1).

    Returns:
        fp32 scalar: mean over kept tokens of the per-token mean over features (0 if none is kept).
    """
    native = _native_runs(pred, target, mask)
    grad = native and torch.is_grad_enabled() and (pred.requires_grad or target.requires_grad)
    if native and not grad and type(kind) is str and type(beta) is float:
        # The C++ kernel makes the checks below itself, in the same order, with the same messages (a float
        # beta formats as Python does); below autograd, since nothing needs a gradient.
        with torch._C._AutoDispatchBelowAutograd():
            return _latent_loss_op.op(pred, target, mask, kind, beta)
    check = _launch.check_tensor
    check(OP, "pred", pred, min_ndim=2, dtypes=_launch.FLOAT_DTYPES)
    check(OP, "target", target, min_ndim=2, dtypes=_launch.FLOAT_DTYPES, device=pred.device)
    _launch.check_shape(OP, "target", target, pred.shape, "pred.shape")
    _launch.check_same_dtype(OP, "target", target, "pred", pred)
    if mask is not None:
        check(OP, "mask", mask, dtypes=(torch.bool,), device=pred.device)
        _launch.check_shape(OP, "mask", mask, pred.shape[:-1], "pred.shape[:-1]")
    if kind not in KINDS:
        raise ValueError(f"{OP}: kind must be one of {KINDS}, got {kind!r}")
    if not (beta >= 0.0):
        raise ValueError(f"{OP}: beta must be >= 0, got {beta}")
    if native and not grad:
        with torch._C._AutoDispatchBelowAutograd():
            return _latent_loss_op.op(pred, target, mask, kind, float(beta))
    # On CUDA the route table (kernels/routes.py) picks the reference ops unless the kernels are forced.
    if _launch.backend_for(OP, pred.device) == "reference":
        # Plain differentiable torch ops: autograd and torch.compile see through them.
        return latent_loss_reference(pred, target, mask, kind=kind, beta=float(beta))
    return _latent_loss_op(pred, target, mask, kind, float(beta))
