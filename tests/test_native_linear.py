"""The native C++ CPU kernels of fused_linear and linear_goal_cost (csrc/linear.cpp): against the Python
references, their argument errors against the public functions', the fake kernels, and the public
functions' choice of the C++ kernel on plain CPU tensors.

Without the library (or with a library that lacks these ops) the tests skip where no compiler could
have built it (cmake or g++ missing) and fail where one could: a build that broke must not pass unnoticed.
"""
from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

from jepa_engine.kernels import _native, fused_linear, linear_goal_cost, use_backend
from jepa_engine.kernels.fused_linear import fused_linear_reference, linear_goal_cost_reference
from tests.helpers import DTYPES, assert_close

OPS = ("fused_linear", "linear_goal_cost")


@pytest.fixture(scope="module", autouse=True)
def native():
    missing = [op for op in OPS if op not in _native.native_ops()]
    if missing:
        why = f"the native library lacks {missing}: {_native.status()}"
        if shutil.which("cmake") and shutil.which(os.environ.get("CXX", "g++")):
            pytest.fail(f"cmake and a C++ compiler are here but {why}")
        pytest.skip(f"no compiler to build the native library; {why}")


def make(M, K, N, dtype=torch.float32, seed=0, G=None):
    """x (shifted mean: layer norm matters), weight, bias, residual, goal; drawn in fp32, then cast."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=g) * 2 + 3).to(dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    r = torch.randn(M, N, generator=g).to(dtype)
    goal = torch.randn(G, N, generator=g).to(dtype) if G else None
    return x, w, b, r, goal


def cpp_linear(x, w, b=None, *, normalize=False, eps=1e-6, activation=None, residual=None):
    return torch.ops.jepa_engine.fused_linear(x, w, b, normalize, eps, activation == "gelu", residual)


def cpp_cost(x, w, b, goal, *, normalize=True, eps=1e-6, metric="l2"):
    return torch.ops.jepa_engine.linear_goal_cost(x, w, b, goal, normalize, eps, metric)


# --------------------------------------------------------------------------------------------------
# The C++ kernels against the references
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize,gelu,res,bias", [(True, True, True, True), (False, False, False, False),
                                                     (True, False, True, False), (False, True, False, True),
                                                     (True, False, False, True)])
@pytest.mark.parametrize("M,K,N", [(37, 40, 48), (1, 3, 5), (300, 64, 96)])   # K: lane tails, tiny, exact
def test_fused_linear_matches_reference(dtype, normalize, gelu, res, bias, M, K, N):
    x, w, b, r, _ = make(M, K, N, dtype, seed=M + K)
    kw = dict(normalize=normalize, eps=1e-5, activation="gelu" if gelu else None, residual=r if res else None)
    saved = [t.clone() for t in (x, w, b, r)]
    got = cpp_linear(x, w, b if bias else None, **kw)
    want = fused_linear_reference(x, w, b if bias else None, **kw)
    assert got.dtype == dtype and got.shape == (M, N) and got.is_contiguous()
    assert_close(got, want, dtype, what=f"y {dtype} {M, K, N} ln={normalize} gelu={gelu} res={res} bias={bias}",
                 scale=4)
    assert all(torch.equal(a, s) for a, s in zip((x, w, b, r), saved)), "an input was modified"


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_linear_strided_inputs(dtype):
    x, w, b, _, _ = make(40, 70, 24, dtype, seed=3)
    r = torch.randn(24, 20, generator=torch.Generator().manual_seed(4)).to(dtype).T   # column stride 20
    for xs, ws in [(x[::2, 3:3 + 33], w[:, 3:3 + 33]),       # row stride 140, an offset start
                   (x[:20, :33].T.contiguous().T, w[:, :33])]:  # column-major x (column stride 20)
        for normalize in (True, False):
            kw = dict(normalize=normalize, activation="gelu", residual=r)
            assert_close(cpp_linear(xs, ws, b, **kw), fused_linear_reference(xs, ws, b, **kw), dtype,
                         what=f"strided x {xs.stride()} ln={normalize}", scale=4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G,metric", [(1, "l2"), (3, "l1"), (3, "l2"), (33, "l2")])
@pytest.mark.parametrize("normalize,bias", [(True, True), (False, False)])
def test_goal_cost_matches_reference(dtype, G, metric, normalize, bias):
    M, K, D = 33, 24, 40      # D: two 16-lane blocks and a tail of 8
    x, w, b, _, goal = make(M, K, D, dtype, seed=G, G=G)
    kw = dict(normalize=normalize, metric=metric)
    z, cost = cpp_cost(x, w, b if bias else None, goal, **kw)
    want_z, want_cost = linear_goal_cost_reference(x, w, b if bias else None, goal, **kw)
    assert z.dtype == dtype and z.shape == (M, D) and cost.dtype == torch.float32 and cost.shape == (M,)
    assert_close(z, want_z, dtype, what=f"z {dtype}", scale=4)
    # the cost of z as returned, in fp32: against the reference's cost of the kernel's own z
    _, cost_of_z = linear_goal_cost_reference(z.float(), torch.eye(D), None, goal.float(), normalize=False,
                                              metric=metric)
    assert_close(cost, cost_of_z, torch.float32, what=f"cost of z {dtype} G={G} {metric}", scale=4)
    assert_close(cost, want_cost, dtype, what=f"cost {dtype} G={G} {metric}", scale=4)


def test_goal_cost_strided_and_wide():
    x, w, b, _, goal = make(16, 50, 300, G=4)   # D = 300: no width limit on the CPU
    goal_t = goal.T.contiguous().T              # a column-major goal
    for xs in (x[:, 5:45], x[::1, :40]):
        z, cost = cpp_cost(xs, w[:, :40], b, goal_t, metric="l1")
        want_z, want_cost = linear_goal_cost_reference(xs, w[:, :40], b, goal, metric="l1")
        assert_close(z, want_z, torch.float32, what="z", scale=4)
        assert_close(cost, want_cost, torch.float32, what="cost", scale=4)


def test_results_do_not_depend_on_the_thread_count():
    """Rows are split between threads (M * K and M * D past the 32768-element grain); each row's sums
    run in one fixed order, so the layer norm and the cost are the same bits on 1 and 2 threads. An
    identity weight makes the GEMM exact, so the comparison sees this file's own arithmetic only."""
    x, _, _, _, goal = make(3000, 40, 40, G=6)
    eye = torch.eye(40)
    before = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out.append((cpp_linear(x, eye, normalize=True), *cpp_cost(x, eye, None, goal, normalize=False)))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, c) for a, c in zip(*out))
    assert torch.equal(out[0][1], x), "the identity GEMM is exact"


