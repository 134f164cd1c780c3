"""Candidate sampling with in-kernel Philox: kernel (compiled on CUDA, interpreter on CPU) vs the integer-op
reference."""
from __future__ import annotations

import pytest
import torch

from jepa_engine.kernels import sample_actions, sample_actions_reference, use_backend
from jepa_engine.kernels.sample_actions import gaussian_stream, philox4x32
from tests.helpers import assert_close


def make(E=3, P=10, A=2, seed=1234567891234, offset=5, device="cpu"):
    """[mean, std, low, high, rng], drawn on CPU and moved to ``device``."""
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(E, P, generator=g)
    std = torch.rand(E, P, generator=g) + 0.5
    low, high = torch.tensor([-1.0, -0.5])[:A], torch.tensor([1.0, 0.8])[:A]
    args = mean, std, low, high, torch.tensor([seed, offset], dtype=torch.int64)
    return tuple(t.to(device) for t in args)


@pytest.mark.parametrize("E,N,P,A,offset", [(1, 1, 2, 2, 5), (3, 50, 10, 2, 5), (2, 333, 7, 1, 5), (2, 9, 3, 1, -7)])
@pytest.mark.parametrize("include_mean", [True, False])
def test_kernel_draws_the_reference_stream(kernel_device, E, N, P, A, offset, include_mean):
    args = make(E, P, A, offset=offset, device=kernel_device)
    with use_backend("triton"):
        a = sample_actions(*args, N, include_mean=include_mean)
    b = sample_actions_reference(*args, N, include_mean)
    assert_close(a, b, torch.float32, what="same seed, same samples", scale=10)


def test_philox_known_answer():
    # Philox-4x32-10 published test vector (Salmon et al., Random123): counter 0, key 0.
    out = philox4x32(0, torch.zeros(1, dtype=torch.int64))
    assert [int(x) for x in out] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_stream_is_indexed_by_value():
    """The stream is a function of the value index alone: any offset reads the same values, four from
    each Philox block: r0 cos w1, r0 sin w1, r2 cos w3, r2 sin w3."""
    z = gaussian_stream(77, 10, 40)
    for shift in (1, 2, 3, 6):
        assert torch.equal(gaussian_stream(77, 10 + shift, 40 - shift), z[shift:])
    r0, r1, r2, r3 = (x.double() for x in philox4x32(77, torch.tensor([3], dtype=torch.int64)))
    u = [((x.long() >> 8).double() + 0.5) / 2 ** 24 for x in (r0, r1, r2, r3)]
    radius = [torch.sqrt(-2 * torch.log(u[0])), torch.sqrt(-2 * torch.log(u[2]))]
    want = torch.cat([radius[0] * torch.cos(2 * torch.pi * u[1]), radius[0] * torch.sin(2 * torch.pi * u[1]),
                      radius[1] * torch.cos(2 * torch.pi * u[3]), radius[1] * torch.sin(2 * torch.pi * u[3])])
    assert_close(z[2:6].double(), want, torch.float32, what="values 12..15 = block 3")
    wrapped = gaussian_stream(77, -2, 4)   # offsets are uint64: values 2^64 - 2, 2^64 - 1, 0, 1
    assert torch.equal(wrapped[2:], gaussian_stream(77, 0, 2))


def test_values_of_a_block_are_independent():
    """The four values of a block (two Box-Muller pairs) are uncorrelated normals, in their squares too."""
    z = gaussian_stream(5, 0, 4 * 50000).view(-1, 4).double()
    corr = torch.corrcoef(z.T)
    corr_sq = torch.corrcoef(z.square().T)
    off_diagonal = ~torch.eye(4, dtype=torch.bool)
    assert corr[off_diagonal].abs().max() < 0.02 and corr_sq[off_diagonal].abs().max() < 0.02
    assert (z.mean(0).abs() < 0.02).all() and ((z.std(0) - 1).abs() < 0.02).all()


def test_statistics_bounds_and_mean_slot():
    mean, std, low, high, rng = make(E=2, P=4, A=2)
    x = sample_actions(mean, std, low, high, rng, 4000)
    assert x.shape == (2, 4000, 4)
    assert bool((x >= low.repeat(2)).all() and (x <= high.repeat(2)).all())
    clipped_mean = torch.minimum(torch.maximum(mean, low.repeat(2)), high.repeat(2))
    assert torch.equal(x[:, 0], clipped_mean)
    z = sample_actions(torch.zeros(1, 2), torch.ones(1, 2), torch.full((2,), -50.0), torch.full((2,), 50.0), rng,
                       20000, include_mean=False)
    assert abs(z.mean().item()) < 0.03 and abs(z.std().item() - 1.0) < 0.03


def test_offset_gives_fresh_samples_and_seed_reproduces():
    mean, std, low, high, rng = make()
    a = sample_actions(mean, std, low, high, rng, 20)
    b = sample_actions(mean, std, low, high, rng.clone(), 20)
    c = sample_actions(mean, std, low, high, rng + torch.tensor([0, 3 * 20 * 10]), 20)
    assert torch.equal(a, b)
    assert not torch.equal(a[:, 1:], c[:, 1:])


def test_bad_input():
    mean, std, low, high, rng = make()
    with pytest.raises(ValueError, match=r"sample_actions: std must be mean.shape = \[3, 10\], got \[3, 9\]"):
        sample_actions(mean, std[:, :9], low, high, rng, 4)
    with pytest.raises(ValueError, match="the action dim A = len\\(low\\) = 3 must divide P = 10"):
        sample_actions(mean, std, torch.zeros(3), torch.ones(3), rng, 4)
    with pytest.raises(ValueError, match="n must be an int >= 1, got 0"):
        sample_actions(mean, std, low, high, rng, 0)
    with pytest.raises(TypeError, match="rng must have dtype in \\(int64\\), got int32"):
        sample_actions(mean, std, low, high, rng.int(), 4)


def test_philox_numpy_and_torch_paths_agree():
    from jepa_engine.kernels.sample_actions import _philox4x32_torch

    counter = torch.arange(5000, dtype=torch.int64) * 7919 + (1 << 33)  # high counter words too
    for a, b in zip(philox4x32(987654321987, counter), _philox4x32_torch(987654321987, counter, 10)):
        assert torch.equal(a, b)
