"""Sampling of a planner's candidate action sequences from its Gaussian, with in-kernel Philox.

For E environments, each with a diagonal Gaussian over P = horizon * action_dim parameters::

    out[e, n, p] = clip(mean[e, p] + std[e, p] * z[e, n, p], low[p % A], high[p % A])
    out[e, 0, p] = clip(mean[e, p], ...)          (with include_mean: the current plan competes too)

``z`` is the value ``offset + (e * N + n) * P + p`` of a standard-normal stream made from
Philox-4x32-10 under the 64-bit key ``seed``, four values from each 128-bit block: value ``j`` (a
uint64 index) comes from the block with counter ``j >> 2`` (wrapping at 2^62), whose outputs
``x0..x3`` become uniforms ``u_i = ((x_i >> 8) + 0.5) / 2^24`` in (0, 1) and two Box-Muller pairs:
values ``4b .. 4b + 3`` are ``r0 cos(w1), r0 sin(w1), r2 cos(w3), r2 sin(w3)`` with
``r_i = sqrt(-2 ln u_i)`` and ``w_i = 2 pi u_i`` (the whole block, as curand_normal4 uses it: a quarter
of the Philox work and half the logarithms of one value per block). The reference (:func:`gaussian_stream`) computes the same Philox
stream with integer torch ops, so both backends draw the same samples for the same seed (to float
rounding of log/cos/sin); the C++ CPU kernel of the native library (csrc/planning_kernels.cpp) draws
the reference's samples bit for bit. ``seed`` and ``offset`` are read from an int64 device tensor
``rng = [seed, offset]`` so a planning loop can advance the stream on the device
(``rng[1] += E * N * P``) and be captured in a CUDA graph.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import _launch, _native
from ._launch import tl, triton
from ._registry import KernelSpec, LaunchConfig, register_kernel, signature

OP = "sample_actions"
_M32 = 0xFFFFFFFF
_BLOCK_MASK = (1 << 62) - 1   # Philox block of value j: (j >> 2) of j as uint64
_PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)
_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)


# --------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------
@triton.jit
def _cos_2pi(u):
    """cos(2 pi u) for u in (0, 1): reduced to [0, pi/2] by symmetry, then a degree-12 Taylor
    polynomial (error < 1e-8). libdevice's cosf carries a stack frame for huge arguments that this
    range never needs."""
    v = tl.abs(u - 0.5)                       # cos(2 pi u) = -cos(2 pi v)
    flip = v > 0.25                           # cos(2 pi v) = -cos(2 pi (0.5 - v))
    x = 6.283185307179586 * tl.where(flip, 0.5 - v, v)
    x2 = x * x
    c = 1.0 + x2 * (-1.0 / 2 + x2 * (1.0 / 24 + x2 * (-1.0 / 720 + x2 * (1.0 / 40320 + x2 * (
        -1.0 / 3628800 + x2 * (1.0 / 479001600))))))
    return tl.where(flip, c, -c)


@triton.jit
def _sample_actions_kernel(
    # pointers
    mean_ptr, std_ptr, low_ptr, high_ptr, rng_ptr, out_ptr,
    # sizes
    N, P, A,
    # meta-parameters
    INCLUDE_MEAN: tl.constexpr, BLOCK: tl.constexpr,
):
    e = tl.program_id(0).to(tl.int64)
    # flat index over this environment's N * P outputs
    idx = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < N * P
    n = idx // P
    p = idx - n * P
    seed = tl.load(rng_ptr)
    j = tl.load(rng_ptr + 1) + e * N * P + idx        # this value's index in the stream (wraps as uint64)

    # Philox-4x32-10 (Triton's randint4x) of block j >> 2, then the Box-Muller value of word j & 3: the
    # pair (x0, x1) or (x2, x3), its cos or its sin. Each of a block's four values recomputes the block,
    # which costs a thread what one block per value did before and keeps the grid over values.
    x0, x1, x2, x3 = tl.randint4x(seed, (j >> 2) & 0x3FFFFFFFFFFFFFFF)
    second = (j & 2) != 0
    u = ((tl.where(second, x2, x0).to(tl.uint32) >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    w = ((tl.where(second, x3, x1).to(tl.uint32) >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    # sin(2 pi w) = cos(2 pi (w - 1/4)), the phase kept in (0, 1)
    w = tl.where((j & 1) != 0, w - 0.25, w)
    w = tl.where(w < 0.0, w + 1.0, w)
    z = tl.sqrt(-2.0 * tl.log(u)) * _cos_2pi(w)

    mean = tl.load(mean_ptr + e * P + p, mask=ok, other=0.0)
    std = tl.load(std_ptr + e * P + p, mask=ok, other=0.0)
    x = mean + std * z
    if INCLUDE_MEAN:
        x = tl.where(n == 0, mean, x)
    a = p % A
    x = tl.minimum(tl.maximum(x, tl.load(low_ptr + a, mask=ok, other=0.0)), tl.load(high_ptr + a, mask=ok, other=0.0))
    tl.store(out_ptr + e * N * P + idx, x, mask=ok)


_CONFIG = LaunchConfig({"BLOCK": 1024}, num_warps=4, num_stages=1)
# What the tuner (kernels/tuning.py) times beside it (rows: BLOCK, num_warps, num_stages; spill-free for
# sm_90a and sm_80: `audit --search-space`). The values drawn do not depend on the block.
_SEARCH = _launch.search_space({(): _CONFIG}, {(): _launch.candidates("BLOCK", (512, 4, 1), (2048, 8, 1), (256, 2, 1))})


def sample_actions_forward(mean, std, low, high, rng, n, include_mean, traced: bool = False):
    """Launch the kernel (``traced``: through ``wrap_triton``, see :func:`_launch.launchable`)."""
    E, P = mean.shape
    out = torch.empty((E, n, P), device=mean.device, dtype=torch.float32)
    cfg = _launch.tuned("sample_actions", (), _CONFIG)
    grid = (E, _launch.cdiv(n * P, cfg.constexprs["BLOCK"]))
    _launch.launchable(_sample_actions_kernel, traced)[grid](
        mean, std, low, high, rng, out, n, P, low.numel(), INCLUDE_MEAN=include_mean,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.constexprs)
    return out


if _launch.triton_available():
    # The kernel as an op that torch.export and AOTInductor see through (``torch.library.triton_op``): a
    # decision step exported for CUDA calls it in place of jepa_engine::sample_actions, whose CUDA kernel
    # is registered from Python, so the package carries the compiled kernel (jepa_engine.integrations.export).
    @torch.library.triton_op("jepa_engine::sample_actions_triton", mutates_args=())
    def sample_actions_triton(mean: torch.Tensor, std: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                              rng: torch.Tensor, n: int, include_mean: bool) -> torch.Tensor:
        return sample_actions_forward(mean.contiguous(), std.contiguous(), low.contiguous(), high.contiguous(), rng,
                                      n, include_mean, traced=True)


register_kernel(KernelSpec(
    "sample_actions", _sample_actions_kernel,
    {"fp32": (signature(_sample_actions_kernel, "*fp32", {"rng_ptr": "*i64"}), {"INCLUDE_MEAN": True})},
    [_CONFIG], search_space=_SEARCH,
))


# --------------------------------------------------------------------------------------------------
# Reference (the specification): the same Philox stream with integer torch ops.
# --------------------------------------------------------------------------------------------------
def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of the 64-bit product of the constant ``a`` and uint32 values ``b``
    held in int64, computed in 16-bit limbs so no intermediate leaves int64's range."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    lo = a * b_lo                 # < 2^48
    mid = a * b_hi                # < 2^48; the product is lo + mid * 2^16
    high = ((lo >> 16) + mid) >> 16
    low = (lo + ((mid & 0xFFFF) << 16)) & _M32
    return high, low


def philox4x32(seed: int, counter: torch.Tensor, rounds: int = 10) -> tuple[torch.Tensor, ...]:
    """Philox-4x32 of 64-bit ``counter`` values (int64) under the 64-bit key ``seed``; the four
    32-bit outputs as int64 tensors on the counter's device."""
    if counter.device.type == "cpu":
        return tuple(torch.from_numpy(x.astype(np.int64)) for x in _philox4x32_numpy(seed, counter.numpy(), rounds))
    return _philox4x32_torch(seed, counter, rounds)


