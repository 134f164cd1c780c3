"""Kernel-vs-reference self-check: each op's Triton kernel against its PyTorch reference.

The device is chosen by the rule the kernel tests use (``kernel_test_device``): a CUDA device when
present (compiled kernels), else CPU tensors under the Triton interpreter. On a CPU machine without
``TRITON_INTERPRET=1`` the check re-runs itself with it set (it must be set before Triton kernels are
defined); without triton it reports that no kernel can run. Each case reports the largest absolute
difference over its outputs and gradients against a tolerance chosen for its precision (fp16
tensor-core dots compiled on the GPU; exact fp32 under the interpreter).

First it lists which path each op takes in this process (:func:`op_paths`): where its schema is
defined (C++ ``TORCH_LIBRARY`` in the native library ``jepa_engine/_C.so``, a Python
``torch.library.custom_op``, or none: a plain function), and what runs on CUDA tensors (as the route
table decides, :func:`print_routes` lists its rows and their evidence) and on CPU tensors (native C++,
Triton interpreted, or the Python reference).
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable


def _gen(seed: int = 0):
    import torch

    return torch.Generator().manual_seed(seed)


def _both(fn: Callable[[], list]) -> float:
    """Max |triton - reference| / max(1, max |reference|) over the tensors ``fn`` returns under each
    backend: an absolute difference, relative for large values (sums such as the EMA distance)."""
    from jepa_engine.kernels import use_backend

    outs = []
    for backend in ("triton", "reference"):
        with use_backend(backend):
            outs.append(fn())
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1.0)).item()
               for a, b in zip(*outs))


def _latent_loss(device: str) -> float:
    import torch

    from jepa_engine.kernels import latent_loss

    g = _gen()
    pred = torch.randn(4, 37, 96, generator=g).to(device)
    target = torch.randn(4, 37, 96, generator=g).to(device)
    mask = (torch.rand(4, 37, generator=g) < 0.7).to(device)

    def run():
        p = pred.clone().requires_grad_(True)
        loss = latent_loss(p, target, mask)
        return [loss.detach(), *torch.autograd.grad(loss, p)]
    return _both(run)


def _masked_attention(device: str) -> float:
    import torch

    from jepa_engine.kernels import masked_attention
    from jepa_engine.kernels._launch import interpreting

    g = _gen(1)
    dtype = torch.float16 if device == "cuda" and not interpreting() else torch.float32
    q, k, v = (torch.randn(2, 3, 45, 64, generator=g).to(device, dtype) for _ in range(3))
    pad = (torch.rand(2, 45, generator=g) < 0.6).to(device)
    do = torch.randn(2, 3, 45, 64, generator=g).to(device, dtype)

    def run():
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = masked_attention(qq, kk, vv, key_padding=pad, frame_size=15)
        return [out.detach(), *torch.autograd.grad(out, (qq, kk, vv), do)]
    return _both(run)


def _ema(device: str) -> float:
    import torch

    from jepa_engine.kernels import ema_update_

    g = _gen(2)
    shapes = [(384, 96), (96,), (7, 3, 5), (1,)]
    targets = [torch.randn(s, generator=g).to(device) for s in shapes]
    onlines = [torch.randn(s, generator=g).to(device) for s in shapes]

    def run():
        ts = [t.clone() for t in targets]
        dist = ema_update_(ts, onlines, 0.996, return_distance=True)
        return ts + [dist]
    return _both(run)


def _planner_ops(device: str) -> float:
    import torch

    from jepa_engine.kernels import elite_refit, sample_actions

    g = _gen(3)
    mean, std = torch.randn(3, 10, generator=g).to(device), (torch.rand(3, 10, generator=g) + 0.2).to(device)
    low, high = torch.full((2,), -1.0, device=device), torch.full((2,), 1.0, device=device)
    rng = torch.tensor([7, 0], dtype=torch.int64, device=device)

    def run():
        x = sample_actions(mean, std, low, high, rng, 300)
        costs = x.square().sum(-1)
        cem = elite_refit(costs, x, mean, std, mode="cem", k=30)
        mppi = elite_refit(costs, x, mean, std, mode="mppi", temperature=0.5)
        return [x, *cem[:3], *mppi[:3]]
    return _both(run)


def _fused_linear(device: str) -> float:
    import torch

    from jepa_engine.kernels import fused_linear, linear_goal_cost

    g = _gen(4)
    x = (torch.randn(70, 48, generator=g) * 2 + 1).to(device)
    w1, b1 = (torch.randn(80, 48, generator=g) / 7).to(device), torch.randn(80, generator=g).to(device)
    w2, b2 = (torch.randn(40, 80, generator=g) / 9).to(device), torch.randn(40, generator=g).to(device)
    res, goal = torch.randn(70, 80, generator=g).to(device), torch.randn(7, 40, generator=g).to(device)

    def run():
        with torch.no_grad():
            h = fused_linear(x, w1, b1, normalize=True, activation="gelu", residual=res)
            z, cost = linear_goal_cost(h, w2, b2, goal, normalize=True)
        return [h, z, cost]
    return _both(run)


# op -> where its schema is defined when the native library does not define it ("" for a plain function)
_PY = "Python torch.library"
OPS: dict[str, str] = {
    "masked_attention": _PY, "latent_loss": _PY, "latent_cost": _PY, "fused_linear": _PY, "linear_goal_cost": _PY,
    "ema_update_": _PY, "sample_actions": "", "elite_refit": "",
}
_CHILD = "JEPA_ENGINE_SELFCHECK_INTERPRETED"   # set in the re-run under the interpreter


# Plain-CPU calls an op hands to a PyTorch kernel before its own, where that kernel is the one its own
# path would run (kernels/masked_attention.py::_plain_sdpa).
CPU_FIRST = {"masked_attention": "SDPA (fp32, not packed), else "}


def op_paths() -> list[tuple[str, str, str, str]]:
    """``(op, schema, CUDA tensors, CPU tensors)`` for every op, as this process dispatches them."""
    import torch

    from jepa_engine.kernels import _native, routes
    from jepa_engine.kernels._launch import interpreting, triton_available

    rows = []
    for op, python_schema in OPS.items():
        native = _native.schema(op) is not None
        schema = "C++ TORCH_LIBRARY" if native else (python_schema or "none (plain function)")
        if not triton_available():
            cuda = "Python reference (no triton)"
        else:
            cuda = routes.summary(op)
        if interpreting() and triton_available():
            cpu = "Triton interpreter (TRITON_INTERPRET=1)"
        elif native:
            cpu = CPU_FIRST.get(op, "") + "native C++"
        else:
            cpu = CPU_FIRST.get(op, "") + "Python reference"
        rows.append((op, schema, cuda, cpu))
    return rows


def print_op_paths() -> None:
    from jepa_engine.kernels import _native

    print(f"Op paths (native library: {_native.status()})")
    print(f"  {'op':18s} {'schema':24s} {'CUDA tensors':40s} CPU tensors")
    for op, schema, cuda, cpu in op_paths():
        print(f"  {op:18s} {schema:24s} {cuda:40s} {cpu}")
    print(flush=True)


def print_routes() -> None:
    """The CUDA route table (``kernels/routes.py``), one row a line: op, device class, shape class, route
    and its evidence; rows no GPU measured are marked UNMEASURED."""
    import torch

    from jepa_engine.kernels import routes

    here = "no CUDA device"
    if torch.cuda.is_available():
        try:
            here = routes.device_class(torch.device("cuda", torch.cuda.current_device()))
        except (RuntimeError, AssertionError) as e:   # a CUDA runtime that cannot be queried
            here = f"CUDA device not queried: {e}"
    unmeasured = sum(r.evidence == routes.UNMEASURED for r in routes.ROWS)
    print(f"CUDA route table (kernels/routes.py; this machine: {here}): the first matching row decides; "
          f"use_backend() overrides it. {len(routes.ROWS)} rows, {unmeasured} unmeasured")
    print(f"  {'op':17s} {'device':10s} {'shape class':31s} {'route':7s} evidence")
    for line in routes.format_rows():
        print(f"  {line}")
    print(flush=True)


def native_vs_reference() -> tuple[int, int, float]:
    """The native C++ kernels against the Python references on the planner case: the number of
    sampled values that differ (0: the same stream bit for bit), out of how many, and the largest
    elite-refit difference (CEM and MPPI outputs)."""
    import torch

    from jepa_engine.kernels import elite_refit_reference, sample_actions_reference

    g = _gen(5)
    mean, std = torch.randn(3, 10, generator=g), torch.rand(3, 10, generator=g) + 0.2
    low, high, rng = torch.full((2,), -1.0), torch.full((2,), 1.0), torch.tensor([7, 123], dtype=torch.int64)
    x = torch.ops.jepa_engine.sample_actions(mean, std, low, high, rng, 300, True)
    differ = int((x != sample_actions_reference(mean, std, low, high, rng, 300, True)).sum())
    costs = x.square().sum(-1)
    worst = 0.0
    for mode, k in (("cem", 30), ("mppi", 1)):
        a = torch.ops.jepa_engine.elite_refit(costs, x, mean, std, mode, k, 0.5, 0.1, 0.05)
        b = elite_refit_reference(costs, x, mean, std, mode=mode, k=k, temperature=0.5, momentum=0.1, min_std=0.05)
        worst = max([worst] + [(p.float() - q.float()).abs().max().item() for p, q in zip(a, b)])
    return differ, x.numel(), worst


def _print_native_check() -> int:
    from jepa_engine.kernels import _native

    if not _native.available():
        return 0
    differ, total, worst = native_vs_reference()
    ok = differ == 0 and worst <= 1e-5
    print("Native C++ vs reference (CPU):")
    print(f"  sample_actions: {differ} of {total} values differ (bit-identical expected)   "
          f"elite_refit: {worst:.2e} (tolerance 1e-05)  {'ok' if ok else 'MISMATCH'}", flush=True)
    return 0 if ok else 1


# name -> (case, tolerance compiled on the GPU, tolerance under the interpreter)
CHECKS: dict[str, tuple[Callable[[str], float], float, float]] = {
    "latent_loss (fwd, bwd)": (_latent_loss, 1e-4, 1e-5),
    "masked_attention pad+frame (fwd, bwd)": (_masked_attention, 2e-2, 1e-4),
    "ema_update_ (4 tensors, distance)": (_ema, 1e-5, 1e-5),
    "sample_actions + elite_refit": (_planner_ops, 1e-4, 1e-4),
    "fused_linear + linear_goal_cost (fp32)": (_fused_linear, 1e-5, 1e-5),
}


def run() -> int:
    import torch

    from jepa_engine.kernels._launch import interpreting, kernel_test_device, triton_available

    native_failed = 0
    if not os.environ.get(_CHILD):
        print_op_paths()
        print_routes()
        native_failed = _print_native_check()
    device, reason = kernel_test_device()
    if device is None:
        if triton_available() and not interpreting():   # a CPU machine: the same check, interpreted
            print("self-check: no CUDA device; running it under the Triton interpreter (TRITON_INTERPRET=1)",
                  flush=True)
            env = dict(os.environ, TRITON_INTERPRET="1", **{_CHILD: "1"})
            rc = subprocess.run([sys.executable, "-m", "jepa_engine", "selfcheck"], env=env).returncode
            return rc or native_failed
        print(f"self-check: no kernel can run here ({reason})")
        return native_failed
    compiled = device == "cuda" and not interpreting()
    where = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    mode = f"compiled on {where}" if compiled else f"Triton interpreter on {where}"
    print(f"Kernel vs reference ({mode}): max difference over outputs and gradients")
    failed = 0
    for name, (case, tol_gpu, tol_interp) in CHECKS.items():
        tol = tol_gpu if compiled else tol_interp
        diff = case(device)
        ok = diff <= tol
        failed += not ok
        print(f"  {name:40s} {diff:.2e}  (tolerance {tol:.0e})  {'ok' if ok else 'MISMATCH'}", flush=True)
    return 1 if failed or native_failed else 0
