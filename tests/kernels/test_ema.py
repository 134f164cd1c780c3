"""One-launch EMA kernel (compiled on CUDA, interpreter on CPU) against the per-tensor ``torch.lerp``
reference; the ``torch._foreach_lerp_`` path (plain CPU) against the same reference."""
from __future__ import annotations

import pytest
import torch

from jepa_engine.kernels import use_backend
from jepa_engine.kernels._launch import triton_available
from jepa_engine.kernels.ema import _PLANS, ema_update_, ema_update_reference, get_plan
from tests.helpers import TOLERANCES, assert_close, run_audit

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# Odd sizes around the block edges (4096 compiled, 32768 interpreted) and multi-dim shapes.
ODD_SHAPES = [(1,), (3,), (17,), (4095,), (4097,), (7, 13), (3, 5, 11), (32767,), (32769,), (385, 97)]
PAIRS = [(F32, F32), (BF16, BF16), (F16, F16), (F32, BF16), (BF16, F32), (F16, F32), (F32, F16)]


def _lists(shapes, t_dtype, o_dtype, seed=0, device="cpu"):
    """Targets and onlines drawn on CPU from ``seed``, then moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    targets = [torch.randn(s, generator=g).to(device, t_dtype) for s in shapes]
    onlines = [torch.randn(s, generator=g).to(device, o_dtype) for s in shapes]
    return targets, onlines


def _device_for(backend, request):
    """The kernel's device for ``"triton"`` (skips where no kernel can run), CPU for the reference."""
    return request.getfixturevalue("kernel_device") if backend == "triton" else "cpu"


def _clone(xs):
    return [x.clone() for x in xs]


def _compare(backend, targets, onlines, momentum, what, distance=True, **kw):
    expected = _clone(targets)
    d_ref = ema_update_reference(expected, onlines, momentum, return_distance=distance)
    with use_backend(backend):
        d = ema_update_(targets, onlines, momentum, return_distance=distance, **kw)
    for i, (a, e) in enumerate(zip(targets, expected)):
        assert_close(a, e, e.dtype, what=f"{what} tensor {i}")
    if distance:
        torch.testing.assert_close(d, d_ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what} distance: {m}")


@pytest.mark.parametrize("t_dtype,o_dtype", PAIRS)
@pytest.mark.parametrize("momentum", [0.5, 0.996])
def test_kernel_matches_reference_odd_shapes(kernel_device, t_dtype, o_dtype, momentum):
    targets, onlines = _lists(ODD_SHAPES, t_dtype, o_dtype, device=kernel_device)
    _compare("triton", targets, onlines, momentum, f"{t_dtype}<-{o_dtype} m={momentum}")
    assert get_plan(targets, onlines).launches == 1


def test_mixed_dtype_list_one_launch_per_pair(kernel_device):
    targets, onlines = [], []
    for k, (td, od) in enumerate(PAIRS):
        t, o = _lists([(5 + k,), (4097 + k,)], td, od, seed=k, device=kernel_device)
        targets += t
        onlines += o
    _compare("triton", targets, onlines, 0.9, "mixed list")
    assert get_plan(targets, onlines).launches == len(PAIRS)


def test_one_thousand_tensors_one_launch(kernel_device):
    shapes = [(1 + (7 * i) % 23,) for i in range(1000)]
    targets, onlines = _lists(shapes, F32, F32, device=kernel_device)
    _compare("triton", targets, onlines, 0.99, "1000 tensors")
    assert get_plan(targets, onlines).launches == 1


def test_large_tensor_kernel(kernel_device):
    # 10^6 elements on the kernel (31 interpreted blocks); 10^7 runs on the foreach path below.
    targets, onlines = _lists([(1_000_003,), (65_536,)], BF16, F32, device=kernel_device)
    _compare("triton", targets, onlines, 0.996, "1e6 bf16<-fp32")


def test_large_tensor_foreach():
    targets, onlines = _lists([(10_000_019,)], F32, F32)
    _compare("reference", targets, onlines, 0.996, "1e7 foreach", distance=False)


