"""The planning ops on the CPU: candidate sampling and elite refit, the native C++ kernels against their
Python references and against ``torch.randn`` / the textbook top-k refit.

``jepa_engine`` is the public op on plain CPU tensors, which runs the C++ kernel of ``jepa_engine/_C.so``
when it is built (``make native``; the row's ``native`` says whether it was) and the reference
otherwise. ``python_reference`` is the reference (Philox in numpy, the specification the C++ kernel
matches bit for bit); ``torch_randn`` draws the same number of standard normals with torch's own
generator and applies the same affine map and clip (not the same stream: the price floor of any
sampler). Every round makes ``REPS`` calls: one call is tens of microseconds. One torch thread: at a
planning iteration's size a second thread costs more than it saves (and on shared cores torch's
OpenMP pool turns a 4 us ``torch.log`` of 3000 values into milliseconds).
"""
from __future__ import annotations

import pytest
import torch

from jepa_engine.kernels import elite_refit, sample_actions, use_backend
from jepa_engine.kernels import _native

if torch.cuda.is_available():
    pytest.skip("CPU benchmark of the native kernels (the CUDA path is the Triton kernel: bench_planning.py)",
                allow_module_level=True)

N, H, A, K = 300, 5, 2, 30       # LeWorldModel's CEM budget: 300 candidates of 5 steps x 2 actions, 30 elites
P = H * A
ENVS = [1, 8]
REPS = 100


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(E):
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(E, P, generator=g) * 0.3, torch.rand(E, P, generator=g) + 0.2
    low, high = torch.full((A,), -1.0), torch.full((A,), 1.0)
    return mean, std, low, high, torch.tensor([1234, 0], dtype=torch.int64)


def _repeat(fn):
    def run():
        for _ in range(REPS):
            out = fn()
        return out
    return run


@pytest.mark.parametrize("impl", ["jepa_engine", "python_reference", "torch_randn"])
@pytest.mark.parametrize("E", ENVS)
def test_sample_actions(benchmark, run_bench, impl, E):
    mean, std, low, high, rng = _inputs(E)
    if impl == "jepa_engine":
        fn = lambda: sample_actions(mean, std, low, high, rng, N)
    elif impl == "python_reference":
        def fn():
            with use_backend("reference"):
                return sample_actions(mean, std, low, high, rng, N)
    else:
        fn = lambda: (mean[:, None] + std[:, None] * torch.randn(E, N, P)).clamp_(-1.0, 1.0)
    run_bench(benchmark, _repeat(fn), impl=impl, group=f"sample_actions CPU E={E} N={N} H={H} A={A} x{REPS}",
              envs=E, calls_per_fn=REPS, native=_native.available())


@pytest.mark.parametrize("impl", ["jepa_engine", "python_reference", "topk_eager"])
@pytest.mark.parametrize("E", ENVS)
def test_elite_refit(benchmark, run_bench, impl, E):
    mean, std, low, high, rng = _inputs(E)
    samples = sample_actions(mean, std, low, high, rng, N)
    costs = (samples - 0.3).square().sum(-1)
    if impl == "jepa_engine":
        fn = lambda: elite_refit(costs, samples, mean, std, mode="cem", k=K, min_std=0.05)
    elif impl == "python_reference":
        def fn():
            with use_backend("reference"):
                return elite_refit(costs, samples, mean, std, mode="cem", k=K, min_std=0.05)
    else:
        def fn():
            idx = costs.topk(K, dim=1, largest=False).indices
            elites = samples[torch.arange(E)[:, None], idx]
            return elites.mean(dim=1), elites.std(dim=1).clamp_min(0.05)
    run_bench(benchmark, _repeat(fn), impl=impl, group=f"elite_refit CEM CPU E={E} N={N} P={P} K={K} x{REPS}",
              envs=E, calls_per_fn=REPS, native=_native.available())
