"""Shared test helpers: the dtype tolerance table and kernel-vs-reference comparison.

Precision each test expects: fp32 kernels are compared at fp32 tolerances (the interpreter is exact;
on the GPU fp32 ``tl.dot`` is TF32 unless a kernel asks for ``ieee``, so dot-based kernels use
``TF32_TOLERANCE`` there). fp16/bf16 kernels compute in fp32 and round on store, so their tolerance
is a few units in the last place of the storage dtype.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Iterable, Sequence

import torch

import pytest

from jepa_engine.kernels import use_backend
from jepa_engine.kernels._launch import interpreting, triton_available

# dtype -> (atol, rtol), stated once for the whole suite.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1.3e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 1.6e-2),
}
TF32_TOLERANCE = (2e-3, 2e-3)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Kernel tests run where Triton can: on a CUDA device, or on CPU under TRITON_INTERPRET=1.
needs_triton = pytest.mark.skipif(not (triton_available() and (interpreting() or torch.cuda.is_available())),
                                  reason="needs TRITON_INTERPRET=1 or a CUDA device")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 what: str = "", scale: float = 1.0) -> None:
    """``torch.testing.assert_close`` at the table's tolerance for ``dtype`` (times ``scale``),
    with the max and mean absolute difference in the failure message."""
    dtype = dtype or expected.dtype
    atol, rtol = TOLERANCES[dtype]
    a, e = actual.detach().float(), expected.detach().float()
    diff = (a - e).abs()
    finite = torch.isfinite(diff)
    msg = (f"{what}: max abs diff {diff[finite].max().item() if finite.any() else float('nan'):.3e}, "
           f"mean abs diff {diff[finite].mean().item() if finite.any() else float('nan'):.3e}, "
           f"non-finite {int((~finite).sum())}, dtype {dtype}, shape {tuple(a.shape)}")
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