def _philox4x32_torch(seed: int, counter: torch.Tensor, rounds: int) -> tuple[torch.Tensor, ...]:
    """Philox rounds with int64 torch ops (any device)."""
    c0, c1 = counter & _M32, (counter >> 32) & _M32
    c2 = c3 = torch.zeros_like(counter)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(rounds):
        hi_b, lo_b = _mul32(_PHILOX_ROUND[1], c2)
        hi_a, lo_a = _mul32(_PHILOX_ROUND[0], c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY[0]) & _M32, (k1 + _PHILOX_KEY[1]) & _M32
    return c0, c1, c2, c3


def _philox4x32_numpy(seed: int, counter: np.ndarray, rounds: int) -> tuple[np.ndarray, ...]:
    """The same rounds in numpy uint64, where a 32 x 32-bit product is exact in one multiply (6x
    fewer operations than the 16-bit limbs torch's signed int64 needs; the CPU reference's hot path)."""
    m32, s32 = np.uint64(_M32), np.uint64(32)
    c = counter.astype(np.uint64)
    c0, c1 = c & m32, c >> s32
    c2 = c3 = np.zeros_like(c0)
    k0, k1 = np.uint64(seed & _M32), np.uint64((seed >> 32) & _M32)
    ra, rb = np.uint64(_PHILOX_ROUND[0]), np.uint64(_PHILOX_ROUND[1])
    for _ in range(rounds):
        pb, pa = rb * c2, ra * c0
        c0, c1, c2, c3 = (pb >> s32) ^ c1 ^ k0, pb & m32, (pa >> s32) ^ c3 ^ k1, pa & m32
        k0, k1 = (k0 + np.uint64(_PHILOX_KEY[0])) & m32, (k1 + np.uint64(_PHILOX_KEY[1])) & m32
    return c0, c1, c2, c3


