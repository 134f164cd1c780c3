"""Fused latent loss: Triton kernel (compiled on CUDA, interpreter on CPU) vs the PyTorch reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jepa_engine.kernels import latent_loss, latent_loss_reference, use_backend
from jepa_engine.kernels.latent_loss import latent_loss_backward_reference
from tests.helpers import DTYPES, assert_close, compare_backends, grid


def make_inputs(shape, dtype, kind="smooth_l1", beta=1.0, masked=True, seed=0, device="cpu"):
    """[pred, target, mask, kind, beta] drawn on CPU from ``seed``, on ``device``."""
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(shape, generator=g).to(device, dtype)
    target = (torch.randn(shape, generator=g) * 0.7).to(device, dtype)
    mask = (torch.rand(shape[:-1], generator=g) < 0.6).to(device) if masked else None
    return [pred, target, mask, kind, beta]


def _op(pred, target, mask, kind, beta):
    return latent_loss(pred, target, mask, kind=kind, beta=beta)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["smooth_l1", "l2"])
def test_forward_backward_match_reference(kernel_device, dtype, kind):
    # Odd sizes: rows and features that are not multiples of any block; D on each side of every config.
    cases = grid(shape=[(3, 7, 33), (5, 123), (2, 1, 129), (1, 300)], dtype=[dtype], kind=[kind],
                 masked=[True, False], device=[kernel_device])
    compare_backends(_op, make_inputs, cases, grads_of=(0, 1))


@pytest.mark.parametrize("beta", [0.0, 0.05, 2.0])
def test_smooth_l1_beta(kernel_device, beta):
    compare_backends(_op, make_inputs, grid(shape=[(4, 9, 40)], dtype=[torch.float32], beta=[beta],
                                            device=[kernel_device]), grads_of=(0, 1))


def test_no_kept_token_gives_zero_not_nan(kernel_device):
    pred, target, _, kind, beta = make_inputs((2, 5, 16), torch.float32, device=kernel_device)
    pred.requires_grad_(True)
    mask = torch.zeros(2, 5, dtype=torch.bool, device=kernel_device)
    loss = latent_loss(pred, target, mask)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(pred.grad, torch.zeros_like(pred))


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 70), d=st.integers(1, 300), seed=st.integers(0, 2**16),
       kind=st.sampled_from(["smooth_l1", "l2"]), dtype=st.sampled_from(DTYPES))
def test_fuzz_shapes(kernel_device, rows, d, seed, kind, dtype):
    case = dict(shape=(rows, d), dtype=dtype, kind=kind, seed=seed, device=kernel_device)
    compare_backends(_op, make_inputs, [case], grads_of=(0, 1))


def test_non_contiguous_inputs(kernel_device):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, 64, generator=g).to(kernel_device)
    pred = base[:, ::2, :]  # row stride 128, not 64
    target = torch.randn(6, 5, 64, generator=g).to(kernel_device).transpose(0, 1).contiguous().transpose(0, 1)
    with use_backend("triton"):
        a = latent_loss(pred, target)
    assert_close(a, latent_loss_reference(pred, target), torch.float32, what="non-contiguous")


def test_reference_matches_torch_smooth_l1():
    pred, target = torch.randn(4, 8, 32), torch.randn(4, 8, 32)
    expected = torch.nn.functional.smooth_l1_loss(pred, target, beta=0.5)
    assert_close(latent_loss_reference(pred, target, beta=0.5), expected, torch.float32, what="unmasked mean")


def test_reference_backward_matches_autograd():
    pred, target, mask, kind, beta = make_inputs((3, 11, 24), torch.float32)
    for kind in ("smooth_l1", "l2"):
        p, t = pred.clone().requires_grad_(True), target.clone().requires_grad_(True)
        latent_loss_reference(p, t, mask, kind=kind, beta=0.3).backward(torch.tensor(1.7))
        dp, dt = latent_loss_backward_reference(torch.tensor(1.7), pred, target, mask, kind=kind, beta=0.3)
        assert_close(dp, p.grad, torch.float32, what=f"{kind} d_pred")
        assert_close(dt, t.grad, torch.float32, what=f"{kind} d_target")


def test_compile_fullgraph():
    pred, target, mask, _, _ = make_inputs((4, 6, 32), torch.float32)
    compiled = torch.compile(lambda p, t, m: latent_loss(p, t, m, kind="l2"), fullgraph=True, backend="eager")
    assert_close(compiled(pred, target, mask), latent_loss_reference(pred, target, mask, kind="l2"), torch.float32,
                 what="compiled")


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, before any kernel runs.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,exc,match", [
    (lambda: (torch.randn(8), torch.randn(8), None), ValueError, r"pred must have at least 2 dims, got shape \[8\]"),
    (lambda: (torch.randn(4, 8), torch.randn(4, 9), None), ValueError, r"target must be pred.shape = \[4, 8\], got \[4, 9\]"),
    (lambda: (torch.ones(4, 8, dtype=torch.int64), torch.ones(4, 8, dtype=torch.int64), None), TypeError,
     r"pred must have dtype in \(float32, float16, bfloat16\), got int64"),
    (lambda: (torch.randn(4, 8), torch.randn(4, 8, dtype=torch.float16), None), TypeError,
     r"target must have the dtype of pred \(float32\), got float16"),
    (lambda: (torch.randn(4, 8), torch.randn(4, 8), torch.ones(5, dtype=torch.bool)), ValueError,
     r"mask must be pred.shape\[:-1\] = \[4\], got \[5\]"),
    (lambda: (torch.randn(4, 8), torch.randn(4, 8), torch.ones(4)), TypeError, r"mask must have dtype in \(bool\)"),
    (lambda: (torch.randn(0, 8), torch.randn(0, 8), None), ValueError, r"pred must not be empty, got shape \[0, 8\]"),
    (lambda: (torch.randn(4, 8), torch.randn(4, 8, device="meta"), None), ValueError, r"target must be on cpu"),
    (lambda: ([1.0], torch.randn(4, 8), None), TypeError, r"pred must be a torch.Tensor, got list"),
])
def test_bad_input(make, exc, match):
    pred, target, mask = make()
    with pytest.raises(exc, match=r"latent_loss: " + match):
        latent_loss(pred, target, mask)


def test_bad_kind_and_beta():
    p, t = torch.randn(2, 4), torch.randn(2, 4)
    with pytest.raises(ValueError, match="kind must be one of"):
        latent_loss(p, t, kind="huber")
    with pytest.raises(ValueError, match="beta must be >= 0, got -1"):
        latent_loss(p, t, beta=-1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_cuda_mix_rejected():
    with pytest.raises(ValueError, match="target must be on cuda"):
        latent_loss(torch.randn(4, 8, device="cuda"), torch.randn(4, 8))


def test_cuda_default_is_the_reference_unless_the_kernels_are_forced(monkeypatch):
    """The measured dispatch (the kernels lost on an H100 at the benched shapes; kernels/routes.py): CUDA
    tensors take the reference ops by default, the kernels inside ``use_backend("triton")``; other devices
    are untouched (a machine where the kernels run everywhere is simulated)."""
    from jepa_engine.kernels import _launch, routes

    monkeypatch.setattr(_launch, "triton_runs_on", lambda device: True)
    assert _launch.backend_for("latent_loss", torch.device("cuda")) == "reference"
    assert _launch.backend_for("latent_loss", torch.device("cpu")) == "triton"
    varlen = routes.attention_class(64, 4096, torch.bfloat16, varlen=True)
    assert _launch.backend_for("masked_attention", torch.device("cuda"), varlen) == "triton"
    with use_backend("triton"):
        assert _launch.backend_for("latent_loss", torch.device("cuda")) == "triton"
