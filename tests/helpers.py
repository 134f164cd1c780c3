"""Shared test helpers: where kernels run, the dtype tolerance table, kernel-vs-reference comparison.

Where: :func:`kernel_device_choice` is the one rule (a CUDA device when present, kernels compiled;
else CPU under ``TRITON_INTERPRET=1``; else no kernel test runs, and the reason says why). Kernel
tests take the ``kernel_device`` fixture (tests/conftest.py), which skips with that reason, and
build their random inputs on CPU from a seeded generator, then ``.to(kernel_device)``, so that both
devices see the same numbers.

Precision each test expects: fp32 kernels are compared at fp32 tolerances (the interpreter is exact;
compiled on the GPU, an fp32 ``tl.dot`` that a kernel runs as TF32 is compared at ``TF32_TOLERANCE``:
``assert_close(..., tf32=True)`` names those results, and ``grad=True`` with it names a gradient
computed through chained TF32 dots, compared at ``TF32_GRAD_TOLERANCE``). fp16/bf16 kernels compute
in fp32 and round on store, so their tolerance is a few units in the last place of the storage dtype.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
from typing import Callable, Iterable, Sequence

import torch

import pytest

from jepa_engine.kernels import use_backend
from jepa_engine.kernels._launch import KernelTestDevice, interpreting, kernel_test_device

# dtype -> (atol, rtol), stated once for the whole suite.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1.3e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 1.6e-2),
}
# One TF32 product: its inputs rounded to a 10-bit mantissa (unit roundoff 2**-11, about 4.9e-4).
TF32_TOLERANCE = (2e-3, 2e-3)
# A gradient through the attention backward's TF32 dots passes three chained TF32 products: dP = dO V^T,
# then dS = P * (dP - rowsum(dO * O)) and dQ = dS K (dK = dS^T Q likewise). dP's rounding error, about
# 2**-11 |dO| |V|, is not damped by the softmax: where a row's P is near one-hot, dP - rowsum(dO * O)
# is the difference of two nearly equal numbers, one of them rounded, so dS and then dQ carry an error
# of about 2**-11 |dO| |V| |K| scale whatever dQ's own size (an exact dQ of 1e-7 came back as 2e-3).
# Measured compiled on an H100 against the reference (fp32, every mask kind, head dims 16 and 80, N up
# to 79, 84 random draws): the worst dQ, dK or dV element needed atol = rtol = 5.9e-3 (dQ 1.4e-2
# absolute on an entry near 2); the outputs needed 1e-6, at fp32's tolerance, since the forward is IEEE.
# The forward's TF32 tolerance above stays as it is.
TF32_GRAD_TOLERANCE = (1e-2, 1e-2)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_device_choice() -> KernelTestDevice:
    """``(device, reason)``: ``"cuda"`` when a CUDA device is present, ``"cpu"`` under
    ``TRITON_INTERPRET=1`` without one, else ``None`` (kernel tests skip with ``reason``)."""
    return kernel_test_device()


def require_kernel_device() -> str:
    """The ``kernel_device`` fixture's body: the chosen device, or a skip with the rule's reason."""
    device, reason = kernel_device_choice()
    if device is None:
        pytest.skip(reason)
    return device


# For a parametrization that cannot take the fixture: the same rule as a mark. The test must still
# put its tensors on ``kernel_device`` (it runs on CUDA, compiled, where a device is present).
needs_triton = pytest.mark.skipif(kernel_device_choice().device is None, reason=kernel_device_choice().reason)


def compiled_on(device: torch.device | str) -> bool:
    """Whether a kernel on tensors of ``device`` runs compiled (CUDA, no interpreter)."""
    return torch.device(device).type == "cuda" and not interpreting()


def uses_tf32(dtype: torch.dtype, device: torch.device | str, tf32: bool) -> bool:
    """Whether a result of ``dtype`` on ``device`` carries TF32 rounding: ``tf32`` says the kernel
    runs its fp32 ``tl.dot`` as TF32, which it does only compiled (the interpreter's dots are exact)."""
    return tf32 and dtype == torch.float32 and compiled_on(device)


def tolerance(dtype: torch.dtype, device: torch.device | str = "cpu", tf32: bool = False,
              grad: bool = False) -> tuple[float, float]:
    """``(atol, rtol)`` for a kernel result of ``dtype`` computed on ``device`` (``tf32``: see
    :func:`uses_tf32`; ``grad``: the result is a gradient through the kernel's chained TF32 dots, which
    takes ``TF32_GRAD_TOLERANCE`` where TF32 applies and changes nothing elsewhere)."""
    if uses_tf32(dtype, device, tf32):
        return TF32_GRAD_TOLERANCE if grad else TF32_TOLERANCE
    return TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 what: str = "", scale: float = 1.0, tf32: bool = False, grad: bool = False) -> None:
    """``torch.testing.assert_close`` at :func:`tolerance` for ``dtype`` on ``actual``'s device
    (times ``scale``), with the max and mean absolute difference in the failure message. The two
    tensors are compared on CPU, so a CUDA result may be checked against a CPU expectation."""
    dtype = dtype or expected.dtype
    atol, rtol = tolerance(dtype, actual.device, tf32, grad)
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    diff = (a - e).abs()
    finite = torch.isfinite(diff)
    msg = (f"{what}: max abs diff {diff[finite].max().item() if finite.any() else float('nan'):.3e}, "
           f"mean abs diff {diff[finite].mean().item() if finite.any() else float('nan'):.3e}, "
           f"non-finite {int((~finite).sum())}, dtype {dtype}, shape {tuple(a.shape)}, "
           f"{('TF32 gradient ' if grad else 'TF32 ') if uses_tf32(dtype, actual.device, tf32) else ''}tolerance "
           f"({atol * scale:.1e}, {rtol * scale:.1e}) on {actual.device}")
    torch.testing.assert_close(a, e, atol=atol * scale, rtol=rtol * scale, msg=lambda m: f"{msg}\n{m}")


