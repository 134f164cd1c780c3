"""The loss family's C++ CPU kernels (csrc/losses.cpp): jepa_engine::latent_loss and jepa_engine::latent_cost
against their PyTorch references, gradients through the registered autograd formula, argument errors
identical to the public Python functions', the fake kernels, and the public ops' dispatch to the C++ kernel.

Without the native library the tests skip where no compiler could have built it (cmake or g++ missing) or
where JEPA_ENGINE_NATIVE=0 asks to skip it, and fail where one could: a build that broke, or one without
this family's ops, must not pass unnoticed.
"""
from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

from jepa_engine.kernels import _native, latent_cost, latent_cost_reference, latent_loss, latent_loss_reference
from jepa_engine.kernels import use_backend
from tests.helpers import DTYPES, assert_close

OPS = ("latent_loss", "latent_cost")


@pytest.fixture(scope="module", autouse=True)
def native():
    if os.environ.get(_native.ENV) == "0":
        pytest.skip(_native.status())
    missing = [op for op in OPS if op not in _native.native_ops()]
    if missing:
        why = _native.status()
        if _native.available():
            why = f"the loaded library lacks {missing} ({why})"
        if shutil.which("cmake") and shutil.which(os.environ.get("CXX", "g++")):
            pytest.fail(f"cmake and a C++ compiler are here but the loss ops' C++ kernels are not loaded: {why}")
        pytest.skip(f"no compiler to build the native library: {why}")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# latent_loss: the reference within fp32 tolerance (fp32 math on both sides, only the sums' order differs)
# --------------------------------------------------------------------------------------------------
def loss_inputs(shape, dtype, seed=0, mask="random", layout="contiguous"):
    """pred, target, mask of ``shape`` ([..., D]); ``layout``: "contiguous", "rows" (row strides larger
    than D, a slice of wider tensors), "features" (feature stride != 1, a transposed view) or "mixed"
    (pred strided rows, target a transposed copy)."""
    g = _gen(seed)
    *lead, D = shape
    if layout in ("rows", "mixed"):
        pred = torch.randn(*lead, D + 5, generator=g).to(dtype)[..., 2:D + 2]
    elif layout == "features":
        pred = torch.randn(D, *lead, generator=g).to(dtype).movedim(0, -1)
    else:
        pred = torch.randn(*lead, D, generator=g).to(dtype)
    t = (torch.randn(*lead, D, generator=g) * 0.7).to(dtype)
    if layout == "features":
        t = t.movedim(-1, 0).contiguous().movedim(0, -1)
    elif layout == "mixed":
        t = t.transpose(0, -2).contiguous().transpose(0, -2) if len(lead) >= 2 else t[:, None].expand(-1, 2, -1)[:, 0]
    assert pred.shape == t.shape == tuple(shape)
    if mask == "random":
        m = torch.rand(lead, generator=g) < 0.6
    elif mask == "none_kept":
        m = torch.zeros(lead, dtype=torch.bool)
    elif mask == "strided":
        m = (torch.rand(*lead, 3, generator=g) < 0.5)[..., 1]
    else:
        m = None
    return pred, t, m


LOSS_KINDS = [("smooth_l1", 1.0), ("smooth_l1", 0.0), ("smooth_l1", 0.05), ("smooth_l1", 2.0),
              ("smooth_l1", float("inf")), ("l2", 1.0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (5, 123), (3, 7, 33), (2, 1, 129), (1, 300), (2, 3, 4, 17), (70, 16)])
def test_latent_loss_matches_reference(dtype, shape):
    for mask in ("random", None, "none_kept"):
        pred, target, m = loss_inputs(shape, dtype, seed=sum(shape), mask=mask)
        for kind, beta in LOSS_KINDS:
            got = torch.ops.jepa_engine.latent_loss(pred, target, m, kind, beta)
            want = latent_loss_reference(pred, target, m, kind=kind, beta=beta)
            assert got.shape == () and got.dtype == torch.float32
            assert_close(got, want, torch.float32, what=f"latent_loss {kind} beta={beta} {shape} {dtype} mask={mask}")
            if mask == "none_kept":
                assert got.item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["rows", "features", "mixed"])
