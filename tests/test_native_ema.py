"""jepa_engine::ema_update_'s C++ CPU kernel (csrc/ema.cpp) against the Python specification
(kernels/ema.py: ema_update_reference and the torch._foreach_lerp_ path): the updated targets bit for
bit, the distance within fp32 rounding; its argument errors against the Python ones; its fake kernel;
and the public ema_update_ taking it on plain CPU.

Without the library the tests skip where no compiler could have built it (cmake or g++ missing) and fail
where one could: a build that broke must not pass unnoticed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jepa_engine.kernels import _native, ema_update_, ema_update_reference, use_backend
from jepa_engine.kernels import ema as ema_mod

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
FLOATS = (F32, BF16, F16)
OP = torch.ops.jepa_engine.ema_update_ if hasattr(torch.ops.jepa_engine, "ema_update_") else None


@pytest.fixture(scope="module", autouse=True)
def native():
    if "ema_update_" not in _native.native_ops():
        if shutil.which("cmake") and shutil.which(os.environ.get("CXX", "g++")):
            pytest.fail(f"cmake and a C++ compiler are here but the native library does not define ema_update_: "
                        f"{_native.status()}")
        pytest.skip(f"no compiler to build the native library: {_native.status()}")


def _dense_pair(shape, perm, g, td, od):
    """A target and an online of the same dense, non-contiguous layout (a permuted contiguous tensor)."""
    base = [shape[p] for p in perm]
    inv = [perm.index(i) for i in range(len(perm))]
    t = torch.randn(base, generator=g).to(td).permute(inv)
    o = torch.randn(base, generator=g).to(od).permute(inv)
    assert not t.is_contiguous() and t.stride() == o.stride()
    return t, o


def _lists(td, od, seed=0):
    """Odd sizes around the 8-lane groups and the 16384-element segments, empty tensors, a scalar, dense
    non-contiguous layouts, and a tensor spanning several segments (so both threads take part)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(1,), (7,), (9,), (0,), (), (3, 0, 2), (33, 65), (40001,), (15,)]
    targets = [torch.randn(s, generator=g).to(td) for s in shapes]
    onlines = [torch.randn(s, generator=g).to(od) for s in shapes]
    for shape, perm in (((5, 7), [1, 0]), ((3, 4, 5), [2, 0, 1])):
        t, o = _dense_pair(shape, perm, g, td, od)
        targets.append(t)
        onlines.append(o)
    return targets, onlines


def _bits(x):
    return x.contiguous().view(torch.int32 if x.element_size() == 4 else torch.int16)


def _assert_same_bits(got, want, what):
    for i, (a, e) in enumerate(zip(got, want)):
        assert a.shape == e.shape and a.stride() == e.stride(), f"{what} tensor {i}: layout changed"
        if torch.equal(_bits(a), _bits(e)):
            continue
        bad = (~((_bits(a) == _bits(e)) | (a.isnan() & e.isnan()))).sum().item()   # NaN payloads may differ
        assert bad == 0, f"{what} tensor {i}: {bad} of {a.numel()} elements differ from the reference"


def _op(targets, onlines, momentum, tb=(), ob=(), distance=False):
    return OP(targets, onlines, momentum, list(tb), list(ob), distance)


