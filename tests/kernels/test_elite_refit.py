"""Elite selection + refit (CEM / MPPI): Triton kernel (compiled on CUDA, interpreter on CPU) vs the reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jepa_engine.kernels import elite_refit, elite_refit_reference, use_backend
from tests.helpers import assert_close


def make(E, N, P, dtype=torch.float32, seed=0, ties=False, nan=False, device="cpu"):
    """[costs, samples, mean, std], drawn on CPU from ``seed`` and moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    costs = torch.randn(E, N, generator=g)
    if ties:
        costs = costs.round()  # many equal costs: the stable tie-break decides the elites
    if nan:
        costs[:, ::7] = float("nan")
    samples = torch.randn(E, N, P, generator=g).to(dtype)
    args = costs, samples, torch.randn(E, P, generator=g), torch.rand(E, P, generator=g) + 0.1
    return tuple(t.to(device) for t in args)


def _both(args, **kw):
    with use_backend("triton"):
        a = elite_refit(*args, **kw)
    b = elite_refit_reference(*args, **kw)
    return a, b


@pytest.mark.parametrize("mode", ["cem", "mppi"])
@pytest.mark.parametrize("E,N,P,k", [(1, 1, 1, 1), (3, 100, 10, 7), (2, 130, 67, 30), (4, 64, 64, 64)])
@pytest.mark.parametrize("ties,nan", [(False, False), (True, False), (False, True)])
def test_matches_reference(kernel_device, mode, E, N, P, k, ties, nan):
    if nan and N == 1:
        pytest.skip("a single NaN candidate has no finite elite")
    args = make(E, N, P, ties=ties, nan=nan, device=kernel_device)
    a, b = _both(args, mode=mode, k=k, temperature=0.7, momentum=0.25, min_std=0.05)
    for name, x, y in zip(("mean", "std", "best_cost"), a[:3], b[:3]):
        assert_close(x, y, torch.float32, what=f"{name} {mode} {E, N, P, k}", scale=10)
    assert torch.equal(a[3], b[3]), "best index"


def test_bf16_samples(kernel_device):
    args = make(2, 80, 12, dtype=torch.bfloat16, device=kernel_device)
    a, b = _both(args, mode="cem", k=8)
    assert_close(a[0], b[0], torch.float32, what="mean", scale=10)


@settings(max_examples=8, deadline=None)
@given(E=st.integers(1, 3), N=st.integers(1, 150), P=st.integers(1, 40), seed=st.integers(0, 999),
       mode=st.sampled_from(["cem", "mppi"]), data=st.data())
def test_fuzz(kernel_device, E, N, P, seed, mode, data):
    k = data.draw(st.integers(1, N))
    a, b = _both(make(E, N, P, seed=seed, ties=seed % 2 == 0, device=kernel_device), mode=mode, k=k,
                 temperature=0.3)
    assert_close(a[0], b[0], torch.float32, what="mean", scale=10)
    assert_close(a[1], b[1], torch.float32, what="std", scale=10)


def test_cem_elites_are_the_k_best():
    costs = torch.tensor([[5.0, 1.0, 3.0, 0.0, 2.0]])
    samples = torch.arange(5.0).view(1, 5, 1)
    mean, std, best, idx = elite_refit(costs, samples, torch.zeros(1, 1), torch.ones(1, 1), mode="cem", k=2)
    assert mean.item() == pytest.approx((3 + 1) / 2) and std.item() == pytest.approx(1.0)
    assert best.item() == 0.0 and idx.item() == 3


def test_mppi_low_temperature_picks_the_best():
    costs = torch.tensor([[5.0, 1.0, 3.0, 0.0, 2.0]])
    samples = torch.arange(5.0).view(1, 5, 1)
    mean, std, *_ = elite_refit(costs, samples, torch.zeros(1, 1), torch.full((1, 1), 0.3), mode="mppi",
                                temperature=1e-3)
    assert mean.item() == pytest.approx(3.0) and std.item() == pytest.approx(0.3)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(k=0), ValueError, r"k must be in \[1, N\] = \[1, 10\], got 0"),
    (dict(k=11), ValueError, r"k must be in \[1, N\] = \[1, 10\], got 11"),
    (dict(mode="mcmc"), ValueError, "mode must be one of"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(momentum=1.5), ValueError, r"momentum must be in \[0, 1\]"),
])
def test_bad_parameters(kw, exc, match):
    with pytest.raises(exc, match="elite_refit: " + match):
        elite_refit(*make(2, 10, 4), **{"k": 3, **kw})


def test_bad_shapes():
    costs, samples, mean, std = make(2, 10, 4)
    with pytest.raises(ValueError, match=r"costs must be \[E, N\] = \[2, 10\], got \[2, 9\]"):
        elite_refit(costs[:, :9], samples, mean, std)
    with pytest.raises(ValueError, match=r"mean must be \[E, P\] = \[2, 4\], got \[2, 5\]"):
        elite_refit(costs, samples, torch.zeros(2, 5), std)
    with pytest.raises(TypeError, match="costs must have dtype in \\(float32\\), got float64"):
        elite_refit(costs.double(), samples, mean, std)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_sample_gives_nan_mean_and_std_as_the_reference(kernel_device, bad):
    """A non-finite sample (an elite here) makes the weighted sums NaN; the CEM std keeps that NaN
    through its clamps, as the reference's clamp_min does (a NaN-dropping max would report std 0 or
    min_std and hide it)."""
    costs, samples, mean, std = make(2, 40, 6, seed=4, device=kernel_device)
    samples[0, costs[0].argmin(), 1] = bad
    a, b = _both((costs, samples, mean, std), mode="cem", k=4, min_std=0.05)
    for x, y in zip(a[:2], b[:2]):
        torch.testing.assert_close(x.cpu(), y.cpu(), equal_nan=True)
    assert a[1][0, 1].isnan()