def test_latent_loss_strided_inputs(dtype, layout):
    for shape in ((6, 40), (4, 5, 37), (3, 2, 2, 18)):
        pred, target, m = loss_inputs(shape, dtype, seed=len(shape), mask="strided", layout=layout)
        assert not (pred.is_contiguous() and target.is_contiguous())
        for kind in ("smooth_l1", "l2"):
            got = torch.ops.jepa_engine.latent_loss(pred, target, m, kind, 0.5)
            want = latent_loss_reference(pred, target, m, kind=kind, beta=0.5)
            assert_close(got, want, torch.float32, what=f"strided {layout} {shape} {dtype} {kind}")


def test_latent_loss_special_values():
    pred, target, _ = loss_inputs((4, 20), torch.float32)
    pred[1, 3] = float("nan")                        # a NaN in a dropped token counts, as in the reference
    m = torch.tensor([True, False, True, True])
    got = torch.ops.jepa_engine.latent_loss(pred, target, m, "smooth_l1", 1.0)
    assert torch.isnan(got) and torch.isnan(latent_loss_reference(pred, target, m))
    pred[1, 3] = float("inf")
    for kind in ("smooth_l1", "l2"):
        got = torch.ops.jepa_engine.latent_loss(pred, target, None, kind, 1.0)
        assert got.item() == latent_loss_reference(pred, target, None, kind=kind).item() == float("inf")
    # fp16 subnormals and large values convert exactly
    h = torch.tensor([[6e-8, -3e-5, 6.5e4, 1.0, -2.0, 0.0, 5.96e-8, 1e-7, 3.0]], dtype=torch.float16)
    z = torch.zeros_like(h)
    for kind in ("smooth_l1", "l2"):
        assert_close(torch.ops.jepa_engine.latent_loss(h, z, None, kind, 1e-3),
                     latent_loss_reference(h, z, kind=kind, beta=1e-3), torch.float32, what=f"fp16 specials {kind}")


def test_latent_loss_deterministic_whatever_the_threads():
    """Many blocks of rows on 1 and 2 threads: the same bits (block sums are added in order)."""
    pred, target, m = loss_inputs((4096, 64), torch.float32, seed=3)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            outs.append(torch.ops.jepa_engine.latent_loss(pred, target, m, "smooth_l1", 1.0))
    finally:
        torch.set_num_threads(threads)
    assert outs[0].item() == outs[1].item() == outs[2].item()
    assert_close(outs[0], latent_loss_reference(pred, target, m), torch.float32, what="4096 x 64")


# --------------------------------------------------------------------------------------------------
# latent_cost
# --------------------------------------------------------------------------------------------------
def cost_inputs(B, H, D, G, dtype=torch.float32, seed=0, weights=False):
    g = _gen(seed)
    z = torch.randn(B, H, D, generator=g).to(dtype)
    goal = torch.randn(G, D, generator=g).to(dtype)
    w = (torch.rand(H, generator=g) - 0.3) if weights else None
    return z, goal, w