# --------------------------------------------------------------------------------------------------
# The C++ kernel against the reference and the foreach path, bit for bit
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("td", FLOATS)
@pytest.mark.parametrize("od", FLOATS)
@pytest.mark.parametrize("m", [0.996, 0.3, 0.0, 1.0])  # 0.3: w = 0.7 takes lerp's other side
def test_bit_identical_to_reference_and_foreach(td, od, m):
    targets, onlines = _lists(td, od)
    ref, fe = [t.clone() for t in targets], [t.clone() for t in targets]
    d_ref = ema_update_reference(ref, onlines, m, return_distance=True)
    ema_mod._ema_foreach(fe, onlines, m, (), (), False)
    d = _op(targets, onlines, torch.tensor(m), distance=True)
    _assert_same_bits(targets, ref, f"{td}<-{od} m={m} vs reference")
    _assert_same_bits(targets, fe, f"{td}<-{od} m={m} vs foreach")
    assert d.dtype == F32 and d.shape == ()
    torch.testing.assert_close(d, d_ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("momentum", [torch.tensor(0.99), torch.tensor([0.75], dtype=torch.float64),
                                      torch.tensor([[0.5]], dtype=BF16), torch.tensor(0.125, dtype=F16)])
def test_tensor_momentum_reads_as_the_float(momentum):
    targets, onlines = _lists(F32, BF16, seed=1)
    ref = [t.clone() for t in targets]
    ema_update_reference(ref, onlines, float(momentum))
    _op(targets, onlines, momentum)
    _assert_same_bits(targets, ref, f"momentum {momentum.dtype}")


def test_exact_ends_on_special_values():
    """m = 1 leaves every bit (-0.0, NaN payloads) alone; m = 0 copies the online bits when the dtypes
    agree and rounds once (nearest even) when they do not; inf and NaN go through the lerp as torch's."""
    vals = [-0.0, 0.0, 1.5, -2.25, float("inf"), float("-inf"), float("nan"), 3e-8, 1e-40, 65519.0, 3.4e38]
    for dtype in FLOATS:
        t = torch.tensor(vals * 37, dtype=F32).to(dtype)
        o = torch.tensor(vals[::-1] * 37, dtype=F32).to(dtype)
        t_before = t.clone()
        _op([t], [o], torch.tensor(1.0))
        assert torch.equal(_bits(t), _bits(t_before)), f"{dtype}: momentum 1 must leave the target unchanged"
        _op([t], [o], torch.tensor(0.0))
        assert torch.equal(_bits(t), _bits(o)), f"{dtype}: momentum 0 must copy the online bits"
        for od in FLOATS:
            o2 = torch.tensor(vals[::-1] * 37, dtype=F32).to(od) * 1.01
            for m in (0.0, 0.9, 0.2):
                t2, ref = t_before.clone(), [t_before.clone()]
                ema_update_reference(ref, [o2], m)
                _op([t2], [o2], torch.tensor(m))
                _assert_same_bits([t2], ref, f"special {dtype}<-{od} m={m}")


def test_distance_does_not_depend_on_the_thread_count():
    targets, onlines = _lists(F32, F32, seed=2)
    threads = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            ts = [t.clone() for t in targets]
            out.append((_op(ts, onlines, torch.tensor(0.9), distance=True), ts))
    finally:
        torch.set_num_threads(threads)
    for d, ts in out[1:]:
        assert torch.equal(d, out[0][0])
        _assert_same_bits(ts, out[0][1], "threads")


def test_distance_zero_when_not_asked_and_at_momentum_one():
    targets, onlines = _lists(BF16, F32, seed=3)
    before = [t.clone() for t in targets]
    d = _op(targets, onlines, torch.tensor(0.9))
    assert d.dtype == F32 and d.shape == () and d.item() == 0.0
    t1 = [t.clone() for t in before]
    d_ref = ema_update_reference([t.clone() for t in before], onlines, 1.0, return_distance=True)
    d1 = _op(t1, onlines, torch.tensor(1.0), distance=True)
    torch.testing.assert_close(d1, d_ref, rtol=1e-6, atol=0)
    _assert_same_bits(t1, before, "m = 1 with the distance")


def test_buffers_copied_and_excluded_from_the_distance():
    targets, onlines = _lists(F32, F32, seed=4)
    g = torch.Generator().manual_seed(5)
    ob = [torch.randn(9, generator=g), torch.randn(5, generator=g).to(BF16), torch.tensor(11, dtype=torch.int64),
          torch.randn(4, generator=g, dtype=torch.float64), torch.randn(20000, generator=g).to(F16),
          torch.tensor([3, -4], dtype=torch.int32), torch.randn(6, generator=g)]
    tb = [torch.zeros(9), torch.zeros(5, dtype=BF16), torch.tensor(3, dtype=torch.int64),
          torch.zeros(4, dtype=torch.float64), torch.zeros(20000, dtype=F16), torch.zeros(2, dtype=torch.int32),
          torch.zeros(6, dtype=BF16)]  # the last: fp32 -> bf16, rounded like copy_
    ref, ref_b = [t.clone() for t in targets], [b.clone() for b in tb]
    d_ref = ema_update_reference(ref, onlines, 0.9, ref_b, ob, return_distance=True)
    for m in (0.9, 1.0):   # buffers are copied at m = 1 too
        tb_m = [b.clone() for b in tb]
        ts = [t.clone() for t in targets]
        d = _op(ts, onlines, torch.tensor(m), tb_m, ob, distance=True)
        torch.testing.assert_close(d, d_ref, rtol=1e-6, atol=0)
        for i, (a, e) in enumerate(zip(tb_m, ref_b)):
            assert a.dtype == e.dtype and torch.equal(a, e), f"m={m}: buffer {i} must be copied, got {a} vs {e}"
    _assert_same_bits(ts, targets, "m = 1 with buffers")
    # the op's Python kernel (the CPU kernel where the library is absent: the foreach path on plain CPU)
    ts, tb_p = [t.clone() for t in targets], [b.clone() for b in tb]
    with use_backend("reference"):
        d_p = ema_mod._op_kernel(ts, onlines, torch.tensor(0.9), tb_p, ob, True)
    _assert_same_bits(ts, ref, "the op's Python kernel")
    assert all(torch.equal(a, e) for a, e in zip(tb_p, ref_b))
    assert torch.equal(d_p, d_ref)


# --------------------------------------------------------------------------------------------------
# Bad input: the same exception type and message from the C++ kernel, the op's Python kernel and the
# public function
# --------------------------------------------------------------------------------------------------
def _bad_cases():
    def base():
        return [torch.zeros(5), torch.zeros(3, 4)], [torch.ones(5), torch.ones(3, 4)], torch.tensor(0.9), [], []

    cases = []

    def case(name, exc, edit):
        cases.append(pytest.param(edit, exc, id=name))

    def length(a):
        a[1].pop()

    def shape(a):
        a[1][1] = torch.ones(4, 3)

    def int_target(a):
        a[0][0] = torch.zeros(5, dtype=torch.int64)

    def double_online(a):
        a[1][1] = torch.ones(3, 4, dtype=torch.float64)

    def complex_target(a):
        a[0][1] = torch.zeros(3, 4, dtype=torch.complex64)

    def grad(a):
        a[0][1].requires_grad_(True)

    def strides(a):
        a[1][1] = torch.ones(4, 3).t()

    def gaps(a):
        a[0][1], a[1][1] = torch.zeros(3, 8)[:, ::2], torch.ones(3, 8)[:, ::2]

    def m_high(a):
        a[2] = torch.tensor(1.5)

    def m_low(a):
        a[2] = torch.tensor([-0.1])

    def m_nan(a):
        a[2] = torch.tensor(float("nan"))

    def m_int(a):
        a[2] = torch.tensor(1)

    def m_two(a):
        a[2] = torch.tensor([0.5, 0.5])

    def buf_length(a):
        a[3], a[4] = [torch.zeros(2)], []

    def buf_shape(a):
        a[3], a[4] = [torch.zeros(2), torch.zeros(())], [torch.zeros(2), torch.zeros(1)]

    def buf_grad(a):
        a[3], a[4] = [torch.zeros(2, requires_grad=True)], [torch.zeros(2)]

    def buf_strides(a):
        a[3], a[4] = [torch.zeros(2, 3)], [torch.zeros(3, 2).t()]

    def empty(a):
        a[0], a[1] = [], []

    for name, exc, edit in [("length", ValueError, length), ("shape", ValueError, shape),
                            ("int_target", TypeError, int_target), ("double_online", TypeError, double_online),
                            ("complex_target", TypeError, complex_target), ("grad", ValueError, grad),
                            ("strides", ValueError, strides), ("gaps", ValueError, gaps),
                            ("m_high", ValueError, m_high), ("m_low", ValueError, m_low),
                            ("m_nan", ValueError, m_nan), ("m_int", TypeError, m_int), ("m_two", TypeError, m_two),
                            ("buf_length", ValueError, buf_length), ("buf_shape", ValueError, buf_shape),
                            ("buf_grad", ValueError, buf_grad), ("buf_strides", ValueError, buf_strides),
                            ("empty", ValueError, empty)]:
        case(name, exc, edit)
    return base, cases


_BASE, _CASES = _bad_cases()


@pytest.mark.parametrize("edit,exc", _CASES)
def test_errors_match_python(edit, exc, plain_cpu):
    args = list(_BASE())
    edit(args)
    targets, onlines, m, tb, ob = args
    with pytest.raises(exc, match="^ema_update_: ") as public:
        ema_update_(targets, onlines, m, target_buffers=tb, online_buffers=ob)
    with pytest.raises(exc) as cpp:
        OP(targets, onlines, m, tb, ob, False)
    with pytest.raises(exc) as python_kernel:
        ema_mod._op_kernel(targets, onlines, m, tb, ob, False)
    with use_backend("reference"), pytest.raises(exc) as foreach:
        ema_update_(targets, onlines, m, target_buffers=tb, online_buffers=ob)
    assert str(cpp.value) == str(public.value) == str(python_kernel.value) == str(foreach.value)


@pytest.mark.parametrize("case", ["not_list", "not_tensor", "buffer_not_tensor", "targets_tuple_empty"])
def test_python_only_errors_on_the_native_path(case, plain_cpu):
    """What the dispatcher refuses in its own words (a list that is not one, an entry that is not a
    tensor) the public op on the C++ path reports as the Python paths do."""
    t, o, kw = [torch.zeros(5), torch.zeros(3)], [torch.ones(5), torch.ones(3)], {}
    if case == "not_list":
        o = torch.ones(2, 5)
    elif case == "not_tensor":
        o[1] = 3.0
    elif case == "buffer_not_tensor":
        kw = dict(target_buffers=[torch.zeros(1)], online_buffers=["a"])
    else:
        t, o = (), ()
    with pytest.raises((TypeError, ValueError)) as native_path:
        ema_update_(t, o, 0.5, **kw)
    with use_backend("reference"), pytest.raises((TypeError, ValueError)) as foreach:
        ema_update_(t, o, 0.5, **kw)
    assert type(native_path.value) is type(foreach.value) and str(native_path.value) == str(foreach.value)
    assert str(foreach.value).startswith("ema_update_: ")


def test_no_write_before_an_error(plain_cpu):
    """The checks run before any element is written: a bad second entry leaves the first one alone."""
    t, o = [torch.zeros(5), torch.zeros(3)], [torch.ones(5), torch.ones(4)]
    with pytest.raises(ValueError, match=r"onlines\[1\] must have the shape of targets\[1\] \[3\], got \[4\]"):
        OP(t, o, torch.tensor(0.5), [], [], False)
    assert torch.equal(t[0], torch.zeros(5))


# --------------------------------------------------------------------------------------------------
# Fake kernel, export, and the public op's path
# --------------------------------------------------------------------------------------------------
def test_fake_kernel_and_schema():
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert str(OP.default._schema) == f"jepa_engine::{ema_mod.SCHEMA}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("jepa_engine::ema_update_", "CUDA")
    with FakeTensorMode():
        t = [torch.empty(3, 4), torch.empty(7, dtype=BF16)]
        o = [torch.empty(3, 4, dtype=BF16), torch.empty(7)]
        d = OP(t, o, torch.empty(1), [torch.empty(2)], [torch.empty(2)], True)
    assert d.shape == () and d.dtype == F32 and isinstance(d, torch._subclasses.FakeTensor)


def test_exported_program_reads_the_momentum_it_is_given():
    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("target", torch.zeros(6))
            self.register_buffer("count", torch.zeros((), dtype=torch.int64))

        def forward(self, online, momentum, count):
            return OP([self.target], [online], momentum, [self.count], [count], True)

    ep = torch.export.export(Step(), (torch.ones(6), torch.tensor([0.9]), torch.tensor(1)))
    step = ep.module()
    d = step(torch.ones(6), torch.tensor([0.25]), torch.tensor(7))
    assert torch.equal(step.target, torch.full((6,), 0.75)) and step.count.item() == 7
    assert d.item() == 6.0


def test_public_op_takes_the_native_path(plain_cpu, monkeypatch):
    targets, onlines = _lists(BF16, F32, seed=6)
    tb, ob = [torch.tensor(0)], [torch.tensor(5)]
    params = [torch.nn.Parameter(t.clone(), requires_grad=False) for t in targets]
    ref = [t.clone() for t in targets]
    d_ref = ema_update_reference(ref, onlines, 0.996, return_distance=True)

    def fail(*a, **k):
        raise AssertionError("the Python path ran instead of the C++ kernel")
    monkeypatch.setattr(ema_mod, "_ema_foreach", fail)
    monkeypatch.setattr(ema_mod, "_python_update", fail)
    d = ema_update_(targets, onlines, 0.996, target_buffers=tb, online_buffers=ob, return_distance=True)
    _assert_same_bits(targets, ref, "public op")
    torch.testing.assert_close(d, d_ref, rtol=1e-6, atol=0)
    assert tb[0].item() == 5
    assert ema_update_(params, onlines, torch.tensor(0.996)) is None   # parameters take it too
    _assert_same_bits([p.data for p in params], ref, "public op on parameters")
    # use_backend and the interpreter keep the Python paths (the Triton kernels stay tested on CPU)
    with use_backend("reference"), pytest.raises(AssertionError, match="the Python path ran"):
        ema_update_(targets, onlines, 0.9)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not ema_mod._native_runs(targets[0])


def test_unfused_capability_rounds_as_torch():
    """Under ATEN_CPU_CAPABILITY=default torch.lerp rounds each operation: the kernel follows it (the
    child loads only torch and the library, the reference being torch.lerp in fp32)."""
    lib = [p for p in torch.ops.loaded_libraries if Path(p).name == "_C.so"]
    assert len(lib) == 1, torch.ops.loaded_libraries
    code = ("import sys, torch\n"
            "torch.ops.load_library(sys.argv[1])\n"
            "assert torch.backends.cpu.get_cpu_capability() == 'DEFAULT'\n"
            "g = torch.Generator().manual_seed(0)\n"
            "for td, od in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32)):\n"
            "    for m in (0.996, 0.3):\n"
            "        t = torch.randn(20003, generator=g).to(td)\n"
            "        o = torch.randn(20003, generator=g).to(od)\n"
            "        w = torch.tensor(1.0) - torch.tensor(m)\n"
            "        want = torch.lerp(t.float(), o.float(), w).to(td)\n"
            "        torch.ops.jepa_engine.ema_update_([t], [o], torch.tensor(m), [], [], False)\n"
            "        assert torch.equal(t, want), (td, m, (t != want).sum())\n"
            "print('ok')\n")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    run = subprocess.run([sys.executable, "-c", code, lib[0]], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, (run.stdout + run.stderr)[-2000:]
