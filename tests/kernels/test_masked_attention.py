"""Fused masked attention: Triton kernels (compiled on CUDA, interpreter on CPU) vs the PyTorch reference, for
every mask kind. fp32 gradients are TF32 compiled (see ``BWD_ALLOWS_TF32`` in the kernel): ``tf32=True, grad=True``
below compares them at the TF32 gradient tolerance (tests/helpers.py) on a GPU, at fp32's under the interpreter."""
from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jepa_engine.kernels import masked_attention, masked_attention_reference, use_backend
from jepa_engine.kernels._launch import triton_available
from jepa_engine.nn import MaskedSelfAttention
from tests.helpers import DTYPES, assert_close, run_audit, run_both

# Gradients sum over every query (dK, dV) or key (dQ) of a row: twice the output's tolerance.
GRAD_SCALE = 2.0


# --------------------------------------------------------------------------------------------------
# Inputs: every mask kind on small odd shapes (N = 37 spans three 16-wide interpreter tiles)
# --------------------------------------------------------------------------------------------------
MASKS = ["dense", "key_padding", "frame", "padding+frame", "keep_index", "varlen", "varlen+frame"]


def make_inputs(mask, dtype, B=2, H=2, N=37, D=16, N_k=None, seed=0, device="cpu"):
    """[q, k, v, kwargs] drawn on CPU from ``seed``, on ``device``; masks include a fully masked sample
    or frame where the kind allows one."""
    g = torch.Generator().manual_seed(seed)
    N_k = N if N_k is None else N_k
    kw = {}
    if mask.startswith("varlen"):
        lens = [N, 0, 11][:B + 1] if B >= 2 else [N]
        T = sum(lens)
        q, k, v = (torch.randn(T, H, D, generator=g).to(device, dtype) for _ in range(3))
        kw["cu_seqlens"] = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32,
                                        device=device)
        if mask == "varlen+frame":
            kw.update(frame_size=4, frame_extra_tokens=1)
        return [q, k, v, kw]
    q = torch.randn(B, H, N, D, generator=g).to(device, dtype)
    k, v = (torch.randn(B, H, N_k, D, generator=g).to(device, dtype) for _ in range(2))
    if mask in ("key_padding", "padding+frame"):
        pad = torch.rand(B, N_k, generator=g) < 0.6
        pad[-1] = False  # a sample with no visible key: its rows must be 0, never NaN
        if mask == "padding+frame":
            pad[0, :7] = False  # the first frame of sample 0 is fully padded
            pad[-1, 9:] = True
        kw["key_padding"] = pad.to(device)
    if mask in ("frame", "padding+frame"):
        kw.update(frame_size=5, frame_extra_tokens=2)
    if mask == "keep_index":
        K = max(1, (N_k * 3) // 5)
        idx = torch.stack([torch.randperm(N_k, generator=g)[:K] for _ in range(B)])
        idx[0, K // 2:] = -1  # per-sample variable counts: unused slots
        kw["keep_index"] = idx.to(device)
    return [q, k, v, kw]


def _op(q, k, v, kw):
    return masked_attention(q, k, v, **kw)


def check(device, mask, dtype, **shape):
    kernel, ref = run_both(_op, lambda: make_inputs(mask, dtype, device=device, **shape), grads_of=(0, 1, 2))
    for name, a, e in zip(["out", "dq", "dk", "dv"], kernel, ref):
        assert torch.isfinite(a).all(), f"{name} {mask} {dtype} {shape}: non-finite values"
        assert_close(a, e, dtype, what=f"{name} {mask} {shape}", scale=1.0 if name == "out" else GRAD_SCALE,
                     tf32=name != "out", grad=name != "out")


# --------------------------------------------------------------------------------------------------
# Kernel vs reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", MASKS)
def test_forward_backward_match_reference(kernel_device, mask, dtype):
    check(kernel_device, mask, dtype)


@pytest.mark.parametrize("D,dtype,mask", [(64, torch.float16, "padding+frame"), (128, torch.bfloat16, "keep_index"),
                                          (128, torch.float32, "varlen+frame"), (96, torch.float16, "key_padding"),
                                          (32, torch.bfloat16, "dense")])
def test_head_dims(kernel_device, D, dtype, mask):
    check(kernel_device, mask, dtype, B=1, H=2, N=21, D=D)


@pytest.mark.parametrize("mask", ["dense", "key_padding", "keep_index"])
def test_cross_attention_lengths(kernel_device, mask):
    # N_q != N_k, neither a multiple of the tile; B * H = 3.
    check(kernel_device, mask, torch.float32, B=3, H=1, N=19, N_k=34)


def test_more_batch_heads_than_one_grid_column(kernel_device, monkeypatch):
    # CUDA's grid y limit (65535 batch x head pairs) is met by chunked launches; chunks of 3 here.
    ma = importlib.import_module("jepa_engine.kernels.masked_attention")  # the module, not the function
    monkeypatch.setattr(ma, "_MAX_GRID_Y", 3)
    check(kernel_device, "key_padding", torch.float32, B=2, H=2, N=19)
    check(kernel_device, "varlen+frame", torch.float32, B=2, H=2, N=19)


def test_non_contiguous_mask_arguments(kernel_device):
    q, k, v, kw = make_inputs("key_padding", torch.float32, device=kernel_device)
    kp = kw["key_padding"]
    kw["key_padding"] = kp.t().contiguous().t()  # same values, key stride != 1
    assert kw["key_padding"].stride(1) != 1
    with use_backend("triton"):
        out = masked_attention(q, k, v, **kw)
    assert_close(out, masked_attention_reference(q, k, v, key_padding=kp), torch.float32, what="strided key_padding")


def test_fully_masked_rows_give_zero_output_and_gradients(kernel_device):
    q, k, v, kw = make_inputs("padding+frame", torch.float16, device=kernel_device)
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    out = masked_attention(q, k, v, **kw)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    # Sample 0: its first frame (tokens 0-6) is padded; sample 1 shows keys from token 9 (frame 1) on.
    for b in (0, 1):
        assert (out[b, :, :7] == 0).all() and (dq[b, :, :7] == 0).all(), f"fully masked rows of sample {b}"
        assert (out[b, :, 7:].abs().sum(-1) > 0).all()
    invisible = ~kw["key_padding"]  # padded keys get no gradient
    assert (dk.permute(0, 2, 1, 3)[invisible] == 0).all() and (dv.permute(0, 2, 1, 3)[invisible] == 0).all()


def test_keep_index_scatters_gradients_to_selected_keys_only(kernel_device):
    q, k, v, kw = make_inputs("keep_index", torch.float32, device=kernel_device)
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    out = masked_attention(q, k, v, **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(kernel_device)
    _, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    selected = torch.zeros(k.shape[0], k.shape[2], dtype=torch.bool, device=kernel_device)
    for b, row in enumerate(kw["keep_index"]):
        selected[b, row[row >= 0]] = True
    assert (dk.permute(0, 2, 1, 3)[~selected] == 0).all() and (dv.permute(0, 2, 1, 3)[~selected] == 0).all()
    assert (dv.permute(0, 2, 1, 3)[selected].abs().sum(-1) > 0).all()


def test_fp32_gradients_match_autograd_of_the_reference(kernel_device):
    """Gradcheck-style: the Triton backward against autograd through the plain reference (fp32)."""
    for mask in ("padding+frame", "keep_index", "varlen+frame"):
        q, k, v, kw = make_inputs(mask, torch.float32, seed=3, device=kernel_device)
        g = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(kernel_device)
        grads = []
        for fn in (masked_attention, masked_attention_reference):
            leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
            grads.append(torch.autograd.grad(fn(*leaves, **kw), leaves, g))
        for name, a, e in zip(("dq", "dk", "dv"), *grads):
            assert_close(a, e, torch.float32, what=f"{name} {mask}", tf32=True, grad=True)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 2), H=st.integers(1, 2), N=st.integers(1, 26), frame=st.integers(0, 6),
       kind=st.sampled_from(["key_padding", "keep_index"]), seed=st.integers(0, 2**16))
def test_random_masks(kernel_device, B, H, N, frame, kind, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, 16, generator=g) for _ in range(3))
    kw = {}
    if kind == "key_padding":
        kw["key_padding"] = torch.rand(B, N, generator=g) < torch.rand(B, 1, generator=g)
        if frame:
            kw.update(frame_size=frame, frame_extra_tokens=seed % 2)
    else:
        K = int(torch.randint(1, N + 1, (1,), generator=g))
        idx = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B)])
        idx[torch.rand(B, K, generator=g) < 0.3] = -1
        kw["keep_index"] = idx
    q, k, v = (x.to(kernel_device) for x in (q, k, v))
    kw = {name: x.to(kernel_device) if isinstance(x, torch.Tensor) else x for name, x in kw.items()}
    kernel, ref = run_both(_op, lambda: [x.clone() for x in (q, k, v)] + [kw], grads_of=(0, 1, 2))
    for name, a, e in zip(["out", "dq", "dk", "dv"], kernel, ref):
        assert_close(a, e, torch.float32, what=f"{name} {kind} frame={frame}", tf32=name != "out",
                     grad=name != "out")