COST_KINDS = [("l2", "final", False), ("l1", "final", False), ("l2", "sum", False), ("l1", "sum", False),
              ("l2", "sum", True), ("l1", "sum", True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H,D,G", [(1, 1, 1, 1), (5, 3, 123, 5), (37, 5, 192, 1), (30, 2, 67, 3), (8, 7, 16, 2)])
def test_latent_cost_matches_reference(dtype, B, H, D, G):
    for metric, reduce, weights in COST_KINDS:
        z, goal, w = cost_inputs(B, H, D, G, dtype, seed=B + H + D, weights=weights)
        got = torch.ops.jepa_engine.latent_cost(z, goal, w, metric, reduce)
        want = latent_cost_reference(z, goal, metric=metric, reduce=reduce, weights=w)
        assert got.shape == (B,) and got.dtype == torch.float32
        assert_close(got, want, torch.float32, what=f"latent_cost {metric}/{reduce} w={weights} {B, H, D, G} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduce", ["final", "sum"])
def test_latent_cost_strided_inputs(dtype, reduce):
    g = _gen(5)
    z = torch.randn(9, 12, 45, generator=g).to(dtype)[:, ::2, 3:43]         # step and row strides, offset
    zt = torch.randn(40, 6, 9, generator=g).to(dtype).permute(2, 1, 0)      # feature stride 54
    goal = torch.randn(40, 6, generator=g).to(dtype).t()                      # [3, 40], feature stride 3
    w = torch.rand(12, generator=g)[::2] if reduce == "sum" else None         # weights of stride 2
    for zz in (z, zt):
        got = torch.ops.jepa_engine.latent_cost(zz, goal[:3], w, "l2", reduce)
        want = latent_cost_reference(zz, goal[:3], reduce=reduce, weights=w)
        assert_close(got, want, torch.float32, what=f"strided latent_cost {reduce} {dtype} {zz.stride()}")


def test_latent_cost_multithreaded_rows():
    z, goal, w = cost_inputs(2400, 5, 192, 8, weights=True, seed=11)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(torch.ops.jepa_engine.latent_cost(z, goal, w, "l1", "sum"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    assert_close(outs[0], latent_cost_reference(z, goal, metric="l1", reduce="sum", weights=w), torch.float32,
                 what="2400 x 5 x 192")


# --------------------------------------------------------------------------------------------------
# Gradients through the registered autograd formula, the C++ forward underneath
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_latent_loss_gradients_on_the_native_path(plain_cpu, dtype):
    for kind, beta, mask in (("smooth_l1", 1.0, "random"), ("smooth_l1", 0.0, None), ("l2", 1.0, "random"),
                             ("smooth_l1", 0.3, "none_kept")):
        pred, target, m = loss_inputs((3, 5, 24), dtype, seed=9, mask=mask)
        grads = []
        for fn in (lambda p, t: torch.ops.jepa_engine.latent_loss(p, t, m, kind, beta),
                   lambda p, t: latent_loss_reference(p, t, m, kind=kind, beta=beta)):
            p, t = pred.clone().requires_grad_(True), target.clone().requires_grad_(True)
            out = fn(p, t)
            out.backward(torch.tensor(1.7))
            grads.append((out.detach(), p.grad, t.grad))
        assert grads[0][1] is not None and grads[0][2] is not None
        for name, a, b in zip(("loss", "d_pred", "d_target"), *grads):
            assert_close(a, b, dtype if name != "loss" else torch.float32, what=f"{name} {kind} {dtype} mask={mask}")


@pytest.mark.parametrize("metric,reduce,weights", [("l2", "final", False), ("l1", "sum", True), ("l2", "sum", False)])
def test_latent_cost_gradients_on_the_native_path(plain_cpu, metric, reduce, weights):
    z, goal, w = cost_inputs(6, 3, 10, 2, seed=3, weights=weights)
    g_out = torch.randn(6, generator=_gen(1))
    grads = []
    for fn in (lambda a, b: torch.ops.jepa_engine.latent_cost(a, b, w, metric, reduce),
               lambda a, b: latent_cost_reference(a, b, metric=metric, reduce=reduce, weights=w)):
        zz, gg = z.clone().requires_grad_(True), goal.clone().requires_grad_(True)
        (fn(zz, gg) * g_out).sum().backward()
        grads.append((zz.grad, gg.grad))
    assert_close(grads[0][0], grads[1][0], torch.float32, what=f"grad z {metric}/{reduce}")
    assert_close(grads[0][1], grads[1][1], torch.float32, what=f"grad goal {metric}/{reduce}")


# --------------------------------------------------------------------------------------------------
# Bad input: the same exception, with the same message, from C++ as from the public Python function
# --------------------------------------------------------------------------------------------------
def _loss_bad():
    p, t = torch.randn(4, 8), torch.randn(4, 8)
    m = torch.ones(4, dtype=torch.bool)
    base = dict(kind="smooth_l1", beta=1.0)
    return [
        ((torch.randn(8), torch.randn(8), None), base, ValueError, r"pred must have at least 2 dims, got shape \[8\]"),
        ((p.long(), t.long(), None), base, TypeError,
         r"pred must have dtype in \(float32, float16, bfloat16\), got int64"),
        ((p.double(), t, None), base, TypeError,
         r"pred must have dtype in \(float32, float16, bfloat16\), got float64"),
        ((p[:0], t[:0], None), base, ValueError, r"pred must not be empty, got shape \[0, 8\]"),
        ((p, t[0], None), base, ValueError, r"target must have at least 2 dims, got shape \[8\]"),
        ((p, t.int(), None), base, TypeError, r"target must have dtype in \(float32, float16, bfloat16\), got int32"),
        ((p, t[:0], None), base, ValueError, r"target must not be empty, got shape \[0, 8\]"),
        ((p, torch.randn(4, 9), None), base, ValueError, r"target must be pred.shape = \[4, 8\], got \[4, 9\]"),
        ((p, torch.randn(2, 2, 8), None), base, ValueError, r"target must be pred.shape = \[4, 8\], got \[2, 2, 8\]"),
        ((p, t.half(), None), base, TypeError, r"target must have the dtype of pred \(float32\), got float16"),
        ((p, t, torch.ones(4)), base, TypeError, r"mask must have dtype in \(bool\), got float32"),
        ((p, t, m[:0]), base, ValueError, r"mask must not be empty, got shape \[0\]"),
        ((p, t, torch.ones(5, dtype=torch.bool)), base, ValueError,
         r"mask must be pred.shape\[:-1\] = \[4\], got \[5\]"),
        ((p, t, torch.ones(4, 8, dtype=torch.bool)), base, ValueError,
         r"mask must be pred.shape\[:-1\] = \[4\], got \[4, 8\]"),
        ((p, t, m), {**base, "kind": "huber"}, ValueError, r"kind must be one of \('smooth_l1', 'l2'\), got 'huber'"),
        ((p, t, m), {**base, "kind": "it's"}, ValueError, r"kind must be one of \('smooth_l1', 'l2'\), got \"it's\""),
        ((p, t, m), {**base, "kind": "a\\b\n'\""}, ValueError, r"kind must be one of .*, got 'a\\\\b\\n\\'\"'"),
        ((p, t, m), {**base, "kind": ""}, ValueError, r"kind must be one of .*, got ''"),
        ((p, t, m), {**base, "beta": -1.0}, ValueError, r"beta must be >= 0, got -1.0"),
        ((p, t, m), {**base, "beta": -0.0001}, ValueError, r"beta must be >= 0, got -0.0001"),
        ((p, t, m), {**base, "beta": -2.5e-07}, ValueError, r"beta must be >= 0, got -2.5e-07"),
        ((p, t, m), {**base, "beta": float("nan")}, ValueError, r"beta must be >= 0, got nan"),
        ((p, t, m), {**base, "beta": float("-inf")}, ValueError, r"beta must be >= 0, got -inf"),
        # several faults: the first check's error, in the public function's order
        ((p, torch.randn(4, 9).half(), m[:1]), {"kind": "x", "beta": -1.0}, ValueError,
         r"target must be pred.shape = \[4, 8\], got \[4, 9\]"),
        ((p, t, m[:1]), {"kind": "x", "beta": -1.0}, ValueError, r"mask must be pred.shape\[:-1\] = \[4\], got \[1\]"),
        ((p, t, m), {"kind": "x", "beta": -1.0}, ValueError, r"kind must be one of .*, got 'x'"),
    ]


def _cost_bad():
    z, goal = torch.zeros(4, 2, 8), torch.zeros(1, 8)
    base = dict(metric="l2", reduce="final", weights=None)
    return [
        ((torch.zeros(4, 8), goal), base, ValueError, r"z must be 3-D, got 2-D with shape \[4, 8\]"),
        ((z.int(), goal.int()), base, TypeError, r"z must have dtype in \(float32, float16, bfloat16\), got int32"),
        ((z[:0], goal), base, ValueError, r"z must not be empty, got shape \[0, 2, 8\]"),
        ((z, torch.zeros(8)), base, ValueError, r"goal must be 2-D, got 1-D with shape \[8\]"),
        ((z, goal.bool()), base, TypeError, r"goal must have dtype in \(float32, float16, bfloat16\), got bool"),
        ((z, goal[:0]), base, ValueError, r"goal must not be empty, got shape \[0, 8\]"),
        ((z, goal.bfloat16()), base, TypeError, r"goal must have the dtype of z \(float32\), got bfloat16"),
        ((z, torch.zeros(2, 7)), base, ValueError,
         r"goal must be \[G, D\] with D = 8 \(z's embedding dim\), got \[2, 7\]"),
        ((z, torch.zeros(3, 8)), base, ValueError,
         r"goal rows G = 3 must divide the batch B = 4 \(z is \[4, 2, 8\]\)"),
        ((z, goal), {**base, "metric": "cos"}, ValueError, r"metric must be one of \('l2', 'l1'\), got 'cos'"),
        ((z, goal), {**base, "reduce": "mean"}, ValueError, r"reduce must be one of \('final', 'sum'\), got 'mean'"),
        ((z, goal), {**base, "weights": torch.ones(2)}, ValueError,
         r"weights apply to reduce='sum' only, got reduce='final'"),
        ((z, goal), {**base, "reduce": "sum", "weights": torch.ones(2).double()}, TypeError,
         r"weights must have dtype in \(float32\), got float64"),
        ((z, goal), {**base, "reduce": "sum", "weights": torch.ones(2, 1)}, ValueError,
         r"weights must be 1-D, got 2-D with shape \[2, 1\]"),
        ((z, goal), {**base, "reduce": "sum", "weights": torch.ones(0)}, ValueError,
         r"weights must not be empty, got shape \[0\]"),
        ((z, goal), {**base, "reduce": "sum", "weights": torch.ones(3)}, ValueError,
         r"weights must be \[H\] = \[2\], got \[3\]"),
        ((z, torch.zeros(3, 7)), {"metric": "x", "reduce": "y", "weights": torch.ones(3)}, ValueError,
         r"goal must be \[G, D\] with D = 8 \(z's embedding dim\), got \[3, 7\]"),
        ((z, goal), {"metric": "l1", "reduce": "y", "weights": torch.ones(3)}, ValueError,
         r"reduce must be one of \('final', 'sum'\), got 'y'"),
    ]


@pytest.mark.parametrize("case", range(len(_loss_bad())))
def test_latent_loss_errors_match_python(case, plain_cpu):
    args, kw, exc, match = _loss_bad()[case]
    with use_backend("reference"), pytest.raises(exc, match="^latent_loss: " + match) as py:
        latent_loss(*args, **kw)
    with pytest.raises(exc, match="^latent_loss: " + match + "$") as cpp:
        torch.ops.jepa_engine.latent_loss(*args, kw["kind"], kw["beta"])
    with pytest.raises(exc) as public:   # the public op on the native path
        latent_loss(*args, **kw)
    assert str(cpp.value) == str(py.value) == str(public.value)


@pytest.mark.parametrize("case", range(len(_cost_bad())))
def test_latent_cost_errors_match_python(case, plain_cpu):
    args, kw, exc, match = _cost_bad()[case]
    with use_backend("reference"), pytest.raises(exc, match="^latent_cost: " + match) as py:
        latent_cost(*args, **kw)
    with pytest.raises(exc, match="^latent_cost: " + match + "$") as cpp:
        torch.ops.jepa_engine.latent_cost(*args, kw["weights"], kw["metric"], kw["reduce"])
    with pytest.raises(exc) as public:
        latent_cost(*args, **kw)
    assert str(cpp.value) == str(py.value) == str(public.value)


def test_python_only_argument_forms_keep_their_messages(plain_cpu):
    """Arguments the schema cannot carry as given take the Python checks first: the messages stay Python's."""
    p, t = torch.randn(2, 4), torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"^latent_loss: beta must be >= 0, got -1$"):
        latent_loss(p, t, beta=-1)                        # an int beta prints as an int
    with pytest.raises(TypeError, match=r"^latent_loss: pred must be a torch.Tensor, got list$"):
        latent_loss([1.0], t)
    with pytest.raises(ValueError, match=r"^latent_loss: kind must be one of .*, got None$"):
        latent_loss(p, t, kind=None)
    assert_close(latent_loss(p, t, beta=2), latent_loss_reference(p, t, beta=2.0), torch.float32, what="int beta")


# --------------------------------------------------------------------------------------------------
# Schemas and fake kernels
# --------------------------------------------------------------------------------------------------
def test_schemas_are_native_and_fake_kernels_give_the_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert str(torch.ops.jepa_engine.latent_loss.default._schema) == (
        "jepa_engine::latent_loss(Tensor pred, Tensor target, Tensor? mask, str kind, float beta) -> Tensor")
    assert str(torch.ops.jepa_engine.latent_cost.default._schema) == (
        "jepa_engine::latent_cost(Tensor z, Tensor goal, Tensor? weights, str metric, str reduce) -> Tensor")
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"jepa_engine::{op}", "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"jepa_engine::{op}", "CUDA")
    with FakeTensorMode():
        for dtype in DTYPES:
            loss = torch.ops.jepa_engine.latent_loss(torch.empty(3, 5, 16, dtype=dtype),
                                                     torch.empty(3, 5, 16, dtype=dtype),
                                                     torch.empty(3, 5, dtype=torch.bool), "l2", 1.0)
            cost = torch.ops.jepa_engine.latent_cost(torch.empty(12, 4, 16, dtype=dtype),
                                                     torch.empty(3, 16, dtype=dtype), torch.empty(4), "l1", "sum")
            assert loss.shape == () and loss.dtype == torch.float32
            assert cost.shape == (12,) and cost.dtype == torch.float32
    meta = torch.ops.jepa_engine.latent_cost(torch.empty(7, 2, 5, device="meta"), torch.empty(7, 5, device="meta"),
                                             None, "l2", "final")
    assert meta.shape == (7,) and meta.device.type == "meta"


# --------------------------------------------------------------------------------------------------
# The public ops take the C++ kernel on plain CPU (no gradient needed), the reference otherwise
# --------------------------------------------------------------------------------------------------
def _fail(*args, **kwargs):
    raise AssertionError("the Python reference ran instead of the C++ kernel")


def test_public_ops_take_the_native_path(plain_cpu, monkeypatch):
    pred, target, m = loss_inputs((3, 6, 32), torch.bfloat16, seed=4)
    z, goal, w = cost_inputs(12, 4, 20, 3, weights=True)
    want_loss = latent_loss_reference(pred, target, m, kind="l2")
    want_cost = latent_cost_reference(z, goal, metric="l1", reduce="sum", weights=w)
    with monkeypatch.context() as mp:   # (the plain_cpu setting outlives the block)
        mp.setattr(sys.modules["jepa_engine.kernels.latent_loss"], "latent_loss_reference", _fail)
        mp.setattr(sys.modules["jepa_engine.kernels.latent_cost"], "latent_cost_reference", _fail)
        assert_close(latent_loss(pred, target, m, kind="l2"), want_loss, torch.float32, what="public latent_loss")
        assert_close(latent_loss(pred, target, m, kind="l2", beta=3), want_loss, torch.float32, what="int beta")
        assert_close(latent_cost(z, goal, metric="l1", reduce="sum", weights=w), want_cost, torch.float32,
                     what="public latent_cost")
        # inputs that require grad, in no_grad: no gradient is needed, the C++ kernel runs
        with torch.no_grad():
            out = latent_cost(z.clone().requires_grad_(True), goal, metric="l1", reduce="sum", weights=w)
        assert out.grad_fn is None
        assert_close(out, want_cost, torch.float32, what="public latent_cost under no_grad")
        # a gradient needed: the reference ops under autograd (measured faster than the C++ forward plus the
        # written-out backward); use_backend("reference") gives the specification
        with pytest.raises(AssertionError, match="the Python reference ran"):
            latent_loss(pred.clone().requires_grad_(True), target, m)
        with pytest.raises(AssertionError, match="the Python reference ran"):
            latent_cost(z, goal, reduce="sum", weights=w.clone().requires_grad_(True))
        with pytest.raises(AssertionError, match="the Python reference ran"), use_backend("reference"):
            latent_loss(pred, target, m)
    p = pred.clone().requires_grad_(True)
    latent_loss(p, target, m).backward()
    p2 = pred.clone().requires_grad_(True)
    latent_loss_reference(p2, target, m).backward()
    assert torch.equal(p.grad, p2.grad)


def test_public_ops_under_compile_keep_the_reference(plain_cpu):
    pred, target, m = loss_inputs((4, 6, 32), torch.float32)
    z, goal, _ = cost_inputs(6, 3, 8, 2)
    fn = torch.compile(lambda p, t, mm, zz, gg: (latent_loss(p, t, mm), latent_cost(zz, gg)), fullgraph=True,
                       backend="eager")
    loss, cost = fn(pred, target, m, z, goal)
    assert_close(loss, latent_loss_reference(pred, target, m), torch.float32, what="compiled latent_loss")
    assert_close(cost, latent_cost_reference(z, goal), torch.float32, what="compiled latent_cost")