def gaussian_stream(seed: int, offset: int, count: int, device="cpu") -> torch.Tensor:
    """Values ``offset .. offset + count - 1`` of the standard-normal stream of ``seed`` (fp32
    ``[count]``): Philox block ``b`` gives values ``4b .. 4b + 3`` (see the module docstring)."""
    offset %= 1 << 64                         # value indices are unsigned 64-bit and wrap; blocks wrap at 2^62
    lead = offset & 3
    blocks = (torch.arange((lead + count + 3) // 4, dtype=torch.int64, device=device) + (offset >> 2)) & _BLOCK_MASK
    r0, r1, r2, r3 = philox4x32(seed, blocks)
    u = ((torch.stack((r0, r2)) >> 8).float() + 0.5) / 16777216.0    # [2, blocks]: u0, u2
    w = 2 * math.pi * (((torch.stack((r1, r3)) >> 8).float() + 0.5) / 16777216.0)   # w1, w3
    radius = torch.sqrt(-2.0 * torch.log(u))
    z = torch.stack((radius * torch.cos(w), radius * torch.sin(w)), dim=-1)   # [2, blocks, 2]
    z = z.permute(1, 0, 2).reshape(-1)        # block-major: r0 cos w1, r0 sin w1, r2 cos w3, r2 sin w3
    return z[lead: lead + count]


def sample_actions_reference(mean, std, low, high, rng, n: int, include_mean: bool = True):
    E, P = mean.shape
    seed, offset = (int(v) for v in rng.tolist())
    z = gaussian_stream(seed, offset, E * n * P, mean.device).view(E, n, P)
    x = mean[:, None, :] + std[:, None, :] * z
    if include_mean:
        x[:, 0, :] = mean
    A = low.numel()
    lo, hi = low.repeat(P // A), high.repeat(P // A)
    return torch.minimum(torch.maximum(x, lo), hi)


# --------------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------------
def sample_actions(mean: torch.Tensor, std: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                   rng: torch.Tensor, n: int, *, include_mean: bool = True) -> torch.Tensor:
    """Draw ``n`` clipped Gaussian candidates per environment (see the module docstring).

    Args:
        mean, std: fp32 ``[E, P]`` with ``P = horizon * action_dim``.
        low, high: fp32 ``[A]`` action bounds (``A`` divides ``P``), ``low <= high``.
        rng: int64 ``[2]`` = ``[seed, offset]`` on the same device (advance ``rng[1]`` by ``E*n*P``
            between calls for fresh samples).
        n: candidates per environment (>= 1).

    Returns:
        fp32 ``[E, n, P]``.
    """
    if _NATIVE and _native_runs(mean, std, low, high, rng) and isinstance(n, int):
        # the C++ kernel makes the checks below itself, with the same messages
        return torch.ops.jepa_engine.sample_actions.default(mean, std, low, high, rng, n, include_mean)
    return _op_kernel(mean, std, low, high, rng, n, include_mean)


def _check(mean, std, low, high, rng, n) -> None:
    """The argument checks (the C++ kernel makes the same ones, with the same messages)."""
    check = _launch.check_tensor
    check(OP, "mean", mean, ndim=2, dtypes=(torch.float32,))
    dev = mean.device
    check(OP, "std", std, ndim=2, dtypes=(torch.float32,), device=dev)
    _launch.check_shape(OP, "std", std, mean.shape, "mean.shape")
    check(OP, "low", low, ndim=1, dtypes=(torch.float32,), device=dev)
    check(OP, "high", high, ndim=1, dtypes=(torch.float32,), device=dev)
    _launch.check_shape(OP, "high", high, low.shape, "low.shape")
    if mean.shape[1] % low.numel():
        raise ValueError(f"{OP}: the action dim A = len(low) = {low.numel()} must divide P = {mean.shape[1]}")
    check(OP, "rng", rng, ndim=1, dtypes=(torch.int64,), device=dev)
    _launch.check_shape(OP, "rng", rng, (2,), "[seed, offset]")
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"{OP}: n must be an int >= 1, got {n!r}")


# --------------------------------------------------------------------------------------------------
# The op jepa_engine::sample_actions: schema defined in C++ (csrc/ops.cpp, with its CPU kernel) when the
# native library is loaded, else here; the CUDA kernel (Triton) and the fake kernel are registered here.
# --------------------------------------------------------------------------------------------------
SCHEMA = ("sample_actions(Tensor mean, Tensor std, Tensor low, Tensor high, Tensor rng, int n, "
          "bool include_mean=True) -> Tensor")


def _op_kernel(mean, std, low, high, rng, n, include_mean=True):
    """The Python kernel of the op (CUDA tensors; CPU tensors without the C++ kernel)."""
    _check(mean, std, low, high, rng, n)
    if _launch.backend_for(OP, mean.device) == "reference":
        return sample_actions_reference(mean, std, low, high, rng, n, include_mean)
    return sample_actions_forward(mean.contiguous(), std.contiguous(), low.contiguous(), high.contiguous(), rng, n,
                                  include_mean)


def _op_fake(mean, std, low, high, rng, n, include_mean=True):
    return mean.new_empty((mean.shape[0], n, mean.shape[1]))


_sample_actions_op = _native.Op(OP, SCHEMA, _op_kernel, _op_fake)
_NATIVE = _sample_actions_op.native
_native_runs = _native.cpu_kernel_runs