# --------------------------------------------------------------------------------------------------
# Bad input: the same exception, with the same message, from C++ as from the public functions
# --------------------------------------------------------------------------------------------------
def _linear_bad():
    x, w, b, r = torch.zeros(4, 8), torch.zeros(6, 8), torch.zeros(6), torch.zeros(4, 6)
    grad = dict(requires_grad=True)
    return [
        (dict(x=torch.zeros(4, 8, 1)), ValueError, r"x must be 2-D, got 3-D with shape \[4, 8, 1\]"),
        (dict(x=torch.zeros(4, 8, dtype=torch.int32)), TypeError,
         r"x must have dtype in \(float32, float16, bfloat16\), got int32"),
        (dict(x=torch.zeros(0, 8)), ValueError, r"x must not be empty, got shape \[0, 8\]"),
        (dict(weight=torch.zeros(8)), ValueError, r"weight must be 2-D, got 1-D with shape \[8\]"),
        (dict(weight=w.double()), TypeError, r"weight must have dtype in \(float32, float16, bfloat16\), got float64"),
        (dict(weight=w.half()), TypeError, r"weight must have the dtype of x \(float32\), got float16"),
        (dict(weight=torch.zeros(6, 7)), ValueError,
         r"weight must be \[N, K\] with K = 8 \(x's last dim\), got \[6, 7\]"),
        (dict(weight=torch.zeros(0, 8)), ValueError, r"weight must not be empty, got shape \[0, 8\]"),
        (dict(bias=torch.zeros(1, 6)), ValueError, r"bias must be 1-D, got 2-D with shape \[1, 6\]"),
        (dict(bias=b.bfloat16()), TypeError, r"bias must have the dtype of x \(float32\), got bfloat16"),
        (dict(bias=torch.zeros(5)), ValueError, r"bias must be \[N\] = \[6\], got \[5\]"),
        (dict(eps=0.0), ValueError, r"eps must be a positive float, got 0.0"),
        (dict(eps=-0.0), ValueError, r"eps must be a positive float, got -0.0"),
        (dict(eps=-1e-06), ValueError, r"eps must be a positive float, got -1e-06"),
        (dict(eps=float("nan")), ValueError, r"eps must be a positive float, got nan"),
        (dict(eps=-1e20), ValueError, r"eps must be a positive float, got -1e\+20"),
        (dict(x=x.clone().requires_grad_()), ValueError,
         r"inference-only op \(no backward\), but x requires grad while grad mode is on; call it under "
         r"torch.no_grad\(\) / torch.inference_mode\(\) or pass x.detach\(\)"),
        (dict(weight=torch.zeros(6, 8, **grad)), ValueError, r"inference-only op .*, but weight requires grad.*"),
        (dict(bias=torch.zeros(6, **grad)), ValueError, r"inference-only op .*, but bias requires grad.*"),
        (dict(residual=torch.zeros(4, 6, **grad)), ValueError, r"inference-only op .*, but residual requires grad.*"),
        (dict(residual=torch.zeros(4, 6, 1)), ValueError, r"residual must be 2-D, got 3-D with shape \[4, 6, 1\]"),
        (dict(residual=r.half()), TypeError, r"residual must have the dtype of x \(float32\), got float16"),
        (dict(residual=torch.zeros(4, 5)), ValueError, r"residual must be \[M, N\] = \[4, 6\], got \[4, 5\]"),
        # the first failing check wins: bias before residual, the grad check before residual's shape
        (dict(bias=torch.zeros(5), residual=torch.zeros(4, 5)), ValueError, r"bias must be \[N\] = \[6\], got \[5\]"),
        (dict(x=x.clone().requires_grad_(), residual=torch.zeros(4, 5)), ValueError,
         r"inference-only op .*x requires grad.*"),
        (dict(eps=0.0, weight=torch.zeros(6, 7)), ValueError, r"weight must be \[N, K\] with K = 8 .*"),
    ]


