"""Elite selection and refit of a planner's sampling distribution, in one kernel per environment.

Given the costs of N candidate action sequences of E environments and the candidates themselves::

    costs    [E, N]        fp32 (NaN counts as +inf: never an elite)
    samples  [E, N, P]     P = horizon * action_dim, fp32/fp16/bf16
    mean     [E, P]        fp32, the current distribution (std likewise)

CEM (``mode="cem"``): the K candidates of lowest cost are the elites (ties broken by the lower
candidate index, like a stable sort), each weighted 1/K. MPPI (``mode="mppi"``): every candidate is
weighted ``softmax(-(cost - min cost) / temperature)``. Then, per parameter p::

    mu[p]     = sum_i w_i samples[i, p]
    sigma[p]  = sqrt(max(sum_i w_i samples[i, p]^2 - mu[p]^2, 0))
    mean'     = momentum * mean + (1 - momentum) * mu
    std'      = max(momentum * std + (1 - momentum) * sigma, min_std)     (CEM)
    std'      = std                                                       (MPPI keeps its noise level)

and the lowest cost and its candidate index are returned. Everything stays on the device: no host
synchronisation inside a planning iteration. The CEM ranks are computed by counting, for each
candidate, the candidates that beat it (an N x N comparison in 64 x 64 tiles): N is a planner's
sample count (hundreds to a few thousand), where this is cheaper than a sort and needs no scratch.
"""
from __future__ import annotations

import torch

from . import _launch, _native, routes
from ._launch import tl, triton
from ._registry import KernelSpec, LaunchConfig, register_kernel, signature

OP = "elite_refit"
MODES = ("cem", "mppi")


# --------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------
@triton.jit
def _clean_costs(costs_ptr, idx, ok):
    c = tl.load(costs_ptr + idx, mask=ok, other=float("inf"))
    return tl.where(c != c, float("inf"), c)  # NaN -> +inf