# --------------------------------------------------------------------------------------------------
# Module, torch.compile
# --------------------------------------------------------------------------------------------------
def test_module_parameter_names_match_vit_attention():
    m = MaskedSelfAttention(64, num_heads=4, qkv_bias=True)
    assert set(m.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    assert m.qkv.weight.shape == (192, 64)


def test_module_kernel_matches_reference_on_strided_qkv(kernel_device):
    torch.manual_seed(0)
    m = MaskedSelfAttention(64, num_heads=2).to(kernel_device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 13, 64, generator=g).to(kernel_device)
    pad = (torch.rand(2, 13, generator=g) < 0.7).to(kernel_device)
    outs = []
    for backend in ("triton", "reference"):
        xx = x.clone().requires_grad_(True)
        with use_backend(backend):
            y = m(xx, key_padding=pad, frame_size=3)
            gx, gw = torch.autograd.grad(y.square().sum(), (xx, m.qkv.weight))
        outs.append((y.detach(), gx, gw))
    for name, a, e in zip(("y", "dx", "dqkv.weight"), *outs):
        assert_close(a, e, torch.float32, what=name, scale=4.0, tf32=name != "y", grad=name != "y")
    # Packed (varlen) form: two sequences of 5 and 8 tokens equal the batched form run separately.
    cu = torch.tensor([0, 5, 13], dtype=torch.int32, device=kernel_device)
    xp = x[0]
    with use_backend("triton"):
        packed = m(xp, cu_seqlens=cu)
        parts = [m(xp[None, :5])[0], m(xp[None, 5:])[0]]
    assert_close(packed, torch.cat(parts), torch.float32, what="varlen vs per-sequence")


def test_torch_compile_fullgraph_traces_the_op():
    torch.manual_seed(0)
    m = MaskedSelfAttention(32, num_heads=2)
    x = torch.randn(2, 9, 32)
    pad = torch.rand(2, 9) < 0.6
    pad[1] = False
    with use_backend("reference"):
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        xc = x.clone().requires_grad_(True)
        y = compiled(xc, key_padding=pad, frame_size=4, frame_extra_tokens=1)
        y.sum().backward()
        xe = x.clone().requires_grad_(True)
        ye = m(xe, key_padding=pad, frame_size=4, frame_extra_tokens=1)
        ye.sum().backward()
    assert_close(y, ye, torch.float32, what="compiled output")
    assert_close(xc.grad, xe.grad, torch.float32, what="compiled grad")


def test_reference_matches_sdpa_with_boolean_mask():
    torch.manual_seed(0)
    q, k, v, kw = make_inputs("padding+frame", torch.float32)
    kp = kw["key_padding"]
    fq = torch.arange(37) // 7
    mask = kp[:, None, None, :] & (fq[None, None, None, :] <= fq[None, None, :, None])
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref = masked_attention_reference(q, k, v, **kw)
    rows = mask.any(-1, keepdim=True).expand_as(ref)
    assert_close(ref[rows], sdpa[rows], torch.float32, what="visible rows")
    assert (ref[~rows] == 0).all()


# --------------------------------------------------------------------------------------------------
# Bad input: a clear error before any kernel runs
# --------------------------------------------------------------------------------------------------
def _bad_cases():
    q = torch.randn(2, 3, 8, 16)
    f16 = q.half()
    return [
        ("heads", (q, torch.randn(2, 4, 8, 16), q), {}, "k must be [B, H, N_k, D]"),
        ("head dim mismatch", (q, torch.randn(2, 3, 8, 32), q), {}, "k must be [B, H, N_k, D]"),
        ("unsupported head dim", (torch.randn(2, 3, 8, 264),) * 3, {}, "head dim"),
        ("dtype mix", (q, f16, q), {}, "k must have the dtype of q"),
        ("v length", (q, q, torch.randn(2, 3, 9, 16)), {}, "v must be [B, H, N_k, D]"),
        ("key padding N_k", (q, q, q), {"key_padding": torch.ones(2, 7, dtype=torch.bool)},
         "key_padding must be [B, N_k] = [2, 8]"),
        ("key padding dtype", (q, q, q), {"key_padding": torch.ones(2, 8)}, "key_padding must have dtype"),
        ("keep_index range", (q, q, q), {"keep_index": torch.tensor([[0, 8], [1, 2]])},
         "keep_index values must be in [-1, N_k)"),
        ("keep_index negative", (q, q, q), {"keep_index": torch.tensor([[0, -2], [1, 2]])}, "keep_index values"),
        ("keep_index duplicates", (q, q, q), {"keep_index": torch.tensor([[0, 3, 3], [1, 2, -1]])}, "must not repeat"),
        ("keep_index batch", (q, q, q), {"keep_index": torch.tensor([[0, 1]])}, "keep_index must be [B, K]"),
        ("keep_index + padding", (q, q, q), {"keep_index": torch.tensor([[0], [1]]),
                                             "key_padding": torch.ones(2, 8, dtype=torch.bool)}, "cannot be combined"),
        ("cu_seqlens not monotone", (torch.randn(10, 2, 16),) * 3,
         {"cu_seqlens": torch.tensor([0, 6, 4, 10], dtype=torch.int32)}, "non-decreasing"),
        ("cu_seqlens total", (torch.randn(10, 2, 16),) * 3,
         {"cu_seqlens": torch.tensor([0, 4, 9], dtype=torch.int32)}, "end at the token total 10"),
        ("cu_seqlens dtype", (torch.randn(10, 2, 16),) * 3,
         {"cu_seqlens": torch.tensor([0, 4, 10])}, "cu_seqlens must have dtype"),
        ("varlen rank", (q, q, q), {"cu_seqlens": torch.tensor([0, 8], dtype=torch.int32)}, "q must be 3-D"),
        ("frame size", (q, q, q), {"frame_size": 0}, "frame_size must be >= 1"),
        ("frame cross", (q, torch.randn(2, 3, 9, 16), torch.randn(2, 3, 9, 16)), {"frame_size": 2}, "N_q == N_k"),
        ("extra without frame", (q, q, q), {"frame_extra_tokens": 2}, "needs frame_size"),
        ("dropout", (q, q, q), {"dropout_p": 0.1}, "dropout_p must be 0.0"),
        ("not a tensor", (q, q, None), {}, "v must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("name,args,kw,msg", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input_raises_clear_error(name, args, kw, msg):
    with pytest.raises((ValueError, TypeError), match=None) as info:
        masked_attention(*args, **kw)
    assert msg in str(info.value), f"{name}: {info.value}"
    assert str(info.value).startswith("masked_attention:")


# --------------------------------------------------------------------------------------------------
# Audit: spill-free, tensor cores on both targets
# --------------------------------------------------------------------------------------------------
@pytest.mark.audit
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_audit_no_spills_and_tensor_cores():
    names = ("masked_attention_fwd", "masked_attention_bwd_preprocess", "masked_attention_bwd")
    rows = run_audit(*names)
    assert {r["kernel"] for r in rows} == set(names)
    assert {r["target"] for r in rows} == {"sm_90a", "sm_80"}
    # ptxas puts register spills in the stack frame: no stack either (the kernels make no calls).
    bad = [r for r in rows if r["error"] or r["spill_bytes"] != 0 or r["stack_bytes"] != 0 or not r["ok"]]
    assert not bad, f"kernels that spill or fail: {bad}"
    for r in rows:
        if r["kernel"] == "masked_attention_bwd" or (r["kernel"] == "masked_attention_fwd"
                                                     and not r["variant"].startswith("fp32")):
            assert r["tensor_core_ops"] > 0, f"no HGMMA/HMMA: {r}"


@pytest.mark.parametrize("mask", MASKS)
def test_written_out_reference_matches_the_sdpa_specification(mask):
    """The custom op's PyTorch body (plain softmax forward + written-out backward, used where the op
    runs inside a traced graph without Triton) against autograd through the SDPA specification."""
    from jepa_engine.kernels.masked_attention import _reference_forward, masked_attention_backward_reference

    q, k, v, kw = make_inputs(mask, torch.float32, seed=5)
    frame_len = kw.get("frame_size", 0) + kw.get("frame_extra_tokens", 0)
    args = (kw.get("key_padding"), kw.get("cu_seqlens"), kw.get("keep_index"), frame_len, 0.3)
    out, _ = _reference_forward(q, k, v, *args)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = masked_attention_backward_reference(g, q, k, v, key_padding=args[0], cu_seqlens=args[1],
                                                frame_len=frame_len, keep_index=args[2], scale=0.3)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    spec = masked_attention_reference(*leaves, scale=0.3, **kw)
    assert_close(out, spec, torch.float32, what=f"forward {mask}")
    for name, a, e in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(spec, leaves, g)):
        assert_close(a, e, torch.float32, what=f"{name} {mask}", scale=GRAD_SCALE)
