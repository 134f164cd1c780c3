"""Every kernel at multi-block shapes, against its PyTorch reference (marker ``multiblock``).

The other kernel tests use small shapes (N <= 45) that span several of the interpreter's 16-wide tiles,
but fit in one tile of the compiled launch tables (64- and 128-row tiles): on a GPU their multi-block
paths (online softmax across key blocks, frame skipping across query blocks, K loops, row and column
tails, persistent loops) would never run. Here the shapes span many compiled tiles: masked attention at
N in {129, 300, 1031} and head dims {64, 80, 128}, forward and backward, with every mask kind it
supports; fused_linear / linear_goal_cost over M of several row tiles, K of several K steps and N of
several column tiles; the row kernels, EMA, sampling and refit over many blocks.

Where: these run compiled where a CUDA device is present (``make gpu-report``'s kernel-test stage runs
``-m multiblock``); under the Triton interpreter, only the one ``small`` case of each kernel runs (a few
seconds in all), so that the tests cannot rot between GPU runs.

Tolerances, by the precision of each result (tests/helpers.py states the table): fp32 forwards are
IEEE fp32 on both sides (only the summation order differs); the attention backward's fp32 dots are TF32
compiled (``TF32_GRAD_TOLERANCE``; exact under the interpreter); fp32 ``fused_linear`` dots are TF32
where torch allows TF32 matmuls, as ``torch.nn.Linear``'s; fp16/bf16 run on tensor cores with fp32
accumulation, so they differ from the fp32 reference by the rounding of the inputs to the dots (P and
dS in attention, the normalised rows in fused_linear) and of the stored result: the dtype's tolerance,
x2 for the attention gradients (a sum over a whole row or column), x4 for fused_linear (as its own
tests), x10 on fp32 reductions over a long row (latent cost, refit moments).
"""
from __future__ import annotations

import pytest
import torch

from jepa_engine.kernels import (elite_refit, elite_refit_reference, ema_update_, ema_update_reference,
                                 latent_cost, latent_cost_reference, linear_goal_cost, masked_attention,
                                 sample_actions, sample_actions_reference, use_backend)
from jepa_engine.kernels._launch import triton_available
from tests.helpers import DTYPES, assert_close, compare_backends, run_both

pytestmark = [pytest.mark.multiblock,
              pytest.mark.skipif(not triton_available(), reason="triton is not installed")]

CUDA = torch.cuda.is_available()
ON_GPU = pytest.mark.skipif(not CUDA, reason="multi-block shapes run compiled on a CUDA device; under the "
                                             "Triton interpreter only each kernel's small case runs")
GRAD_SCALE = 2.0


def cases(small: tuple, full: list[tuple], ids=None) -> list:
    """``small`` everywhere (id ``small``), the ``full`` cases where a CUDA device is present."""
    ids = ids or [None] * len(full)
    return [pytest.param(*small, id="small")] + [pytest.param(*c, marks=ON_GPU, id=i) for c, i in zip(full, ids)]


# --------------------------------------------------------------------------------------------------
# Masked attention, forward and backward
# --------------------------------------------------------------------------------------------------
MASKS = ["dense", "key_padding", "frame", "frame_long", "padding+frame", "keep_index", "varlen", "varlen+frame"]
SIZES = [(N, D) for N in (129, 300, 1031) for D in (64, 80, 128)]


