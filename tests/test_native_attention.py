"""The masked attention forward of the native library (csrc/attention.cpp) against the Python
reference, its argument errors against the public function's, the Python registrations onto its
schema (fake kernel, autograd), and the public op's choice of path on plain CPU.

Precision: the C++ kernel and the reference both compute in fp32 from the same fp32 copies (ATen's
fused CPU attention), so fp32 is compared at the fp32 tolerance and fp16/bf16 at their storage
tolerance; the base-2 log-sum-exp at the fp32 tolerance, +inf on the same rows.
"""
from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

from jepa_engine.kernels import _native, masked_attention, use_backend
from jepa_engine.kernels.masked_attention import _reference_forward, masked_attention_reference
from tests.helpers import assert_close

OP = "masked_attention"


@pytest.fixture(scope="module", autouse=True)
def native():
    if OP not in _native.native_ops():
        if shutil.which("cmake") and shutil.which(os.environ.get("CXX", "g++")):
            pytest.fail(f"cmake and a C++ compiler are here but the native library does not define {OP}: "
                        f"{_native.status()}, ops {sorted(_native.native_ops())}")
        pytest.skip(f"no compiler to build the native library: {_native.status()}")


def qkv(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(shape, generator=g) * 1.5).to(dtype) for _ in range(3))


def cpp(q, k, v, key_padding=None, cu_seqlens=None, keep_index=None, frame_len=0, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.jepa_engine.masked_attention(q, k, v, key_padding, cu_seqlens, keep_index, frame_len, scale, 0)


def check_against_reference(q, k, v, what, **kw):
    out, lse = cpp(q, k, v, **kw)
    scale = kw.get("scale") or q.shape[-1] ** -0.5
    ref_out, ref_lse = _reference_forward(q, k, v, kw.get("key_padding"), kw.get("cu_seqlens"), kw.get("keep_index"),
                                          kw.get("frame_len", 0), scale)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.dtype == torch.float32
    assert_close(out, ref_out, q.dtype, what=f"{what} out")
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), f"{what}: +inf lse rows differ"
    finite = torch.isfinite(ref_lse)
    assert_close(lse[finite], ref_lse[finite], torch.float32, what=f"{what} lse")
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,N_q,N_k,D", [(1, 1, 1, 1, 1), (2, 3, 17, 17, 16), (3, 2, 9, 33, 64),
                                           (2, 4, 40, 40, 80), (1, 2, 5, 7, 256)])