def run_both(fn: Callable, inputs: Callable[[], tuple], grads_of: Sequence[int] = ()) -> tuple[list, list]:
    """Run ``fn(*inputs())`` on the Triton backend and on the reference backend with identical inputs.

    Returns, for each backend, ``[output, grad of input i for i in grads_of]`` (backward with a fixed
    random cotangent). The Triton side runs under the interpreter on CPU tests.
    """
    results = []
    for backend in ("triton", "reference"):
        args = inputs()
        for i in grads_of:
            args[i].requires_grad_(True)
        with use_backend(backend):
            out = fn(*args)
            got = [out.detach()]
            if grads_of:
                g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(7))
                grads = torch.autograd.grad(out, [args[i] for i in grads_of], g.to(out.device))
                got += [x.detach() for x in grads]
        results.append(got)
    return results[0], results[1]


def compare_backends(fn: Callable, make_inputs: Callable[..., tuple], cases: Iterable[dict],
                     grads_of: Sequence[int] = (), scale: float = 1.0) -> None:
    """For each case (kwargs of ``make_inputs``, which must include ``dtype``), compare the Triton
    kernel with the reference on the same random inputs, output and every requested gradient."""
    for case in cases:
        kernel, ref = run_both(fn, lambda: make_inputs(**case), grads_of)
        names = ["output"] + [f"grad[{i}]" for i in grads_of]
        for name, a, e in zip(names, kernel, ref):
            assert_close(a, e, case["dtype"], what=f"{name} {case}", scale=scale)


def grid(**axes: Sequence) -> list[dict]:
    """Cartesian product of named axes as a list of case dicts."""
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


@contextlib.contextmanager
def seeded(seed: int = 0):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


@contextlib.contextmanager
def reference_ops_one_thread():
    """Every op on its PyTorch reference (not the Triton interpreter) and torch on one thread inside the
    block: on two busy cores, two torch threads made a plan call about 40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with use_backend("reference"):
            yield
    finally:
        torch.set_num_threads(threads)


# Every kernel an audit test looks at: one audit process compiles them all (its compile pool shared),
# started in the background as the session's collection ends (tests/conftest.py: the tests marked
# ``audit`` run last, while the other tests keep one core busy), and every run_audit call reads its rows.
AUDITED = ("latent_loss_fwd", "latent_loss_bwd", "elite_refit", "sample_actions", "fused_linear", "linear_goal_cost",
           "latent_cost_fwd", "ema", "masked_attention_fwd", "masked_attention_bwd_preprocess", "masked_attention_bwd")
_ROWS: list[dict] = []
_BACKGROUND: list[tuple[subprocess.Popen, object, object]] = []


def _audit_args(kernels, jobs: int | None = None) -> tuple[list[str], dict]:
    """The audit's command line and environment: a process of its own, which must not see TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    args = [sys.executable, "-m", "jepa_engine.kernels.audit", "--json"]
    for k in kernels:
        args += ["--kernel", k]
    if jobs:
        args += ["--jobs", str(jobs)]
    return args, env


def _rows_of(returncode: int, stdout: str, stderr: str) -> list[dict]:
    assert stdout.strip(), f"audit printed nothing (exit status {returncode}); stderr:\n{stderr[-3000:]}"
    return json.loads(stdout)


def _audit_process(kernels) -> list[dict]:
    """Run the audit in a fresh process and return its rows."""
    args, env = _audit_args(kernels)
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    return _rows_of(proc.returncode, proc.stdout, proc.stderr)


def start_audit() -> None:
    """Start compiling every kernel of AUDITED in a background process on one core (the other core
    runs the tests); :func:`run_audit` waits for it. Its output goes to temporary files, which no
    pipe buffer can block. Not in a pytest-xdist worker: every worker would start its own, and the one
    that runs the audit tests compiles them when they ask."""
    if _ROWS or _BACKGROUND or "PYTEST_XDIST_WORKER" in os.environ:
        return
    args, env = _audit_args(AUDITED, jobs=max(1, (os.cpu_count() or 2) - 1))
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    _BACKGROUND.append((subprocess.Popen(args, stdout=out, stderr=err, text=True, env=env), out, err))


def _end(proc: subprocess.Popen, out, err) -> None:
    proc.kill()
    proc.wait()
    out.close()
    err.close()


def stop_audit() -> None:
    """End a background audit nobody read (the session ends, or fails, before the audit tests)."""
    while _BACKGROUND:
        _end(*_BACKGROUND.pop())


def _background_rows() -> list[dict]:
    proc, out, err = entry = _BACKGROUND.pop()
    try:
        returncode = proc.wait(timeout=900)
        out.seek(0)
        err.seek(0)
        return _rows_of(returncode, out.read(), err.read())
    finally:
        _end(*entry)


def run_audit(*kernels: str) -> list[dict]:
    """The audit's rows of these kernels (all of AUDITED compiled once per session)."""
    if not set(kernels) <= set(AUDITED):
        return _audit_process(kernels)
    if not _ROWS:
        _ROWS.extend(_background_rows() if _BACKGROUND else _audit_process(AUDITED))
    return [r for r in _ROWS if r["kernel"] in kernels]