def _cost_bad():
    grad = dict(requires_grad=True)
    return [
        (dict(goal=torch.zeros(6)), ValueError, r"goal must be 2-D, got 1-D with shape \[6\]"),
        (dict(goal=torch.zeros(2, 6, dtype=torch.int64)), TypeError,
         r"goal must have dtype in \(float32, float16, bfloat16\), got int64"),
        (dict(goal=torch.zeros(2, 6, dtype=torch.float16)), TypeError,
         r"goal must have the dtype of x \(float32\), got float16"),
        (dict(goal=torch.zeros(0, 6)), ValueError, r"goal must not be empty, got shape \[0, 6\]"),
        (dict(goal=torch.zeros(2, 5)), ValueError, r"goal must be \[G, D\] with D = 6 \(weight's rows\), got \[2, 5\]"),
        (dict(goal=torch.zeros(3, 6)), ValueError,
         r"goal rows G = 3 must divide the rows M = 4 of x \(x is \[4, 8\]\)"),
        (dict(metric="cos"), ValueError, r"metric must be one of \('l2', 'l1'\), got 'cos'"),
        (dict(metric="it's"), ValueError, r"metric must be one of \('l2', 'l1'\), got \"it's\""),
        (dict(goal=torch.zeros(2, 6, **grad)), ValueError, r"inference-only op .*, but goal requires grad.*"),
        (dict(weight=torch.zeros(6, 8, **grad), goal=torch.zeros(3, 6)), ValueError,
         r"inference-only op .*weight requires grad.*"),
        (dict(x=torch.zeros(4, 8, dtype=torch.float16)), TypeError,
         r"weight must have the dtype of x \(float16\), got float32"),
        (dict(bias=torch.zeros(7), metric="cos"), ValueError, r"bias must be \[N\] = \[6\], got \[7\]"),
        (dict(eps=-2.5, goal=torch.zeros(3, 6)), ValueError, r"eps must be a positive float, got -2.5"),
    ]


