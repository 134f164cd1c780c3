"""The native operator library (jepa_engine/_C.so, csrc/): its C++ CPU kernels against the Python
references, its argument errors against the Python ones, the Python registrations onto its schemas,
and the package's Python path when the library is absent.

Without the library the tests that need it skip where no compiler could have built it (cmake or g++
missing) and fail where one could: a build that broke must not pass unnoticed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jepa_engine.kernels import _native, elite_refit, elite_refit_reference, sample_actions, sample_actions_reference
from jepa_engine.kernels import use_backend
from tests.helpers import assert_close

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def native():
    if not _native.available():
        if shutil.which("cmake") and shutil.which(os.environ.get("CXX", "g++")):
            pytest.fail(f"cmake and a C++ compiler are here but the native library is not loaded: {_native.status()}")
        pytest.skip(f"no compiler to build the native library: {_native.status()}")


def sampling_args(E, P, A, seed, offset):
    g = torch.Generator().manual_seed(E * 1000 + P)
    mean = torch.randn(E, P, generator=g) * 0.7
    std = torch.rand(E, P, generator=g) + 0.3
    low = -0.4 - torch.rand(A, generator=g)
    high = 0.4 + torch.rand(A, generator=g)
    return mean, std, low, high, torch.tensor([seed, offset], dtype=torch.int64)


# --------------------------------------------------------------------------------------------------
# sample_actions: the reference's stream, bit for bit
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("E,N,P,A,seed,offset", [
    (1, 300, 10, 2, 0, 0),                    # a CEM iteration of the demo budget
    (1, 1, 2, 2, 7, 5),
    (3, 50, 10, 2, 1234567891234, 5),
    (2, 333, 7, 1, -5, (1 << 32) - 100),      # negative seed; counters crossing 2^32
    (4, 129, 9, 3, 2 ** 62 + 3, 2 ** 40),     # high key and counter words
    (2, 2000, 12, 4, 99, 17),                 # 48000 values: the multi-threaded path
    (2, 50, 10, 2, 11, -6),                   # value indices wrapping past 2^64 (and Philox blocks past 2^62)
    (3, 7, 5, 5, 8, 2 ** 62 - 3),             # blocks ending mid-row, counters high
])
@pytest.mark.parametrize("include_mean", [True, False])
def test_sampling_bit_identical_to_reference(E, N, P, A, seed, offset, include_mean):
    args = sampling_args(E, P, A, seed, offset)
    got = torch.ops.jepa_engine.sample_actions(*args, N, include_mean)
    want = sample_actions_reference(*args, N, include_mean)
    assert got.shape == (E, N, P) and got.dtype == torch.float32
    diff = (got != want).sum().item()
    assert torch.equal(got, want), f"{diff} of {want.numel()} values differ from the reference stream"


@pytest.mark.skipif(not _native.schema("sample_actions"), reason="the C++ kernel needs the native library")
@pytest.mark.parametrize("E,N,P,A,seed,offset", [(1, 7, 3, 1, 0, 0), (3, 33, 10, 2, -5, 2 ** 32 - 40),
                                                 (2, 300, 10, 2, 2 ** 62, 12345)])
def test_portable_philox_is_the_vector_paths_stream(E, N, P, A, seed, offset, monkeypatch):
    """JEPA_ENGINE_PORTABLE_KERNELS makes the C++ draw take its plain loop (what a CPU without AVX2 runs),
    which must draw the same bits as the AVX2 path and the reference."""
    args = sampling_args(E, P, A, seed, offset)
    vector = torch.ops.jepa_engine.sample_actions(*args, N, True)
    monkeypatch.setenv("JEPA_ENGINE_PORTABLE_KERNELS", "1")
    portable = torch.ops.jepa_engine.sample_actions(*args, N, True)
    assert torch.equal(portable, vector)
    assert torch.equal(portable, sample_actions_reference(*args, N, include_mean=True))


def test_sampling_split_between_threads_is_the_one_thread_stream():
    """The C++ draw runs in chunks of rows on the ATen pool (each chunk's log / sqrt / cos too); the
    chunking changes no bit, and the caller's thread count is left as it was."""
    args = sampling_args(8, 10, 2, seed=5, offset=123)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.jepa_engine.sample_actions(*args, 3001, True)
        torch.set_num_threads(2)
        two = torch.ops.jepa_engine.sample_actions(*args, 3001, True)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert torch.equal(one, sample_actions_reference(*args, 3001, include_mean=True))


def test_public_op_takes_the_native_path(plain_cpu, monkeypatch):
    args = sampling_args(2, 10, 2, 42, 1000)
    want = sample_actions_reference(*args, 64, True)

    def fail(*a, **k):
        raise AssertionError("the Python reference ran instead of the C++ kernel")
    monkeypatch.setattr(sys.modules["jepa_engine.kernels.sample_actions"], "sample_actions_reference", fail)
    monkeypatch.setattr(sys.modules["jepa_engine.kernels.elite_refit"], "elite_refit_reference", fail)
    got = sample_actions(*args, 64)
    assert torch.equal(got, want)
    costs = got.square().sum(-1)
    new_mean, *_ = elite_refit(costs, got, args[0], args[1], mode="cem", k=8)
    assert new_mean.shape == (2, 10)
    # use_backend("reference") still gives the specification (tests and benchmarks compare against it)
    monkeypatch.undo()
    with use_backend("reference"):
        assert torch.equal(sample_actions(*args, 64), want)


def test_fresh_offsets_and_bounds(plain_cpu):
    mean, std, low, high, rng = sampling_args(1, 10, 2, 3, 0)
    a = sample_actions(mean, std, low, high, rng, 500)
    b = sample_actions(mean, std, low, high, rng + torch.tensor([0, 500 * 10]), 500)
    assert not torch.equal(a[:, 1:], b[:, 1:])
    assert bool((a >= low.repeat(5)).all() and (a <= high.repeat(5)).all())
    z = sample_actions(torch.zeros(1, 2), torch.ones(1, 2), torch.full((2,), -50.0), torch.full((2,), 50.0), rng,
                       20000, include_mean=False)
    assert abs(z.mean().item()) < 0.03 and abs(z.std().item() - 1.0) < 0.03


# --------------------------------------------------------------------------------------------------
# elite_refit: the reference within the tolerance table
# --------------------------------------------------------------------------------------------------
def refit_args(E, N, P, dtype=torch.float32, seed=0, ties=False, nan=False):
    g = torch.Generator().manual_seed(seed)
    costs = torch.randn(E, N, generator=g)
    if ties:
        costs = costs.round()
    if nan:
        costs[:, ::7] = float("nan")
    samples = torch.randn(E, N, P, generator=g).to(dtype)
    return costs, samples, torch.randn(E, P, generator=g), torch.rand(E, P, generator=g) + 0.1


@pytest.mark.parametrize("mode", ["cem", "mppi"])
@pytest.mark.parametrize("E,N,P,k,dtype", [
    (1, 1, 1, 1, torch.float32), (3, 100, 10, 7, torch.float32), (2, 130, 67, 30, torch.float32),
    (4, 64, 64, 64, torch.float32), (1, 300, 10, 30, torch.float32), (2, 80, 12, 8, torch.bfloat16),
    (2, 80, 12, 8, torch.float16),
])
@pytest.mark.parametrize("ties,nan", [(False, False), (True, False), (False, True)])
def test_elite_refit_matches_reference(mode, E, N, P, k, dtype, ties, nan):
    if nan and N == 1:
        pytest.skip("a single NaN candidate has no finite elite")
    args = refit_args(E, N, P, dtype, seed=E + N + P, ties=ties, nan=nan)
    kw = dict(mode=mode, k=k, temperature=0.7, momentum=0.25, min_std=0.05)
    got = torch.ops.jepa_engine.elite_refit(*args, mode, k, 0.7, 0.25, 0.05)
    want = elite_refit_reference(*args, **kw)
    for name, x, y in zip(("mean", "std", "best_cost"), got[:3], want[:3]):
        assert x.dtype == torch.float32 and x.shape == y.shape
        assert_close(x, y, torch.float32, what=f"{name} {mode} {E, N, P, k} {dtype}", scale=10)
    assert got[3].dtype == torch.int64 and torch.equal(got[3], want[3]), "best index"


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_cem_non_finite_sample_outside_the_elites_propagates_as_in_the_reference(bad):
    """The C++ CEM refit sums only its k elites, which equals the reference's weighted sum over all N
    while every sample is finite; a non-finite non-elite makes the reference's 0 * x NaN, and so here."""
    costs, samples, mean, std = refit_args(2, 50, 6, seed=3)
    worst = costs[0].argmax()
    samples[0, worst, 2] = bad
    got = torch.ops.jepa_engine.elite_refit(costs, samples, mean, std, "cem", 5, 1.0, 0.0, 0.0)
    want = elite_refit_reference(costs, samples, mean, std, mode="cem", k=5)
    for x, y in zip(got[:2], want[:2]):
        torch.testing.assert_close(x, y, equal_nan=True)
    assert got[0][0, 2].isnan() and not got[0][1].isnan().any()


def test_cem_elites_are_the_k_best():
    costs = torch.tensor([[5.0, 1.0, 3.0, 1.0, 2.0]])   # a tie at 1.0: both are elites for k=2
    samples = torch.arange(5.0).view(1, 5, 1)
    mean, std, best, idx = torch.ops.jepa_engine.elite_refit(costs, samples, torch.zeros(1, 1), torch.ones(1, 1),
                                                             "cem", 2, 1.0, 0.0, 0.0)
    assert mean.item() == pytest.approx(2.0) and std.item() == pytest.approx(1.0)
    assert best.item() == 1.0 and idx.item() == 1


# --------------------------------------------------------------------------------------------------
# Bad input: the same exception, with the same message, from C++ as from Python
# --------------------------------------------------------------------------------------------------
def _sampling_bad():
    mean, std, low, high, rng = sampling_args(3, 10, 2, 1, 0)
    return [
        ((mean, std[:, :9], low, high, rng, 4), ValueError, r"std must be mean.shape = \[3, 10\], got \[3, 9\]"),
        ((mean[0], std, low, high, rng, 4), ValueError, r"mean must be 2-D, got 1-D with shape \[10\]"),
        ((mean.double(), std, low, high, rng, 4), TypeError, r"mean must have dtype in \(float32\), got float64"),
        ((mean, std, torch.zeros(3), torch.ones(3), rng, 4), ValueError,
         r"the action dim A = len\(low\) = 3 must divide P = 10"),
        ((mean, std, low, high[:1], rng, 4), ValueError, r"high must be low.shape = \[2\], got \[1\]"),
        ((mean, std, low, high, rng, 0), ValueError, "n must be an int >= 1, got 0"),
        ((mean, std, low, high, rng.int(), 4), TypeError, r"rng must have dtype in \(int64\), got int32"),
        ((mean, std, low, high, rng[:1], 4), ValueError, r"rng must be \[seed, offset\] = \[2\], got \[1\]"),
        ((mean[:0], std[:0], low, high, rng, 4), ValueError, r"mean must not be empty, got shape \[0, 10\]"),
    ]


def _refit_bad():
    costs, samples, mean, std = refit_args(2, 10, 4)
    base = dict(mode="cem", k=3, temperature=1.0, momentum=0.0, min_std=0.0)
    return [
        ((costs[:, :9], samples, mean, std), base, ValueError, r"costs must be \[E, N\] = \[2, 10\], got \[2, 9\]"),
        ((costs, samples, torch.zeros(2, 5), std), base, ValueError, r"mean must be \[E, P\] = \[2, 4\], got \[2, 5\]"),
        ((costs.double(), samples, mean, std), base, TypeError, r"costs must have dtype in \(float32\), got float64"),
        ((costs, samples.int(), mean, std), base, TypeError,
         r"samples must have dtype in \(float32, float16, bfloat16\), got int32"),
        ((costs, samples, mean, std), {**base, "k": 0}, ValueError, r"k must be in \[1, N\] = \[1, 10\], got 0"),
        ((costs, samples, mean, std), {**base, "k": 11}, ValueError, r"k must be in \[1, N\] = \[1, 10\], got 11"),
        ((costs, samples, mean, std), {**base, "mode": "mcmc"}, ValueError,
         r"mode must be one of \('cem', 'mppi'\), got 'mcmc'"),
        ((costs, samples, mean, std), {**base, "temperature": 0.0}, ValueError, "temperature must be > 0, got 0.0"),
        ((costs, samples, mean, std), {**base, "momentum": 1.5}, ValueError, r"momentum must be in \[0, 1\], got 1.5"),
    ]


@pytest.mark.parametrize("case", range(len(_sampling_bad())))
def test_sampling_errors_match_python(case, plain_cpu):
    args, exc, match = _sampling_bad()[case]
    with use_backend("reference"), pytest.raises(exc, match="^sample_actions: " + match) as py:
        sample_actions(*args)
    with pytest.raises(exc, match="^sample_actions: " + match + "$") as cpp:
        torch.ops.jepa_engine.sample_actions(*args)
    with pytest.raises(exc) as public:   # the public op on the native path
        sample_actions(*args)
    assert str(cpp.value) == str(py.value) == str(public.value)


@pytest.mark.parametrize("case", range(len(_refit_bad())))
def test_refit_errors_match_python(case, plain_cpu):
    args, kw, exc, match = _refit_bad()[case]
    with use_backend("reference"), pytest.raises(exc, match="^elite_refit: " + match) as py:
        elite_refit(*args, **kw)
    with pytest.raises(exc, match="^elite_refit: " + match + "$") as cpp:
        torch.ops.jepa_engine.elite_refit(*args, kw["mode"], kw["k"], kw["temperature"], kw["momentum"],
                                          kw["min_std"])
    with pytest.raises(exc) as public:
        elite_refit(*args, **kw)
    assert str(cpp.value) == str(py.value) == str(public.value)


# --------------------------------------------------------------------------------------------------
# What Python registers onto the C++ schemas
# --------------------------------------------------------------------------------------------------
def test_schemas_are_native_and_python_registers_cuda_and_fake_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    # the library `make native` builds defines every op (a partial build is for development only)
    if os.environ.get(_native.ENV, "") in ("", "1"):
        assert _native.native_ops() == frozenset(_native.NATIVE_OPS), _native.status()
    for op in _native.native_ops():
        name = f"jepa_engine::{op}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
    schema = str(torch.ops.jepa_engine.sample_actions.default._schema)
    assert schema.startswith("jepa_engine::sample_actions(Tensor mean, Tensor std, Tensor low, Tensor high")
    with FakeTensorMode():
        x = torch.ops.jepa_engine.sample_actions(torch.empty(3, 10), torch.empty(3, 10), torch.empty(2),
                                                 torch.empty(2), torch.empty(2, dtype=torch.int64), 17)
        out = torch.ops.jepa_engine.elite_refit(torch.empty(3, 17), x, torch.empty(3, 10), torch.empty(3, 10),
                                                "cem", 4, 1.0, 0.0, 0.0)
    assert x.shape == (3, 17, 10)
    assert [tuple(t.shape) for t in out] == [(3, 10), (3, 10), (3,), (3,)]
    assert [t.dtype for t in out] == [torch.float32, torch.float32, torch.float32, torch.int64]


# --------------------------------------------------------------------------------------------------
# Without the native library: the Python path passes the ops' own tests; with it, they pass too
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loaded", [False, True])
def test_ops_own_tests_pass_with_and_without_the_library(loaded):
    """The ops' test files on plain CPU (no interpreter: the public ops take the reference or the C++
    kernel), once with the library skipped (JEPA_ENGINE_NATIVE=0: every schema defined from Python) and
    once loaded."""
    env = dict(os.environ, TRITON_INTERPRET="0", JEPA_ENGINE_NATIVE="1" if loaded else "0")
    code = ("import sys, pytest\n"
            "from jepa_engine.kernels import _native\n"
            f"assert _native.available() is {loaded}, _native.status()\n"
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-m', 'not audit', *sys.argv[1:]]))\n")
    # Without the library also an autograd op's and the mutating op's files (their schemas then come from
    # Python; the whole suite once took 92 s more with every op's file); with it, the planning ops' (the
    # other ops' C++ paths have their own test files, tests/test_native_*.py). Not the audit's tests: they
    # compile the Triton kernels, which neither path runs.
    ops = ("sample_actions", "elite_refit") + (() if loaded else ("latent_loss", "ema"))
    files = [f"tests/kernels/test_{op}.py" for op in ops]
    run = subprocess.run([sys.executable, "-c", code, *files], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    tail = (run.stdout + run.stderr)[-2000:]
    assert run.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail


def test_selfcheck_names_each_ops_path(plain_cpu):
    from jepa_engine import selfcheck

    paths = {op: (schema, cpu) for op, schema, _, cpu in selfcheck.op_paths()}
    assert paths["sample_actions"] == ("C++ TORCH_LIBRARY", "native C++")
    assert paths["elite_refit"] == ("C++ TORCH_LIBRARY", "native C++")
    for op in _native.NATIVE_OPS:
        assert paths[op] == ("C++ TORCH_LIBRARY", selfcheck.CPU_FIRST.get(op, "") + "native C++"), op
    assert paths["masked_attention"][1] == "SDPA (fp32, not packed), else native C++"
    differ, total, worst = selfcheck.native_vs_reference()
    assert differ == 0 and total == 9000 and worst <= 1e-5


@settings(max_examples=12, deadline=None)
@given(E=st.integers(1, 3), N=st.integers(1, 70), steps=st.integers(1, 6), A=st.integers(1, 4),
       seed=st.integers(-(2 ** 63), 2 ** 63 - 1), offset=st.integers(0, 2 ** 48), include_mean=st.booleans())
def test_sampling_bit_identical_fuzz(E, N, steps, A, seed, offset, include_mean):
    args = sampling_args(E, steps * A, A, seed, offset)
    assert torch.equal(torch.ops.jepa_engine.sample_actions(*args, N, include_mean),
                       sample_actions_reference(*args, N, include_mean))