@pytest.mark.parametrize("t_dtype,o_dtype", [(F32, F32), (BF16, BF16), (F32, BF16), (BF16, F32)])
def test_foreach_path_matches_reference(t_dtype, o_dtype):
    targets, onlines = _lists(ODD_SHAPES[:6], t_dtype, o_dtype)
    _compare("reference", targets, onlines, 0.9, f"foreach {t_dtype}<-{o_dtype}")


def _special(dtype, device):
    t = torch.tensor([-0.0, 0.0, 1.5, -2.25, float("inf"), float("-inf"), float("nan"), 3e-8] * 600).to(device, dtype)
    o = torch.tensor([1.0, -1.0, -0.0, float("nan"), 2.0, 0.5, 1.0, -7.0] * 600).to(device, dtype)
    return t, o


def _bits(x):
    return x.view(torch.int32 if x.element_size() == 4 else torch.int16)


# The reference (foreach) path on CPU; the kernel on the kernel device (skipped where none can run).
BACKENDS = ["reference", "triton"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy meets inf and nan
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_momentum_one_is_bit_exact_and_zero_copies(request, backend, dtype):
    device = _device_for(backend, request)
    t, o = _special(dtype, device)
    t_before = t.clone()
    g = torch.Generator().manual_seed(0)
    with use_backend(backend):
        ema_update_([t], [o], 1.0)
        assert torch.equal(_bits(t), _bits(t_before)), "momentum 1 must leave the target bit-exactly unchanged"
        o32 = torch.randn(4801, generator=g).to(device)
        t2 = torch.randn(4801, generator=g).to(device, dtype)
        ema_update_([t, t2], [o, o32], torch.tensor(0.0, device=device))
        assert torch.equal(_bits(t), _bits(o)), "momentum 0 must copy the online tensor exactly"
        assert torch.equal(_bits(t2), _bits(o32.to(dtype))), "momentum 0 must copy (rounded to the target dtype)"


@pytest.mark.parametrize("backend", BACKENDS)
def test_buffers_copied_and_excluded_from_distance(request, backend):
    device = _device_for(backend, request)
    targets, onlines = _lists([(33,), (4100,)], F32, F32, device=device)
    g = torch.Generator().manual_seed(1)
    tb = [torch.zeros(9), torch.zeros(5, dtype=BF16), torch.tensor(3, dtype=torch.int64)]
    ob = [torch.randn(9, generator=g), torch.randn(5, generator=g).to(BF16), torch.tensor(11, dtype=torch.int64)]
    tb, ob = [x.to(device) for x in tb], [x.to(device) for x in ob]
    expected = _clone(targets)
    d_ref = ema_update_reference(expected, onlines, 0.9, return_distance=True)
    with use_backend(backend):
        d = ema_update_(targets, onlines, torch.tensor([0.9], device=device), target_buffers=tb,
                        online_buffers=ob, return_distance=True)
    for a, e in zip(targets, expected):
        assert_close(a, e, F32, what=f"{backend} with buffers")
    for a, e in zip(tb, ob):
        assert torch.equal(a, e), f"{backend}: buffer must be copied exactly, got {a} vs {e}"
    torch.testing.assert_close(d, d_ref)


def test_plan_cached_and_rebuilt_on_change(kernel_device):
    targets, onlines = _lists([(10,), (20,)], F32, F32, device=kernel_device)
    with use_backend("triton"):
        ema_update_(targets, onlines, 0.9)
        plan = get_plan(targets, onlines)
        ema_update_(targets, onlines, 0.9)
        assert get_plan(targets, onlines) is plan
        targets[1] = torch.zeros(20, device=kernel_device)
        ema_update_(targets, onlines, 0.5)
        assert get_plan(targets, onlines) is not plan
        assert_close(targets[1], 0.5 * onlines[1], F32, what="rebuilt plan")
    assert len(_PLANS) <= 8


def test_dispatch_foreach_where_it_measured_faster():
    """The plain same-dtype float-momentum update on CUDA goes to ``torch._foreach_lerp_``; a device
    momentum, the distance, mixed dtypes, a forced kernel and every non-CUDA device keep the kernel's
    decision (the rule reads only the device type and dtypes: no CUDA needed to check it)."""
    from jepa_engine.kernels.ema import _foreach_wins

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    t32, t16 = [torch.zeros(3), torch.zeros(2)], [torch.zeros(3, dtype=BF16), torch.zeros(2, dtype=BF16)]
    assert _foreach_wins(t32, t32, 0.99, cuda, False)
    assert _foreach_wins(t16, t16, 0.99, cuda, False)
    assert not _foreach_wins(t32, t32, torch.tensor([0.99]), cuda, False), "device momentum: kernel (graphs)"
    assert not _foreach_wins(t32, t32, 0.99, cuda, True), "distance: kernel (fused)"
    assert not _foreach_wins(t32, t16, 0.99, cuda, False), "mixed dtypes: kernel (one pass)"
    assert not _foreach_wins([t32[0], t16[0]], [t32[0], t16[0]], 0.99, cuda, False)
    assert not _foreach_wins(t32, t32, 0.99, cpu, False)
    with use_backend("triton"):
        assert not _foreach_wins(t32, t32, 0.99, cuda, False), "a forced kernel stays the kernel"


# --------------------------------------------------------------------------------------------------
# Bad input: each a clear error naming the argument, the expected and the actual.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,exc,pattern", [
    ("length", ValueError, r"onlines must have one tensor per targets entry \(2\), got 1"),
    ("shape", ValueError, r"onlines\[1\] must have the shape of targets\[1\] \[3, 4\], got \[4, 3\]"),
    ("int", TypeError, r"targets\[0\] must have dtype in \(float32, float16, bfloat16\), got int64"),
    ("grad", ValueError, r"targets\[1\] must not require grad.*got requires_grad=True"),
    ("m_high", ValueError, r"momentum must be in \[0, 1\], got 1.5"),
    ("m_low", ValueError, r"momentum must be in \[0, 1\], got -0.1"),
    ("m_tensor", ValueError, r"momentum must be in \[0, 1\], got 2.0"),
    ("not_list", TypeError, r"onlines must be a list or tuple of tensors, got Tensor"),
])
def test_bad_input(request, backend, case, exc, pattern):
    device = _device_for(backend, request)
    if case == "m_tensor" and torch.device(device).type == "cuda":
        pytest.skip("a CUDA momentum tensor's value is not read (that would synchronise): "
                    "its range is checked only off CUDA")
    t = [torch.zeros(5, device=device), torch.zeros(3, 4, device=device)]
    o = [torch.ones(5, device=device), torch.ones(3, 4, device=device)]
    m = 0.9
    if case == "length":
        o = o[:1]
    elif case == "shape":
        o[1] = torch.ones(4, 3, device=device)
    elif case == "int":
        t[0] = torch.zeros(5, dtype=torch.int64, device=device)
    elif case == "grad":
        t[1].requires_grad_(True)
    elif case == "m_high":
        m = 1.5
    elif case == "m_low":
        m = -0.1
    elif case == "m_tensor":
        m = torch.tensor(2.0, device=device)
    elif case == "not_list":
        o = torch.ones(2, 5, device=device)
    with use_backend(backend), pytest.raises(exc, match=pattern):
        ema_update_(t, o, m)


@pytest.mark.audit
def test_audit_zero_spills():
    if not triton_available():
        pytest.skip("triton not installed")
    rows = run_audit("ema")
    assert {r["kernel"] for r in rows} == {"ema"}
    assert {r["target"] for r in rows} == {"sm_90a", "sm_80"}
    bad = [(r["variant"], r["target"], r["spill_bytes"], r["error"]) for r in rows if not r["ok"] or r["spill_bytes"]]
    assert not bad, f"ema kernel spills or fails to compile: {bad}"