def _linear_args(kw):
    args = dict(x=torch.zeros(4, 8), weight=torch.zeros(6, 8), bias=None, residual=None, eps=1e-6)
    args.update(kw)
    return args


def _cost_args(kw):
    args = dict(x=torch.zeros(4, 8), weight=torch.zeros(6, 8), bias=torch.zeros(6), goal=torch.zeros(2, 6),
                eps=1e-6, metric="l2")
    args.update(kw)
    return args


def _raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match) as info:
        fn(*args, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("case", range(len(_linear_bad())))
def test_fused_linear_errors_match_python(case, plain_cpu):
    kw, exc, match = _linear_bad()[case]
    a = _linear_args(kw)
    with use_backend("reference"):
        py = _raises(exc, "^fused_linear: " + match, fused_linear, a["x"], a["weight"], a["bias"], eps=a["eps"],
                     normalize=True, residual=a["residual"])
    cpp = _raises(exc, "^fused_linear: " + match + "$", torch.ops.jepa_engine.fused_linear,
                  a["x"], a["weight"], a["bias"], True, a["eps"], False, a["residual"])
    public = _raises(exc, None, fused_linear, a["x"], a["weight"], a["bias"], eps=a["eps"], normalize=True,
                     residual=a["residual"])   # the public function on the native path
    assert cpp == py == public


@pytest.mark.parametrize("case", range(len(_cost_bad())))
def test_goal_cost_errors_match_python(case, plain_cpu):
    kw, exc, match = _cost_bad()[case]
    a = _cost_args(kw)
    with use_backend("reference"):
        py = _raises(exc, "^linear_goal_cost: " + match, linear_goal_cost, a["x"], a["weight"], a["bias"],
                     a["goal"], eps=a["eps"], metric=a["metric"])
    cpp = _raises(exc, "^linear_goal_cost: " + match + "$", torch.ops.jepa_engine.linear_goal_cost,
                  a["x"], a["weight"], a["bias"], a["goal"], True, a["eps"], a["metric"])
    public = _raises(exc, None, linear_goal_cost, a["x"], a["weight"], a["bias"], a["goal"], eps=a["eps"],
                     metric=a["metric"])
    assert cpp == py == public


@pytest.mark.parametrize("name", ["weight", "bias", "residual", "goal"])
def test_device_errors_match_python(name, plain_cpu):
    """A tensor on another device than x: with CPU x and a meta tensor the dispatcher picks the meta
    (fake) kernel, so the C++ CPU kernel is called by redispatching to the CPU key."""
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    if name == "goal":
        a = _cost_args({name: torch.zeros(2, 6, device="meta")})
        args = (a["x"], a["weight"], a["bias"], a["goal"], True, 1e-6, "l2")
        op, public, name_op = torch.ops.jepa_engine.linear_goal_cost.default, linear_goal_cost, "linear_goal_cost"
    else:
        shape = {"weight": (6, 8), "bias": (6,), "residual": (4, 6)}[name]
        a = _linear_args({name: torch.zeros(*shape, device="meta")})
        args = (a["x"], a["weight"], a["bias"], True, 1e-6, False, a["residual"])
        op, public, name_op = torch.ops.jepa_engine.fused_linear.default, fused_linear, "fused_linear"
    match = f"^{name_op}: {name} must be on cpu like the other inputs, got meta$"
    cpp = _raises(ValueError, match, op.redispatch, cpu, *args)
    if name == "goal":
        py = _raises(ValueError, match, public, a["x"], a["weight"], a["bias"], a["goal"])
    else:
        py = _raises(ValueError, match, public, a["x"], a["weight"], a["bias"], normalize=True,
                     residual=a["residual"])
    assert cpp == py


def test_python_only_checks_stay_in_python(plain_cpu):
    """What the schema cannot carry (activation's name, a non-float eps) is checked by the public
    function, with its usual message."""
    x, w = torch.zeros(4, 8), torch.zeros(6, 8)
    with pytest.raises(ValueError, match=r"^fused_linear: activation must be one of \(None, 'gelu'\), got 'relu'$"):
        fused_linear(x, w, activation="relu")
    with pytest.raises(ValueError, match=r"^fused_linear: x must be 2-D"):   # x's check comes first
        fused_linear(x[0], w, activation="relu")
    with pytest.raises(ValueError, match=r"^fused_linear: eps must be a positive float, got 0$"):
        fused_linear(x, w, eps=0)
    with pytest.raises(ValueError, match=r"^linear_goal_cost: metric must be one of \('l2', 'l1'\), got None$"):
        linear_goal_cost(x, w, None, torch.zeros(1, 6), metric=None)


# --------------------------------------------------------------------------------------------------
# Fake kernels; the public functions' path
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_kernels_give_the_shapes(dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w, b, r = (torch.empty(70, 48, dtype=dtype), torch.empty(80, 48, dtype=dtype), torch.empty(80, dtype=dtype),
                      torch.empty(70, 80, dtype=dtype))
        y = torch.ops.jepa_engine.fused_linear(x, w, b, True, 1e-6, True, r)
        z, cost = torch.ops.jepa_engine.linear_goal_cost(y, torch.empty(40, 80, dtype=dtype), None,
                                                         torch.empty(7, 40, dtype=dtype), True, 1e-6, "l1")
    assert (y.shape, y.dtype) == ((70, 80), dtype)
    assert (z.shape, z.dtype, cost.shape, cost.dtype) == ((70, 40), dtype, (70,), torch.float32)


def test_public_ops_take_the_native_path(plain_cpu, monkeypatch):
    x, w, b, r, goal = make(30, 24, 16, G=3)
    w2 = make(16, 16, 12, seed=1)[1]
    goal = goal[:, :12]
    kw = dict(normalize=True, activation="gelu", residual=r)
    want_y = fused_linear_reference(x, w, b, **kw)
    want_z, want_cost = linear_goal_cost_reference(want_y, w2, None, goal, metric="l1")

    def fail(*a, **k):
        raise AssertionError("the Python reference ran instead of the C++ kernel")
    module = sys.modules["jepa_engine.kernels.fused_linear"]
    monkeypatch.setattr(module, "fused_linear_reference", fail)
    monkeypatch.setattr(module, "linear_goal_cost_reference", fail)
    w.requires_grad_(True)          # allowed outside grad mode; the result does not require grad
    with torch.no_grad():
        y = fused_linear(x, w, b, **kw)
    assert not y.requires_grad
    with torch.inference_mode():
        z, cost = linear_goal_cost(y, w2, None, goal, metric="l1")
    assert_close(y, want_y, torch.float32, what="public y", scale=4)
    assert_close(z, want_z, torch.float32, what="public z", scale=4)
    assert_close(cost, want_cost, torch.float32, what="public cost", scale=4)
    # use_backend("reference") still gives the specification (tests and benchmarks compare against it)
    monkeypatch.undo()
    w.requires_grad_(False)
    with use_backend("reference"):
        assert torch.equal(fused_linear(x, w, b, **kw), want_y)