@triton.jit
def _elite_refit_kernel(
    # pointers
    costs_ptr, samples_ptr, mean_ptr, std_ptr, weights_ptr,
    new_mean_ptr, new_std_ptr, best_cost_ptr, best_index_ptr,
    # sizes
    N, P, K,
    # parameters
    inv_temperature, momentum, min_std,
    # meta-parameters
    MPPI: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    e = tl.program_id(0).to(tl.int64)
    costs_ptr += e * N
    weights_ptr += e * N
    samples_ptr += e * N * P
    ar = tl.arange(0, BLOCK_N)

    # Phase 1: the lowest cost and its (first) index.
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_i = tl.full([BLOCK_N], 0, tl.int32)
    for i0 in range(0, N, BLOCK_N):
        c = _clean_costs(costs_ptr, i0 + ar, i0 + ar < N)
        take = c < best
        best_i = tl.where(take, i0 + ar, best_i)
        best = tl.where(take, c, best)
    c_min = tl.min(best, axis=0)
    i_min = tl.min(tl.where(best == c_min, best_i, N), axis=0)
    tl.store(best_cost_ptr + e, c_min)
    tl.store(best_index_ptr + e, i_min.to(tl.int64))

    # Phase 2: the weight of every candidate, kept in a small [E, N] scratch row.
    if MPPI:
        z = tl.zeros([BLOCK_N], tl.float32)
        for i0 in range(0, N, BLOCK_N):
            c = _clean_costs(costs_ptr, i0 + ar, i0 + ar < N)
            z += tl.where(i0 + ar < N, tl.exp((c_min - c) * inv_temperature), 0.0)
        inv_z = 1.0 / tl.sum(z, axis=0)
        for i0 in range(0, N, BLOCK_N):
            c = _clean_costs(costs_ptr, i0 + ar, i0 + ar < N)
            tl.store(weights_ptr + i0 + ar, tl.exp((c_min - c) * inv_temperature) * inv_z, mask=i0 + ar < N)
    else:
        inv_k = 1.0 / K
        for i0 in range(0, N, BLOCK_N):
            ii = i0 + ar
            ci = _clean_costs(costs_ptr, ii, ii < N)
            rank = tl.zeros([BLOCK_N], tl.int32)
            for j0 in range(0, N, BLOCK_N):
                jj = j0 + ar
                cj = _clean_costs(costs_ptr, jj, jj < N)
                beats = (cj[None, :] < ci[:, None]) | ((cj[None, :] == ci[:, None]) & (jj[None, :] < ii[:, None]))
                rank += tl.sum((beats & (jj[None, :] < N)).to(tl.int32), axis=1)
            tl.store(weights_ptr + ii, tl.where(rank < K, inv_k, 0.0), mask=ii < N)
    tl.debug_barrier()  # the weights written above are read back by other threads below

    # Phase 3: weighted first and second moments of the samples, then the smoothed refit.
    for p0 in range(0, P, BLOCK_P):
        pp = p0 + tl.arange(0, BLOCK_P)
        p_ok = pp < P
        s1 = tl.zeros([BLOCK_P], tl.float32)
        s2 = tl.zeros([BLOCK_P], tl.float32)
        for i0 in range(0, N, BLOCK_N):
            ii = i0 + ar
            w = tl.load(weights_ptr + ii, mask=ii < N, other=0.0)
            x = tl.load(samples_ptr + ii[:, None] * P + pp[None, :], mask=(ii[:, None] < N) & p_ok[None, :],
                        other=0.0).to(tl.float32)
            s1 += tl.sum(w[:, None] * x, axis=0)
            s2 += tl.sum(w[:, None] * x * x, axis=0)
        mean = tl.load(mean_ptr + e * P + pp, mask=p_ok, other=0.0)
        std = tl.load(std_ptr + e * P + pp, mask=p_ok, other=0.0)
        tl.store(new_mean_ptr + e * P + pp, momentum * mean + (1.0 - momentum) * s1, mask=p_ok)
        if MPPI:
            tl.store(new_std_ptr + e * P + pp, std, mask=p_ok)
        else:
            # NaN-propagating maxima, as the reference's clamp_min: a NaN variance stays NaN
            sigma = tl.sqrt(tl.maximum(s2 - s1 * s1, 0.0, propagate_nan=tl.PropagateNan.ALL))
            new_std = tl.maximum(momentum * std + (1.0 - momentum) * sigma, min_std, propagate_nan=tl.PropagateNan.ALL)
            tl.store(new_std_ptr + e * P + pp, new_std, mask=p_ok)


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------
# BLOCK_P follows the parameter count P = horizon x action_dim (16, 32, then 64 columns): a planner's P is
# often 10-60, and a 64-wide moment tile at P = 10 computed 6.4x the moments it needs.
_CONFIGS = {bp: LaunchConfig({"BLOCK_N": 64, "BLOCK_P": bp}, num_warps=4, num_stages=1) for bp in (16, 32, 64)}
# What the tuner (kernels/tuning.py) times beside each entry, keyed (BLOCK_P,) (rows: BLOCK_N, BLOCK_P,
# num_warps, num_stages; spill-free for sm_90a and sm_80: `audit --search-space`).
_SEARCH = _launch.search_space({(bp,): cfg for bp, cfg in _CONFIGS.items()}, {
    (bp,): _launch.candidates("BLOCK_N,BLOCK_P", (32, bp, 4, 1), (128, bp, 8, 1), (64, bp, 8, 1), (64, bp, 2, 1))
    for bp in _CONFIGS
})


def _config(P: int) -> LaunchConfig:
    """The launch config for ``P`` parameters per candidate."""
    bp = min(64, max(16, _launch.next_power_of_2(P)))
    return _launch.tuned("elite_refit", (bp,), _CONFIGS[bp])


def elite_refit_forward(costs, samples, mean, std, mode, k, temperature, momentum, min_std, traced: bool = False):
    """Launch the kernel (``traced``: through ``wrap_triton``, see :func:`_launch.launchable`)."""
    E, N, P = samples.shape
    cfg = _config(P)
    dev = costs.device
    weights = torch.empty((E, N), device=dev, dtype=torch.float32)
    new_mean = torch.empty((E, P), device=dev, dtype=torch.float32)
    new_std = torch.empty((E, P), device=dev, dtype=torch.float32)
    best_cost = torch.empty(E, device=dev, dtype=torch.float32)
    best_index = torch.empty(E, device=dev, dtype=torch.int64)
    _launch.launchable(_elite_refit_kernel, traced)[(E,)](
        costs, samples, mean, std, weights, new_mean, new_std, best_cost, best_index,
        N, P, k, 1.0 / temperature, momentum, min_std,
        MPPI=mode == "mppi", num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.constexprs,
    )
    return new_mean, new_std, best_cost, best_index


if _launch.triton_available():
    # The kernel as an op that torch.export and AOTInductor see through (``torch.library.triton_op``): a
    # decision step exported for CUDA calls it in place of jepa_engine::elite_refit, whose CUDA kernel is
    # registered from Python, so the package carries the compiled kernel (jepa_engine.integrations.export).
    @torch.library.triton_op("jepa_engine::elite_refit_triton", mutates_args=())
    def elite_refit_triton(costs: torch.Tensor, samples: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                           mode: str, k: int, temperature: float, momentum: float, min_std: float
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return elite_refit_forward(costs.contiguous(), samples.contiguous(), mean.contiguous(), std.contiguous(),
                                   mode, k, temperature, momentum, min_std, traced=True)


def _variants():
    out = {}
    for dt in ("fp32", "bf16"):   # the samples' storage dtype; every other tensor is fp32 (indices int64)
        sig = signature(_elite_refit_kernel, "*fp32", {"samples_ptr": f"*{dt}", "best_index_ptr": "*i64",
                                                       "inv_temperature": "fp32", "momentum": "fp32",
                                                       "min_std": "fp32"})
        out[f"{dt}/cem"] = (sig, {"MPPI": False})
        out[f"{dt}/mppi"] = (sig, {"MPPI": True})
    return out


register_kernel(KernelSpec("elite_refit", _elite_refit_kernel, _variants(), list(_CONFIGS.values()),
                           search_space=_SEARCH))


# --------------------------------------------------------------------------------------------------
# Reference (the specification)
# --------------------------------------------------------------------------------------------------
def elite_refit_reference(costs, samples, mean, std, *, mode: str = "cem", k: int = 1, temperature: float = 1.0,
                          momentum: float = 0.0, min_std: float = 0.0):
    """Plain PyTorch: stable sort for the elites (CEM) or a softmax over -cost (MPPI)."""
    c = torch.nan_to_num(costs.float(), nan=float("inf"))
    best_cost, best_index = c.min(dim=1)
    x = samples.float()
    if mode == "cem":
        order = torch.sort(c, dim=1, stable=True).indices[:, :k]
        w = torch.zeros_like(c).scatter_(1, order, 1.0 / k)
    else:
        w = torch.softmax((best_cost[:, None] - c) / temperature, dim=1)
    mu = torch.einsum("en,enp->ep", w, x)
    sigma = (torch.einsum("en,enp->ep", w, x * x) - mu * mu).clamp_min(0).sqrt()
    new_mean = momentum * mean + (1 - momentum) * mu
    new_std = std.clone() if mode == "mppi" else (momentum * std + (1 - momentum) * sigma).clamp_min(min_std)
    return new_mean, new_std, best_cost, best_index


# --------------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------------
def elite_refit(costs: torch.Tensor, samples: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, *,
                mode: str = "cem", k: int = 1, temperature: float = 1.0, momentum: float = 0.0,
                min_std: float = 0.0):
    """Refit a planner's Gaussian from the costs of its candidates (see the module docstring).

    Args:
        costs: fp32 ``[E, N]``; samples: ``[E, N, P]`` (fp32/fp16/bf16); mean, std: fp32 ``[E, P]``.
        mode: ``"cem"`` (top-k elites) or ``"mppi"`` (softmax weights at ``temperature``).
        k: number of elites, 1 <= k <= N (CEM).
        momentum: in [0, 1]; weight of the previous mean/std. min_std: floor of the CEM std.

    Returns:
        ``(new_mean [E, P], new_std [E, P], best_cost [E], best_index [E] int64)``.
    """
    if (_NATIVE and _native_runs(costs, samples, mean, std) and isinstance(mode, str) and isinstance(k, int)
            and all(isinstance(v, (int, float)) for v in (temperature, momentum, min_std))):
        # the C++ kernel makes the checks below itself, with the same messages
        return torch.ops.jepa_engine.elite_refit.default(costs, samples, mean, std, mode, k, float(temperature),
                                                         float(momentum), float(min_std))
    return _op_kernel(costs, samples, mean, std, mode, k, temperature, momentum, min_std)


def _check(costs, samples, mean, std, mode, k, temperature, momentum) -> None:
    """The argument checks (the C++ kernel makes the same ones, with the same messages)."""
    check = _launch.check_tensor
    check(OP, "samples", samples, ndim=3, dtypes=_launch.FLOAT_DTYPES)
    E, N, P = samples.shape
    dev = samples.device
    check(OP, "costs", costs, ndim=2, dtypes=(torch.float32,), device=dev)
    _launch.check_shape(OP, "costs", costs, (E, N), "[E, N]")
    for name, t in (("mean", mean), ("std", std)):
        check(OP, name, t, ndim=2, dtypes=(torch.float32,), device=dev)
        _launch.check_shape(OP, name, t, (E, P), "[E, P]")
    if mode not in MODES:
        raise ValueError(f"{OP}: mode must be one of {MODES}, got {mode!r}")
    if mode == "cem" and not 1 <= k <= N:
        raise ValueError(f"{OP}: k must be in [1, N] = [1, {N}], got {k}")
    if not temperature > 0:
        raise ValueError(f"{OP}: temperature must be > 0, got {temperature}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{OP}: momentum must be in [0, 1], got {momentum}")


# --------------------------------------------------------------------------------------------------
# The op jepa_engine::elite_refit: schema defined in C++ (csrc/ops.cpp, with its CPU kernel) when the
# native library is loaded, else here; the CUDA kernel (Triton) and the fake kernel are registered here.
# --------------------------------------------------------------------------------------------------
SCHEMA = ("elite_refit(Tensor costs, Tensor samples, Tensor mean, Tensor std, str mode=\"cem\", int k=1, "
          "float temperature=1.0, float momentum=0.0, float min_std=0.0) -> (Tensor, Tensor, Tensor, Tensor)")


def _op_kernel(costs, samples, mean, std, mode="cem", k=1, temperature=1.0, momentum=0.0, min_std=0.0):
    """The Python kernel of the op (CUDA tensors; CPU tensors without the C++ kernel)."""
    _check(costs, samples, mean, std, mode, k, temperature, momentum)
    # The route table decides CUDA calls by the environment count (one kernel program per environment).
    shape = routes.refit_class(samples.shape[0]) if samples.is_cuda else None
    if _launch.backend_for(OP, samples.device, shape) == "reference":
        return elite_refit_reference(costs, samples, mean, std, mode=mode, k=k, temperature=temperature,
                                     momentum=momentum, min_std=min_std)
    return elite_refit_forward(costs.contiguous(), samples.contiguous(), mean.contiguous(), std.contiguous(),
                               mode, int(k), float(temperature), float(momentum), float(min_std))


def _op_fake(costs, samples, mean, std, mode="cem", k=1, temperature=1.0, momentum=0.0, min_std=0.0):
    E, _, P = samples.shape
    f32 = dict(device=samples.device, dtype=torch.float32)
    return (samples.new_empty((E, P), **f32), samples.new_empty((E, P), **f32), samples.new_empty((E,), **f32),
            samples.new_empty((E,), device=samples.device, dtype=torch.int64))


_elite_refit_op = _native.Op(OP, SCHEMA, _op_kernel, _op_fake)
_NATIVE = _elite_refit_op.native
_native_runs = _native.cpu_kernel_runs