def attention_inputs(mask: str, dtype, N: int, D: int, B: int = 2, H: int = 2, device="cpu"):
    """[q, k, v, kwargs] drawn on CPU, on ``device``. ``frame``: short frames (7 tokens, many per tile);
    ``frame_long``: 4 frames of N // 4 tokens (2 of them action/state tokens), longer than a tile at
    N = 1031. Padding leaves one sample without a visible key and sample 0's first frame empty; the
    index set leaves half of sample 0's slots unused; varlen packs sequences of N, 0 and N // 3 + 1."""
    g = torch.Generator().manual_seed(N * 1000 + D)
    long_frame = dict(frame_size=max(1, N // 4 - 2), frame_extra_tokens=2)
    kw: dict = {}
    if mask.startswith("varlen"):
        lens = [N, 0, N // 3 + 1]
        q, k, v = (torch.randn(sum(lens), H, D, generator=g).to(device, dtype) for _ in range(3))
        kw["cu_seqlens"] = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
        if mask == "varlen+frame":
            kw.update(long_frame)
        return [q, k, v, kw]
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(device, dtype) for _ in range(3))
    if mask in ("key_padding", "padding+frame"):
        pad = torch.rand(B, N, generator=g) < 0.6
        pad[-1] = False
        if mask == "padding+frame":
            pad[0, :N // 4] = False
            pad[-1, N // 2:] = True
        kw["key_padding"] = pad.to(device)
    if mask == "frame":
        kw.update(frame_size=5, frame_extra_tokens=2)
    if mask in ("frame_long", "padding+frame"):
        kw.update(long_frame)
    if mask == "keep_index":
        K = (N * 3) // 5
        idx = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B)])
        idx[0, K // 2:] = -1
        kw["keep_index"] = idx.to(device)
    return [q, k, v, kw]


def check_attention(device, mask, dtype, N, D):
    kernel, ref = run_both(lambda q, k, v, kw: masked_attention(q, k, v, **kw),
                           lambda: attention_inputs(mask, dtype, N, D, device=device), grads_of=(0, 1, 2))
    for name, a, e in zip(["out", "dq", "dk", "dv"], kernel, ref):
        assert torch.isfinite(a).all(), f"{name} {mask} {dtype} N={N} D={D}: non-finite values"
        assert_close(a, e, dtype, what=f"{name} {mask} N={N} D={D}", scale=1.0 if name == "out" else GRAD_SCALE,
                     tf32=name != "out", grad=name != "out")


ATTENTION = [(m, dt, n, d) for dt in DTYPES for m in MASKS for n, d in SIZES]


@pytest.mark.parametrize("mask,dtype,N,D", cases(("padding+frame", torch.float32, 40, 48), ATTENTION,
                                                 ids=[f"{m}-{str(dt)[6:]}-N{n}-D{d}" for m, dt, n, d in ATTENTION]))
def test_masked_attention(kernel_device, mask, dtype, N, D):
    check_attention(kernel_device, mask, dtype, N, D)


# --------------------------------------------------------------------------------------------------
# fused_linear and linear_goal_cost
# --------------------------------------------------------------------------------------------------
from tests.kernels.test_fused_linear import TF32, both, make  # noqa: E402

LINEAR = [(M, K, N, full, dt) for M, K, N in [(1031, 384, 1152), (4099, 192, 100), (300, 1536, 384)]
          for full in (True, False) for dt in DTYPES]


@pytest.mark.parametrize("M,K,N,full,dtype", cases((70, 40, 50, True, torch.float32), LINEAR))
def test_fused_linear(kernel_device, M, K, N, full, dtype):
    from jepa_engine.kernels import fused_linear

    x, w, b, r, _ = make(M, K, N, dtype, device=kernel_device)
    y, want = both(fused_linear, x, w, b if full else None, normalize=full, eps=1e-5,
                   activation="gelu" if full else None, residual=r if full else None)
    assert y.dtype == dtype and y.shape == (M, N)
    assert_close(y, want, dtype, what=f"y {M}x{K}x{N} {dtype} full={full}", scale=4, tf32=TF32)


GOAL = [(*shape, metric, dt) for shape in [(1200, 384, 192, 4), (1031, 256, 64, 1), (600, 128, 256, 3)]
        for metric in ("l2", "l1") for dt in DTYPES]


@pytest.mark.parametrize("M,K,D,G,metric,dtype", cases((48, 24, 40, 3, "l2", torch.bfloat16), GOAL))
def test_linear_goal_cost(kernel_device, M, K, D, G, metric, dtype):
    from jepa_engine.kernels.fused_linear import linear_goal_cost_reference

    x, w, b, _, goal = make(M, K, D, dtype, G=G, device=kernel_device)
    (z, cost), (want_z, want_cost) = both(linear_goal_cost, x, w, b, goal, metric=metric)
    assert_close(z, want_z, dtype, what=f"z {M}x{K}x{D} {dtype}", scale=4, tf32=TF32)
    # the cost is of z as stored: against the reference's cost of the kernel's own z (fp32 math)
    _, cost_of_z = linear_goal_cost_reference(z.float(), torch.eye(D, device=kernel_device), None, goal.float(),
                                              normalize=False, metric=metric)
    assert_close(cost, cost_of_z, torch.float32, what=f"cost of z {M}x{K}x{D} {dtype}", scale=10)


# --------------------------------------------------------------------------------------------------
# Row kernels: latent loss (forward + backward), latent cost
# --------------------------------------------------------------------------------------------------
from tests.kernels.test_latent_loss import _op as latent_loss_op  # noqa: E402
from tests.kernels.test_latent_loss import make_inputs as latent_loss_inputs  # noqa: E402


LOSS = [(shape, kind, dt) for shape in [(1031, 768), (4099, 64), (517, 1280)] for kind in ("smooth_l1", "l2")
        for dt in DTYPES]


@pytest.mark.parametrize("shape,kind,dtype", cases(((40, 70), "smooth_l1", torch.float16), LOSS))
def test_latent_loss(kernel_device, shape, kind, dtype):
    compare_backends(latent_loss_op, latent_loss_inputs,
                     [dict(shape=shape, dtype=dtype, kind=kind, masked=True, device=kernel_device)], grads_of=(0, 1))


COST = [(*shape, *how, dt) for shape in [(1200, 5, 192, 4), (1031, 3, 64, 1), (300, 2, 768, 3)]
        for how in [("l2", "final", False), ("l1", "sum", True)] for dt in DTYPES]


@pytest.mark.parametrize("B,H,D,G,metric,reduce,weights,dtype", cases((30, 2, 70, 3, "l1", "sum", True, torch.float32),
                                                                     COST))
def test_latent_cost(kernel_device, B, H, D, G, metric, reduce, weights, dtype):
    g = torch.Generator().manual_seed(B + D)
    z = torch.randn(B, H, D, generator=g).to(kernel_device, dtype)
    goal = torch.randn(G, D, generator=g).to(kernel_device, dtype)
    w = torch.rand(H, generator=g).to(kernel_device) if weights else None
    with use_backend("triton"):
        got = latent_cost(z, goal, metric=metric, reduce=reduce, weights=w)
    want = latent_cost_reference(z, goal, metric=metric, reduce=reduce, weights=w)
    assert_close(got, want, torch.float32, what=f"cost {B, H, D, G} {dtype}", scale=10)


# --------------------------------------------------------------------------------------------------
# EMA, sampling, elite refit
# --------------------------------------------------------------------------------------------------
EMA_SHAPES = [(1031, 768), (768,), (3, 1025, 17), (70000,), (1, 197, 768)]   # many 4096-element blocks
F32, BF16 = torch.float32, torch.bfloat16


@pytest.mark.parametrize("shapes,t_dtype,o_dtype", cases(([(3, 40000), (5,)], F32, F32),
                                                         [(EMA_SHAPES, F32, F32), (EMA_SHAPES, BF16, BF16),
                                                          (EMA_SHAPES, F32, BF16)]))
def test_ema(kernel_device, shapes, t_dtype, o_dtype):
    g = torch.Generator().manual_seed(0)
    targets = [torch.randn(s, generator=g).to(kernel_device, t_dtype) for s in shapes]
    onlines = [torch.randn(s, generator=g).to(kernel_device, o_dtype) for s in shapes]
    expected = [t.clone() for t in targets]
    d_ref = ema_update_reference(expected, onlines, 0.996, return_distance=True)
    with use_backend("triton"):
        d = ema_update_(targets, onlines, torch.full((1,), 0.996, device=kernel_device), return_distance=True)
    for i, (a, e) in enumerate(zip(targets, expected)):
        assert_close(a, e, e.dtype, what=f"ema tensor {i} {list(e.shape)}")
    torch.testing.assert_close(d.float(), d_ref.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("E,N,P", cases((2, 300, 7), [(64, 300, 10), (3, 5000, 7)]))
def test_sample_actions(kernel_device, E, N, P):
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(E, P, generator=g), torch.rand(E, P, generator=g) + 0.5
    args = [t.to(kernel_device) for t in (mean, std, torch.tensor([-1.0]), torch.tensor([1.0]),
                                          torch.tensor([1234567, 11], dtype=torch.int64))]
    with use_backend("triton"):
        a = sample_actions(*args, N)
    assert_close(a, sample_actions_reference(*args, N, True), torch.float32, what=f"samples {E, N, P}", scale=10)


REFIT = [(*shape, mode) for shape in [(64, 300, 10, 30), (2, 1031, 67, 100)] for mode in ("cem", "mppi")]


@pytest.mark.parametrize("E,N,P,k,mode", cases((2, 130, 20, 10, "cem"), REFIT))
def test_elite_refit(kernel_device, E, N, P, k, mode):
    g = torch.Generator().manual_seed(N)
    args = [t.to(kernel_device) for t in (torch.randn(E, N, generator=g), torch.randn(E, N, P, generator=g),
                                          torch.randn(E, P, generator=g), torch.rand(E, P, generator=g) + 0.1)]
    with use_backend("triton"):
        a = elite_refit(*args, mode=mode, k=k, temperature=0.7, momentum=0.25, min_std=0.05)
    b = elite_refit_reference(*args, mode=mode, k=k, temperature=0.7, momentum=0.25, min_std=0.05)
    for name, x, y in zip(("mean", "std", "best_cost"), a[:3], b[:3]):
        assert_close(x, y, torch.float32, what=f"{name} {mode} {E, N, P, k}", scale=10)
    assert torch.equal(a[3], b[3]), "best index"
