"""A world model's per-step linear layer, and its last step fused with the cost to the goal.

Math (rows m of x ``[M, K]``, weight ``[N, K]`` in ``nn.Linear`` layout)::

    LN0(x)[m, k] = (x[m, k] - mean_m) / sqrt(var_m + eps)     (normalize=True: layer norm over K
                                                               without affine, biased variance)
                 = x[m, k]                                     (normalize=False)
    fused_linear:      y[m, n] = act(sum_k LN0(x)[m, k] * weight[n, k] + bias[n]) + residual[m, n]
    linear_goal_cost:  z[m, d] = sum_k LN0(x)[m, k] * weight[d, k] + bias[d]
                       cost[m] = sum_d (z[m, d] - goal[g(m), d])^2     (metric="l2": squared distance)
                               = sum_d |z[m, d] - goal[g(m), d]|       (metric="l1")

``act`` is the identity or the exact (erf) GELU of ``nn.GELU()``. LayerNorm's gamma/beta are folded
into weight/bias by the caller (:func:`fold_layernorm`), so ``LN -> Linear`` is one op. The goal
grouping is that of ``latent_cost``: ``g(m) = m // (M // G)`` for a goal of G rows, G dividing M (the N
candidates of environment e, adjacent rows, share goal row e). The cost is measured on z as returned
(rounded to x's dtype), so it equals ``latent_cost`` of the returned z.

Dtypes: x, weight, bias, residual and goal share one dtype (fp32, fp16, bf16); products accumulate in
fp32, y and z are stored in x's dtype, the cost is fp32 ``[M]``. With normalize, the normalized x is
rounded to the storage dtype before the product (as ``F.layer_norm`` followed by a matmul does).

Inference only (planning runs under ``torch.no_grad()``): there is no backward. Both ops raise a
``ValueError`` when an input requires grad while grad mode is on, on every backend, so a training
loop cannot silently get a graph that stops at this op.

Kernel: one program per ``BLOCK_M x BLOCK_N`` output tile, a K loop of ``tl.dot`` with fp32
accumulation (fp16/bf16 on tensor cores; fp32 in IEEE fp32 unless ``torch.backends.cuda.matmul.
allow_tf32`` asks for TF32, as for ``torch.nn.Linear``). With normalize, a first pass over K computes
each row's mean and rstd in fp32 (sums shifted by the row's first element against cancellation) and
the second pass normalizes A tiles as they are loaded. Epilogue: bias, GELU (libdevice ``erff``, no
stack frame), residual, store; linear_goal_cost takes all D columns in one tile (``BLOCK_N >= D``,
D <= 256) and reduces the row distance in registers. Row offsets are int64 (M * N may exceed 2^31);
weight must have fewer than 2^31 elements. Launch tiles come from a table by dtype and N (no autotune).

The PyTorch reference is the planner's CPU path: ``F.layer_norm`` (with a cached unit affine: torch's
CPU kernel without weight/bias is twice as slow), ``torch.addmm``, ``F.gelu`` and an in-place residual
add, with no copies beyond those ops' outputs.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from . import _launch, _native
from ._launch import tl, triton
from ._registry import KernelSpec, LaunchConfig, register_kernel, signature

OP = "fused_linear"
OP_COST = "linear_goal_cost"
ACTIVATIONS = (None, "gelu")
METRICS = ("l2", "l1")
MAX_GOAL_DIM = 256


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _row_stats(x_tile, row_ok, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """(mean, rstd) of each row over its K columns, fp32. Sums are taken about the row's first
    element c: var = E[(x - c)^2] - E[x - c]^2 keeps its precision when |mean| >> std."""
    c = tl.load(x_tile, mask=row_ok, other=0.0).to(tl.float32)
    s1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (ks[None, :] < K)
        x = tl.load(x_tile[:, None] + ks[None, :], mask=ok, other=0.0).to(tl.float32)
        d = tl.where(ok, x - c[:, None], 0.0)
        s1 += tl.sum(d, axis=1)
        s2 += tl.sum(d * d, axis=1)
    m1 = s1 / K
    var = tl.maximum(s2 / K - m1 * m1, 0.0)
    return c + m1, 1.0 / tl.sqrt(var + eps)


@triton.jit
def _ln_matmul_tile(x_base, w_ptr, b_ptr, r, row_ok, cols, col_ok, K, stride_xm, stride_wn, eps,
                    NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """fp32 ``[BLOCK_M, BLOCK_N]`` tile of ``LN0(x) @ weight.T + bias``. ``x_base`` points at the
    tile's first row (int64 offset, taken once); in-tile offsets ``r * stride_xm`` are int32."""
    x_tile = x_base + r * stride_xm
    w_cols = w_ptr + cols * stride_wn
    if NORMALIZE:
        mean, rstd = _row_stats(x_tile, row_ok, K, eps, BLOCK_M, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a_ok = row_ok[:, None] & k_ok[None, :]
        a = tl.load(x_tile[:, None] + ks[None, :], mask=a_ok, other=0.0)
        # W^T tile [BLOCK_K, BLOCK_N]: element (k, n) is weight[n, k].
        w = tl.load(w_cols[None, :] + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 arithmetic is wrong: compute on fp32 copies there
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        if NORMALIZE:
            an = (a.to(tl.float32) - mean[:, None]) * rstd[:, None]
            a = tl.where(a_ok, an, 0.0).to(w.dtype)   # padding columns stay 0 after the shift
        acc += tl.dot(a, w, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _fused_linear_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, r_ptr, y_ptr,
    # sizes and strides (elements; every column stride is 1)
    M, N, K, stride_xm, stride_wn, stride_rm, stride_ym, eps,
    # meta-parameters
    NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # The tile's first row in int64 (M * N may exceed 2^31); offsets inside the tile are int32.
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    r = tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = r < M - row0
    col_ok = cols < N
    acc = _ln_matmul_tile(x_ptr + row0 * stride_xm, w_ptr, b_ptr, r, row_ok, cols, col_ok, K, stride_xm,
                          stride_wn, eps, NORMALIZE, HAS_BIAS, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    if GELU:  # exact GELU: x * Phi(x) = 0.5 x (1 + erf(x / sqrt(2)))
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    ok = row_ok[:, None] & col_ok[None, :]
    if HAS_RESIDUAL:
        res = tl.load(r_ptr + row0 * stride_rm + (r[:, None] * stride_rm + cols[None, :]), mask=ok, other=0.0)
        acc += res.to(tl.float32)
    tl.store(y_ptr + row0 * stride_ym + (r[:, None] * stride_ym + cols[None, :]),
             acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _linear_goal_cost_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, goal_ptr, z_ptr, cost_ptr,
    # sizes and strides (elements; every column stride is 1)
    M, D, K, rows_per_goal, stride_xm, stride_wn, stride_g, stride_zm, eps,
    # meta-parameters
    NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, L1: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    r = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)  # BLOCK_N >= D: the whole embedding in one tile
    row_ok = r < M - row0
    col_ok = cols < D
    acc = _ln_matmul_tile(x_ptr + row0 * stride_xm, w_ptr, b_ptr, r, row_ok, cols, col_ok, K, stride_xm,
                          stride_wn, eps, NORMALIZE, HAS_BIAS, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    ok = row_ok[:, None] & col_ok[None, :]
    z = acc.to(z_ptr.dtype.element_ty)
    tl.store(z_ptr + row0 * stride_zm + (r[:, None] * stride_zm + cols[None, :]), z, mask=ok)
    # The cost of z as stored (rounded to its dtype), in fp32. Goal rows: G * D < 2^31 (int32).
    g_row = ((row0 + r) // rows_per_goal).to(tl.int32)
    g = tl.load(goal_ptr + (g_row[:, None] * stride_g + cols[None, :]), mask=ok, other=0.0)
    diff = tl.where(ok, z.to(tl.float32) - g.to(tl.float32), 0.0)
    if L1:
        cost = tl.sum(tl.abs(diff), axis=1)
    else:
        cost = tl.sum(diff * diff, axis=1)
    tl.store(cost_ptr + row0 + r, cost, mask=row_ok)


# --------------------------------------------------------------------------------------------------
# Launch tables: tiles by dtype class ("16bit" on tensor cores, "fp32") and output width.
# --------------------------------------------------------------------------------------------------
# Chosen so that the widest switch combination (layer norm + bias + GELU + residual, l2 cost)
# compiles without spills or a stack frame for sm_90a and sm_80 even for row strides Triton cannot
# specialize as 16-divisible (the audit compiles that worst case). 16-bit BLOCK_K = 32: one K chunk holds
# two 16-deep tensor-core steps and keeps the normalized A tile small.
# fused_linear, keyed by (dtype class, 64 for N <= 64 else 128): 16-bit 64 x 64 or 64 x 128 tiles
# (N = 256 runs as two column tiles, each recomputing the cheap row statistics); fp32 dots are FMA
# (IEEE) or TF32, with smaller tiles.
_LINEAR_CONFIGS = {
    ("16bit", 64): LaunchConfig({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    ("16bit", 128): LaunchConfig({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    ("fp32", 64): LaunchConfig({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=4, num_stages=2),
    ("fp32", 128): LaunchConfig({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=8, num_stages=2),
}
# linear_goal_cost, keyed by (dtype class, BLOCK_N = next power of 2 >= D, at least 64): one column
# tile holds the whole embedding; 256-wide rows take 32-row tiles (mma.sync on both targets: a 64-row
# wgmma tile sits at the 255-register limit in the epilogue).
_COST_CONFIGS = {
    ("16bit", 64): LaunchConfig({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=2),
    ("16bit", 128): LaunchConfig({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=2),
    ("16bit", 256): LaunchConfig({"BLOCK_M": 32, "BLOCK_N": 256, "BLOCK_K": 32}, num_warps=8, num_stages=2),
    ("fp32", 64): LaunchConfig({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=4, num_stages=2),
    ("fp32", 128): LaunchConfig({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 16}, num_warps=8, num_stages=2),
    ("fp32", 256): LaunchConfig({"BLOCK_M": 32, "BLOCK_N": 256, "BLOCK_K": 16}, num_warps=8, num_stages=2),
}
# What the tuner (kernels/tuning.py) times beside each entry; all compile spill-free for sm_90a and sm_80
# (`audit --search-space`: 128-row 16-bit tiles and 64-deep K chunks with 64 rows need a stack frame in
# the layer-norm + GELU + residual form). Rows: BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages.
# linear_goal_cost keeps BLOCK_N = its key (one column tile holds the whole embedding).
_MNK = "BLOCK_M,BLOCK_N,BLOCK_K"
_LINEAR_SEARCH = _launch.search_space(_LINEAR_CONFIGS, {
    ("16bit", 64): _launch.candidates(_MNK, (32, 64, 32, 4, 3), (64, 64, 32, 4, 4), (64, 64, 32, 4, 2),
                                      (32, 64, 64, 4, 3)),
    ("16bit", 128): _launch.candidates(_MNK, (64, 128, 64, 8, 3), (64, 64, 32, 4, 3), (64, 128, 32, 8, 4)),
    ("fp32", 64): _launch.candidates(_MNK, (64, 64, 16, 4, 2), (32, 32, 16, 4, 2)),
    ("fp32", 128): _launch.candidates(_MNK, (32, 128, 16, 8, 2), (64, 128, 16, 8, 2), (32, 64, 16, 4, 2)),
})
_COST_SEARCH = _launch.search_space(_COST_CONFIGS, {
    ("16bit", 64): _launch.candidates(_MNK, (32, 64, 32, 4, 2), (64, 64, 32, 4, 3), (128, 64, 32, 8, 2)),
    ("16bit", 128): _launch.candidates(_MNK, (32, 128, 32, 4, 2), (64, 128, 32, 8, 3), (64, 128, 64, 8, 2)),
    ("16bit", 256): _launch.candidates(_MNK, (32, 256, 32, 8, 3), (16, 256, 32, 8, 2)),
    ("fp32", 64): _launch.candidates(_MNK, (16, 64, 16, 4, 2), (64, 64, 16, 4, 2), (32, 64, 32, 4, 2)),
    ("fp32", 128): _launch.candidates(_MNK, (16, 128, 16, 4, 2), (32, 128, 32, 8, 2)),
    ("fp32", 256): _launch.candidates(_MNK, (16, 256, 16, 8, 2), (16, 256, 16, 4, 2)),
})


@functools.lru_cache(maxsize=None)
def _interp_config(n_cols: int) -> LaunchConfig:
    """Small tiles under the interpreter (it runs each program in numpy): speed, and the K loop, the
    row and column masks are all exercised on small test shapes."""
    return LaunchConfig({"BLOCK_M": 16, "BLOCK_N": n_cols, "BLOCK_K": 16}, num_warps=4, num_stages=1)


def _linear_config(dtype: torch.dtype, N: int, cuda: bool = False) -> LaunchConfig:
    """The launch config of ``N`` output columns (``cuda``: the CUDA table's, even under the interpreter)."""
    return _launch.pick_config(_LINEAR_CONFIGS, dtype, 64 if N <= 64 else 128,
                               interpret=None if cuda else _interp_config(32), kernel="fused_linear")


def _cost_config(dtype: torch.dtype, D: int, cuda: bool = False) -> LaunchConfig:
    """The launch config of a ``D``-wide goal (``cuda``: the CUDA table's, even under the interpreter)."""
    width = max(16, _launch.next_power_of_2(D))
    return _launch.pick_config(_COST_CONFIGS, dtype, max(64, width), interpret=None if cuda else _interp_config(width),
                               kernel="linear_goal_cost")


# In-tile offsets (row in tile) * (row stride) are int32: row strides stay below this.
_MAX_ROW_STRIDE = 2**31 // 256


def _unit_cols(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` itself when its column stride is 1 and its row stride fits the int32 in-tile offsets (any
    other row stride: views are read in place), else a contiguous copy."""
    if t is None or ((t.stride(-1) == 1 or t.shape[-1] == 1) and t.stride(0) < _MAX_ROW_STRIDE):
        return t
    return t.contiguous()


def fused_linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], normalize: bool,
                         eps: float, gelu: bool, residual: Optional[torch.Tensor]) -> torch.Tensor:
    x, weight, residual = _unit_cols(x), _unit_cols(weight), _unit_cols(residual)
    bias = bias.contiguous() if bias is not None else None
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    cfg = _linear_config(x.dtype, N)
    grid = (_launch.cdiv(M, cfg.constexprs["BLOCK_M"]), _launch.cdiv(N, cfg.constexprs["BLOCK_N"]))
    _fused_linear_kernel[grid](
        x, weight, bias if bias is not None else y, residual if residual is not None else y, y,
        M, N, K, _launch.row_stride(x), _launch.row_stride(weight),
        _launch.row_stride(residual) if residual is not None else 0, N, float(eps),
        NORMALIZE=bool(normalize), HAS_BIAS=bias is not None, GELU=bool(gelu), HAS_RESIDUAL=residual is not None,
        UPCAST=_launch.upcast_bf16(x.dtype), PRECISION=_launch.linear_dot_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.constexprs,
    )
    return y


def linear_goal_cost_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], goal: torch.Tensor,
                             normalize: bool, eps: float, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, weight, goal = _unit_cols(x), _unit_cols(weight), _unit_cols(goal)
    bias = bias.contiguous() if bias is not None else None
    M, K = x.shape
    D = weight.shape[0]
    z = torch.empty((M, D), device=x.device, dtype=x.dtype)
    cost = torch.empty(M, device=x.device, dtype=torch.float32)
    cfg = _cost_config(x.dtype, D)
    grid = (_launch.cdiv(M, cfg.constexprs["BLOCK_M"]),)
    _linear_goal_cost_kernel[grid](
        x, weight, bias if bias is not None else z, goal, z, cost,
        M, D, K, M // goal.shape[0], _launch.row_stride(x), _launch.row_stride(weight), _launch.row_stride(goal), D,
        float(eps),
        NORMALIZE=bool(normalize), HAS_BIAS=bias is not None, L1=metric == "l1",
        UPCAST=_launch.upcast_bf16(x.dtype), PRECISION=_launch.linear_dot_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.constexprs,
    )
    return z, cost


# --------------------------------------------------------------------------------------------------
# Audit registration: every dtype, the widest switch combination and a plain one, every table entry.
# --------------------------------------------------------------------------------------------------
# Types of the runtime arguments that are not the storage dtype's pointers or i32 sizes/strides.
_LINEAR_TYPES = {"eps": "fp32"}
_COST_TYPES = {"cost_ptr": "*fp32", "eps": "fp32"}


def _variants(kernel, types: dict, switches: dict[str, dict]) -> dict:
    """Every dtype x switch combination, with the dtype's default precision, plus the fp32 TF32 form of
    the first (widest) combination."""
    out = {}
    for dtype, name in _launch.TYPE_NAMES.items():
        sig = signature(kernel, f"*{name}", types)
        base = {"UPCAST": False, "PRECISION": _launch.dot_precision(dtype, allow_tf32=False)}
        for label, consts in switches.items():
            out[f"{name}/{label}"] = (sig, {**base, **consts})
    widest = next(iter(switches))
    sig, consts = out[f"fp32/{widest}"]
    out[f"fp32/tf32/{widest}"] = (sig, {**consts, "PRECISION": _launch.dot_precision(torch.float32, allow_tf32=True)})
    return out


def _linear_variants():
    return _variants(_fused_linear_kernel, _LINEAR_TYPES, {
        "ln+bias+gelu+res": {"NORMALIZE": True, "HAS_BIAS": True, "GELU": True, "HAS_RESIDUAL": True},
        "plain": {"NORMALIZE": False, "HAS_BIAS": False, "GELU": False, "HAS_RESIDUAL": False},
    })


def _cost_variants():
    return _variants(_linear_goal_cost_kernel, _COST_TYPES, {
        "ln/l2": {"HAS_BIAS": True, "NORMALIZE": True, "L1": False},
        "l1": {"HAS_BIAS": True, "NORMALIZE": False, "L1": True},
    })


if _launch.triton_available():
    register_kernel(KernelSpec("fused_linear", _fused_linear_kernel, _linear_variants(),
                               _launch.table_configs(_LINEAR_CONFIGS), uses_tensor_cores=True,
                               aligned_args=("y_ptr",), search_space=_LINEAR_SEARCH,
                               search_keys=_launch.table_keys(_LINEAR_CONFIGS)))
    register_kernel(KernelSpec("linear_goal_cost", _linear_goal_cost_kernel, _cost_variants(),
                               _launch.table_configs(_COST_CONFIGS), uses_tensor_cores=True,
                               aligned_args=("z_ptr", "cost_ptr"), search_space=_COST_SEARCH,
                               search_keys=_launch.table_keys(_COST_CONFIGS)))


# --------------------------------------------------------------------------------------------------
# References (the specification and the CPU path)
# --------------------------------------------------------------------------------------------------
_UNIT_AFFINE: dict = {}


def _unit_affine(K: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached (ones, zeros) of length K: layer norm weight and bias that change nothing."""
    key = (K, dtype, device)
    pair = _UNIT_AFFINE.get(key)
    if pair is None:
        with torch.inference_mode(False):   # plain tensors, usable outside inference mode too
            pair = (torch.ones(K, dtype=dtype, device=device), torch.zeros(K, dtype=dtype, device=device))
        _UNIT_AFFINE[key] = pair
    return pair


def fused_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                           normalize: bool = False, eps: float = 1e-6, activation: Optional[str] = None,
                           residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``act(LN0(x) @ weight.T + bias) + residual`` with the fewest torch ops (one output each)."""
    if normalize:
        K = x.shape[-1]
        if torch.compiler.is_compiling():
            x = F.layer_norm(x, (K,), eps=eps)
        else:
            # A unit affine (cached ones/zeros) is exact and takes torch's fast CPU layer-norm kernel;
            # without weight/bias, torch 2.13 runs a path twice as slow (118 vs 62 us at 1800 x 64).
            x = F.layer_norm(x, (K,), *_unit_affine(K, x.dtype, x.device), eps=eps)
    y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
    if activation == "gelu":
        y = F.gelu(y)
    if residual is not None:
        y.add_(residual)  # y is this call's own fresh tensor
    return y


def linear_goal_cost_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                               goal: torch.Tensor, *, normalize: bool = True, eps: float = 1e-6,
                               metric: str = "l2") -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, cost)``: z as :func:`fused_linear_reference`, the fp32 cost of z to its group's goal row."""
    z = fused_linear_reference(x, weight, bias, normalize=normalize, eps=eps)
    M, D = z.shape
    G = goal.shape[0]
    zg = z.view(G, M // G, D)
    if z.dtype == torch.float32:
        diff = zg - goal[:, None, :]                     # one fresh fp32 tensor
    else:
        diff = zg.float()                                # the fresh fp32 copy is the difference buffer
        diff.sub_(goal.float()[:, None, :])
    cost = (diff.abs_() if metric == "l1" else diff.square_()).sum(-1).view(M)
    return z, cost


def fold_layernorm(norm: torch.nn.LayerNorm, linear: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, bias)`` with ``linear(norm(x)) == fused_linear(x, weight, bias, normalize=True,
    eps=norm.eps)``: ``weight = W * gamma[None, :]``, ``bias = b + W @ beta`` (fp32 math, returned in the
    linear's dtype, detached). A norm without affine parameters folds as gamma = 1, beta = 0."""
    W = linear.weight
    K = W.shape[1]
    if tuple(norm.normalized_shape) != (K,):
        raise ValueError(f"fold_layernorm: norm must normalize the linear's in_features [{K}], "
                         f"got normalized_shape {list(norm.normalized_shape)}")
    with torch.no_grad():
        Wf = W.detach().float()
        gamma = norm.weight.detach().float() if norm.weight is not None else None
        beta = norm.bias.detach().float() if getattr(norm, "bias", None) is not None else None
        weight = Wf * gamma[None, :] if gamma is not None else Wf.clone()
        bias = linear.bias.detach().float().clone() if linear.bias is not None else Wf.new_zeros(W.shape[0])
        if beta is not None:
            bias += Wf @ beta
    return weight.to(W.dtype), bias.to(W.dtype)


# --------------------------------------------------------------------------------------------------
# Public ops: validation, dispatch, torch.library registration (no autograd: inference only)
# --------------------------------------------------------------------------------------------------
SCHEMA = ("fused_linear(Tensor x, Tensor weight, Tensor? bias, bool normalize, float eps, bool gelu, "
          "Tensor? residual) -> Tensor")
SCHEMA_COST = ("linear_goal_cost(Tensor x, Tensor weight, Tensor? bias, Tensor goal, bool normalize, float eps, "
               "str metric) -> (Tensor, Tensor)")


def _linear_kernel(x, weight, bias, normalize, eps, gelu, residual):
    """The Python kernel of fused_linear: the Triton kernel, or the reference."""
    if _launch.backend_for(OP, x.device) == "triton":
        return fused_linear_forward(x, weight, bias, normalize, eps, gelu, residual)
    return fused_linear_reference(x, weight, bias, normalize=normalize, eps=eps,
                                  activation="gelu" if gelu else None, residual=residual)


def _linear_fake(x, weight, bias, normalize, eps, gelu, residual):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _cost_kernel(x, weight, bias, goal, normalize, eps, metric):
    """The Python kernel of linear_goal_cost: the Triton kernel, or the reference."""
    if _launch.backend_for(OP_COST, x.device) == "triton":
        return linear_goal_cost_forward(x, weight, bias, goal, normalize, eps, metric)
    return linear_goal_cost_reference(x, weight, bias, goal, normalize=normalize, eps=eps, metric=metric)


def _cost_fake(x, weight, bias, goal, normalize, eps, metric):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0],), dtype=torch.float32)


# Inference only: no autograd formula (the checks refuse inputs that require grad in grad mode).
_fused_linear_op = _native.Op(OP, SCHEMA, _linear_kernel, _linear_fake)
_linear_goal_cost_op = _native.Op(OP_COST, SCHEMA_COST, _cost_kernel, _cost_fake)
# Whether the public functions take the C++ CPU kernels on plain CPU tensors (the native library defines
# the op). The C++ path makes the checks in C++ and runs its own fp32 layer norm, an in-place GELU and
# the fused cost; measured against the Python path (the Python checks, then the reference), 1 thread,
# median CPU time (2-core machine shared with other jobs), fp32: fused_linear M x K x N = 300 x 64 x 192
# with layer norm 187 vs 230 us, 300 x 64 x 256 with layer norm and GELU 478 vs 577 us, 300 x 256 x 64
# with residual 208 vs 229 us, 1200 x 64 x 192 604 vs 675 us, 1200 x 192 x 768 (ln, GELU) 10.2 vs
# 14.0 ms, 1200 x 768 x 192 (residual) 7.13 vs 7.19 ms, 4096 x 768 x 3072 (ln, GELU) 334 vs 419 ms
# (best of 6); linear_goal_cost (ln, l2, G = 1) M x K x D = 300 x 64 x 32 138 vs 244 us, 1200 x 64 x 32
# 373 vs 563 us, 1200 x 192 x 192 2.03 vs 2.59 ms; fp16/bf16 1.01-1.05x (fused_linear: the same ATen
# GEMM dominates) and 1.08-1.31x (cost). Never slower, so the C++ kernel is taken whenever it can run.
_NATIVE_LINEAR = _fused_linear_op.native
_NATIVE_COST = _linear_goal_cost_op.native


def _check_common(op: str, x, weight, bias, eps, named: dict) -> tuple[int, int, int]:
    """Checks shared by both ops; returns (M, K, N). ``named`` holds the other optional tensors."""
    check = _launch.check_tensor
    check(op, "x", x, ndim=2, dtypes=_launch.FLOAT_DTYPES)
    M, K = x.shape
    check(op, "weight", weight, ndim=2, dtypes=_launch.FLOAT_DTYPES, device=x.device)
    _launch.check_same_dtype(op, "weight", weight, "x", x)
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"{op}: weight must be [N, K] with K = {K} (x's last dim), got {list(weight.shape)}")
    if bias is not None:
        check(op, "bias", bias, ndim=1, dtypes=_launch.FLOAT_DTYPES, device=x.device)
        _launch.check_same_dtype(op, "bias", bias, "x", x)
        _launch.check_shape(op, "bias", bias, (N,), "[N]")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"{op}: eps must be a positive float, got {eps!r}")
    _launch.check_inference_only(op, {"x": x, "weight": weight, "bias": bias, **named})
    return M, K, N


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                 normalize: bool = False, eps: float = 1e-6, activation: Optional[str] = None,
                 residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``act(LN0(x) @ weight.T + bias) + residual`` in one kernel (see the module docstring).

    Args:
        x: ``[M, K]`` (fp32, fp16 or bf16; any row stride, e.g. a slice of a wider tensor).
        weight: ``[N, K]`` (``nn.Linear`` layout), x's dtype and device.
        bias: ``[N]`` or None.
        normalize: layer norm over K without affine first (fold gamma/beta with :func:`fold_layernorm`).
        eps: the layer norm's epsilon.
        activation: None or ``"gelu"`` (exact erf GELU).
        residual: ``[M, N]`` added after the activation, or None.

    Returns:
        ``[M, N]`` in x's dtype. Inference only: raises if an input requires grad in grad mode.
    """
    if (_NATIVE_LINEAR and activation in ACTIVATIONS and type(eps) is float and not torch.compiler.is_compiling()
            and _native.cpu_kernel_runs(x, weight, *(t for t in (bias, residual) if t is not None))):
        # Plain CPU tensors: the C++ kernel, which makes the checks below itself (same order, exception
        # types and messages; a bad activation or a non-float eps takes the Python checks instead).
        return _fused_linear_op(x, weight, bias, bool(normalize), eps, activation == "gelu", residual)
    M, K, N = _check_common(OP, x, weight, bias, eps, {"residual": residual})
    if activation not in ACTIVATIONS:
        raise ValueError(f"{OP}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if residual is not None:
        _launch.check_tensor(OP, "residual", residual, ndim=2, dtypes=_launch.FLOAT_DTYPES, device=x.device)
        _launch.check_same_dtype(OP, "residual", residual, "x", x)
        _launch.check_shape(OP, "residual", residual, (M, N), "[M, N]")
    if _launch.backend_for(OP, x.device) == "reference":
        return fused_linear_reference(x, weight, bias, normalize=normalize, eps=eps, activation=activation,
                                      residual=residual)
    if weight.numel() >= 2**31:
        raise ValueError(f"{OP}: weight must have fewer than 2^31 elements, got {list(weight.shape)}")
    return _fused_linear_op(x, weight, bias, bool(normalize), float(eps), activation == "gelu", residual)


def linear_goal_cost(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], goal: torch.Tensor, *,
                     normalize: bool = True, eps: float = 1e-6, metric: str = "l2"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """A world model's last step and its cost to the goal in one pass (see the module docstring).

    Args:
        x: ``[M, K]`` (fp32, fp16 or bf16; any row stride).
        weight: ``[D, K]``, bias ``[D]`` or None, x's dtype and device.
        goal: ``[G, D]``, G dividing M: row m is scored against goal row ``m // (M // G)``.
        normalize, eps: as :func:`fused_linear`.
        metric: ``"l2"`` (squared distance) or ``"l1"``.

    Returns:
        ``(z, cost)``: z ``[M, D]`` in x's dtype, cost fp32 ``[M]`` (of z as returned). The kernel
        takes D <= 256 (one column tile); the reference has no limit. Inference only.
    """
    if (_NATIVE_COST and metric in METRICS and type(eps) is float and not torch.compiler.is_compiling()
            and _native.cpu_kernel_runs(x, weight, goal, *(() if bias is None else (bias,)))):
        # Plain CPU tensors: the C++ kernel, which makes the checks below itself (see fused_linear).
        return _linear_goal_cost_op(x, weight, bias, goal, bool(normalize), eps, metric)
    M, K, D = _check_common(OP_COST, x, weight, bias, eps, {"goal": goal})
    _launch.check_tensor(OP_COST, "goal", goal, ndim=2, dtypes=_launch.FLOAT_DTYPES, device=x.device)
    _launch.check_same_dtype(OP_COST, "goal", goal, "x", x)
    if goal.shape[1] != D:
        raise ValueError(f"{OP_COST}: goal must be [G, D] with D = {D} (weight's rows), got {list(goal.shape)}")
    if M % goal.shape[0]:
        raise ValueError(f"{OP_COST}: goal rows G = {goal.shape[0]} must divide the rows M = {M} of x "
                         f"(x is {list(x.shape)})")
    if metric not in METRICS:
        raise ValueError(f"{OP_COST}: metric must be one of {METRICS}, got {metric!r}")
    if _launch.backend_for(OP_COST, x.device) == "reference":
        return linear_goal_cost_reference(x, weight, bias, goal, normalize=normalize, eps=eps, metric=metric)
    if D > MAX_GOAL_DIM:
        raise ValueError(f"{OP_COST}: the kernel takes weight rows D <= {MAX_GOAL_DIM} (one column tile), "
                         f"got D = {D} (weight is {list(weight.shape)})")
    if weight.numel() >= 2**31:
        raise ValueError(f"{OP_COST}: weight must have fewer than 2^31 elements, got {list(weight.shape)}")
    return _linear_goal_cost_op(x, weight, bias, goal, bool(normalize), float(eps), metric)