def test_dense_and_key_padding(dtype, B, H, N_q, N_k, D):
    q, _, _ = qkv((B, H, N_q, D), dtype, seed=1)
    _, k, v = qkv((B, H, N_k, D), dtype, seed=2)
    check_against_reference(q, k, v, f"dense {dtype}")
    g = torch.Generator().manual_seed(3)
    pad = torch.rand(B, N_k, generator=g) > 0.4
    pad[0] = False                                       # a sample with no visible key: zeros, lse +inf
    out, lse = check_against_reference(q, k, v, f"padding {dtype}", key_padding=pad)
    assert torch.all(out[0] == 0) and torch.all(torch.isinf(lse[0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frame_causal_and_its_output_layout(dtype):
    q, k, v = qkv((2, 3, 24, 32), dtype, seed=4)
    out, _ = check_against_reference(q, k, v, "frame", frame_len=5)
    # [B, H, N, D] on [B, N, H, D] memory, as the Triton kernel writes it
    assert out.transpose(1, 2).is_contiguous()
    pad = torch.ones(2, 24, dtype=torch.bool)
    pad[1, :7] = False                                   # frame 0 of sample 1 sees nothing
    check_against_reference(q, k, v, "frame + padding", frame_len=5, key_padding=pad)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_index_set(index_dtype):
    q, _, _ = qkv((3, 2, 11, 16), seed=5)
    _, k, v = qkv((3, 2, 20, 16), seed=6)
    keep = torch.tensor([[0, 4, 19, -1, 7], [-1, -1, -1, -1, -1], [3, 2, 1, 0, 10]], dtype=index_dtype)
    out, lse = check_against_reference(q, k, v, "index", keep_index=keep)
    assert torch.all(out[1] == 0) and torch.all(torch.isinf(lse[1]))


def test_varlen_with_frames_and_an_empty_sequence():
    q, k, v = qkv((30, 2, 16), seed=7)
    cu = torch.tensor([0, 9, 9, 21, 30], dtype=torch.int32)
    out, lse = check_against_reference(q, k, v, "varlen", cu_seqlens=cu)
    assert lse.shape == (2, 30)
    check_against_reference(q, k, v, "varlen + frame", cu_seqlens=cu, frame_len=4, scale=0.3)


def test_strided_inputs_read_in_place():
    """Slices of a fused qkv projection (non-contiguous heads) give the reference's result."""
    x = torch.randn(2, 13, 3, 4, 16)                      # [B, N, (q k v), H, D]
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    check_against_reference(q, k, v, "strided")


# --------------------------------------------------------------------------------------------------
# Registrations onto the C++ schema: fake kernel, autograd
# --------------------------------------------------------------------------------------------------
def test_schema_is_native_with_python_cuda_and_fake_kernels():
    name = f"jepa_engine::{OP}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 3, 10, 16)
        out, lse = cpp(q, q, q, frame_len=2)
        t = torch.empty(12, 3, 16)
        vout, vlse = cpp(t, t, t, cu_seqlens=torch.empty(3, dtype=torch.int32))
    assert out.shape == (2, 3, 10, 16) and lse.shape == (2, 3, 10) and lse.dtype == torch.float32
    assert vout.shape == (12, 3, 16) and vlse.shape == (3, 12)


def test_gradients_through_the_native_forward_equal_the_reference(plain_cpu):
    """The op called on CPU tensors with grad runs the C++ forward and the registered Python backward."""
    q, k, v = (t.requires_grad_(True) for t in qkv((2, 2, 12, 16), seed=8))
    pad = torch.rand(2, 12, generator=torch.Generator().manual_seed(9)) > 0.3
    out, _ = cpp(q, k, v, key_padding=pad, frame_len=4)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(10))
    got = torch.autograd.grad(out, (q, k, v), g)
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    ref = masked_attention_reference(q2, k2, v2, key_padding=pad, frame_size=4)
    want = torch.autograd.grad(ref, (q2, k2, v2), g)
    for name, a, b in zip("qkv", got, want):
        assert_close(a, b, torch.float32, what=f"d{name}", scale=4)


def _forbid(monkeypatch, *names):
    mod = sys.modules["jepa_engine.kernels.masked_attention"]
    for name in names:
        def fail(*a, _name=name, **kw):
            raise AssertionError(f"{_name} ran")
        monkeypatch.setattr(mod, name, fail)


@pytest.mark.parametrize("grad", [False, True])
def test_public_op_on_plain_cpu_fp32_is_one_sdpa_call(plain_cpu, monkeypatch, grad):
    """Key padding, kept-index and frame-causal fp32 calls on plain CPU are one SDPA call with a bool mask
    (the kernel the reference and the C++ op run, without the 25-110 us around it): neither the op nor
    the reference runs, and the result is the reference's, its gradients too."""
    q, k, v = qkv((2, 2, 10, 16), seed=11)
    pad = torch.ones(2, 10, dtype=torch.bool)
    pad[1, 7:] = False
    keep = torch.tensor([[0, 3, -1, 8], [9, 1, 2, 5]])
    cases = [dict(), dict(frame_size=3), dict(key_padding=pad), dict(key_padding=pad, frame_size=3),
             dict(keep_index=keep), dict(keep_index=keep.int())]
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    want = []
    for kw in cases:
        x = [t.clone().requires_grad_(grad) for t in (q, k, v)]
        with torch.set_grad_enabled(grad):
            out = masked_attention_reference(*x, **kw)
        want.append((out.detach(), torch.autograd.grad(out, x, g) if grad else ()))
    _forbid(monkeypatch, "_masked_attention_op", "masked_attention_reference", "_reference_forward")
    for kw, (ref, ref_grads) in zip(cases, want):
        x = [t.clone().requires_grad_(grad) for t in (q, k, v)]
        with torch.set_grad_enabled(grad):
            out = masked_attention(*x, **kw)
        assert torch.equal(out.detach(), ref), kw
        for name, a, b in zip("qkv", torch.autograd.grad(out, x, g) if grad else (), ref_grads):
            assert_close(a, b, torch.float32, what=f"d{name} {kw}")


def test_public_op_takes_the_native_path_where_sdpa_does_not_apply(plain_cpu, monkeypatch):
    """A row with no visible key (SDPA's result there depends on the torch version), packed sequences and
    half precision take the C++ kernel under no_grad, the reference with a gradient or under
    use_backend("reference")."""
    q, k, v = qkv((2, 2, 10, 16), seed=11)
    empty = torch.ones(2, 10, dtype=torch.bool)
    empty[1] = False
    t = torch.randn(10, 2, 16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    cases = [((q, k, v), dict(key_padding=empty)), ((q, k, v), dict(key_padding=empty, frame_size=3)),
             ((q, k, v), dict(keep_index=torch.tensor([[0, 3, -1], [-1, -1, -1]]))),
             ((t, t, t), dict(cu_seqlens=cu, frame_size=2)), (tuple(x.half() for x in (q, k, v)), dict(frame_size=3))]
    want = [masked_attention_reference(*x, **kw) for x, kw in cases]
    assert want[0][1].abs().max() == 0
    _forbid(monkeypatch, "masked_attention_reference", "_reference_forward")
    with torch.no_grad():
        for (x, kw), ref in zip(cases, want):
            assert_close(masked_attention(*x, **kw), ref, x[0].dtype, what=f"native path {kw}")
    monkeypatch.undo()
    monkeypatch.setenv("TRITON_INTERPRET", "0")     # undo() also undid plain_cpu's
    mod = sys.modules["jepa_engine.kernels.masked_attention"]
    calls = []
    monkeypatch.setattr(mod, "masked_attention_reference", lambda *a, **kw: calls.append(1) or want[0])
    with torch.enable_grad():
        masked_attention(q.clone().requires_grad_(True), k, v, key_padding=empty)
    with torch.no_grad(), use_backend("reference"):
        masked_attention(q, k, v, frame_size=3)
    assert len(calls) == 2


# --------------------------------------------------------------------------------------------------
# Bad input: the same exception, with the same message, from C++ as from the public function
# --------------------------------------------------------------------------------------------------
def _bad():
    q, k, v = qkv((2, 3, 8, 16))
    t = torch.randn(10, 3, 16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    pad = torch.ones(2, 8, dtype=torch.bool)
    keep = torch.tensor([[0, 1], [2, 3]])
    # (public kwargs, op args (key_padding, cu_seqlens, keep_index, frame_len, scale), q, k, v, exception, message)
    return [
        ({}, (None, None, None, 0, 0.25), q[0], k, v, ValueError, r"q must be 4-D, got 3-D with shape \[3, 8, 16\]"),
        ({}, (None, None, None, 0, 0.25), q.double(), k, v, TypeError,
         r"q must have dtype in \(float32, float16, bfloat16\), got float64"),
        ({}, (None, None, None, 0, 0.25), q, k.half(), v, TypeError, r"k must have the dtype of q \(float32\), got float16"),
        ({}, (None, None, None, 0, 0.25), q, k[:, :2], v, ValueError,
         r"k must be \[B, H, N_k, D\] with q's B, H, D = \[2, 3, 8, 16\], got \[2, 2, 8, 16\]"),
        ({}, (None, None, None, 0, 0.25), q, k, v[:, :, :5], ValueError,
         r"v must be \[B, H, N_k, D\] like k = \[2, 3, 8, 16\], got \[2, 3, 5, 16\]"),
        ({}, (None, None, None, 0, 0.25), torch.randn(1, 1, 2, 300), torch.randn(1, 1, 2, 300),
         torch.randn(1, 1, 2, 300), ValueError, r"head dim \(last dim of q\) must be in \[1, 256\], got 300"),
        ({"key_padding": pad[:, :5]}, (pad[:, :5], None, None, 0, 0.25), q, k, v, ValueError,
         r"key_padding must be \[B, N_k\] = \[2, 8\], got \[2, 5\]"),
        ({"key_padding": pad.int()}, (pad.int(), None, None, 0, 0.25), q, k, v, TypeError,
         r"key_padding must have dtype in \(bool\), got int32"),
        ({"frame_size": 2}, (None, None, None, 2, 0.25), q, k[:, :, :6], v[:, :, :6], ValueError,
         r"frame-causal attention needs N_q == N_k \(self-attention\), got 8 and 6"),
        ({"keep_index": keep, "key_padding": pad}, (pad, None, keep, 0, 0.25), q, k, v, ValueError,
         r"keep_index cannot be combined with key_padding \(mark unused slots with -1\)"),
        ({"keep_index": keep[:1]}, (None, None, keep[:1], 0, 0.25), q, k, v, ValueError,
         r"keep_index must be \[B, K\] = \[2, K\], got \[1, 2\]"),
        ({"keep_index": keep + 7}, (None, None, keep + 7, 0, 0.25), q, k, v, ValueError,
         r"keep_index values must be in \[-1, N_k\) = \[-1, 8\) \(-1 = unused slot\), got min 7, max 10"),
        ({"keep_index": torch.tensor([[0, 1], [3, 3]])}, (None, None, torch.tensor([[0, 1], [3, 3]]), 0, 0.25), q, k, v,
         ValueError, r"keep_index must not repeat a key position within a sample \(sample 1 does\)"),
        ({"scale": float("inf")}, (None, None, None, 0, float("inf")), q, k, v, ValueError, "scale must be finite, got inf"),
        ({"cu_seqlens": cu.long()}, (None, cu.long(), None, 0, 0.25), t, t, t, TypeError,
         r"cu_seqlens must have dtype in \(int32\), got int64"),
        ({"cu_seqlens": cu[:1]}, (None, cu[:1], None, 0, 0.25), t, t, t, ValueError,
         r"cu_seqlens must be \[B \+ 1\] with B >= 1, got \[1\]"),
        ({"cu_seqlens": torch.tensor([0, 4, 9], dtype=torch.int32)},
         (None, torch.tensor([0, 4, 9], dtype=torch.int32), None, 0, 0.25), t, t, t, ValueError,
         r"cu_seqlens must start at 0, be non-decreasing and end at the token total 10, got \[0, 4, 9\]"),
        ({"cu_seqlens": cu, "key_padding": pad}, (pad, cu, None, 0, 0.25), t, t, t, ValueError,
         r"cu_seqlens cannot be combined with key_padding or keep_index"),
    ]


@pytest.mark.parametrize("case", range(len(_bad())))
def test_errors_match_python(case, plain_cpu):
    kw, args, q, k, v, exc, match = _bad()[case]
    kw = dict(kw)
    if "scale" not in kw:
        kw["scale"] = 0.25
    with use_backend("reference"), pytest.raises(exc, match=f"^{OP}: " + match) as py:
        masked_attention(q, k, v, **kw)
    with pytest.raises(exc, match=f"^{OP}: " + match) as native:
        torch.ops.jepa_engine.masked_attention(q, k, v, *args, 0)
    with torch.no_grad(), pytest.raises(exc) as public:   # the public op on its plain-CPU path (SDPA or C++)
        masked_attention(q, k, v, **kw)
    assert str(native.value) == str(py.value) == str(public.value)
