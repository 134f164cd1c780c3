"""window_attention and fused_mlp: the Triton kernels (interpreter here, compiled on CUDA) against their
PyTorch references, which are the specification; argument checks.

Precision expected: fp32 kernels compute in fp32 (the interpreter's dots are exact; fused_mlp's dots
are IEEE fp32 unless TF32 is allowed), so fp32 matches the fp32 reference to ~1e-5; bf16 stores its
outputs in bf16 (a relative rounding of 2^-8) and fused_mlp also rounds its hidden to bf16, so bf16 is
compared with the fp32 reference of the same bf16 inputs within a few bf16 steps."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from jepa_engine.kernels import fused_mlp, fused_mlp_reference, window_attention, window_attention_reference

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("E,N,L,P,last", [(1, 7, 6, 0, False), (2, 5, 6, 4, False), (2, 9, 4, 2, True),
                                          (3, 4, 2, 0, True), (1, 3, 5, 3, False)])
def test_window_attention_equals_reference(kernel_device, dtype, E, N, L, P, last):
    g = torch.Generator().manual_seed(E * 100 + N * 10 + L)
    heads, hd = 2, 16
    C = heads * hd
    wide = torch.randn(E * N * L, 3 * C + 5, generator=g).to(kernel_device, dtype)
    qkv = wide[:, :3 * C]                                               # a row stride wider than 3C
    prefix = torch.randn(E, P, 3 * C, generator=g).to(kernel_device, dtype)[..., C:] if P else None
    with torch.no_grad():
        got = window_attention(qkv, prefix, heads=heads, window=L, last_only=last)
        want = window_attention_reference(qkv.float(), prefix.float() if P else None, heads, N, 2, L, last)
    assert got.shape == (E * N * (1 if last else L), C) and got.dtype == dtype
    assert_close(got.float(), want, **TOL[dtype])


def test_window_attention_mask_is_frame_causal(kernel_device):
    """A key in a later frame does not move an earlier query's output; one in the same frame does."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(6, 3 * 16, generator=g).to(kernel_device)
    with torch.no_grad():
        base = window_attention(qkv, None, heads=1, window=6)
        later = qkv.clone()
        later[4:, 16:] += 5.0                    # keys and values of frame 2 (tokens 4, 5)
        moved = window_attention(later, None, heads=1, window=6)
    assert_close(moved[:4], base[:4])
    assert (moved[4:] - base[4:]).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,C,F", [(37, 48, 96), (16, 32, 128), (50, 64, 40)])
def test_fused_mlp_equals_reference(kernel_device, dtype, M, C, F):
    g = torch.Generator().manual_seed(M + C + F)
    x = torch.randn(M + 3, C, generator=g)[1:M + 1].to(kernel_device, dtype)      # offset rows
    w1, b1 = torch.randn(F, C, generator=g) / C ** 0.5, torch.randn(F, generator=g)
    w2, b2 = torch.randn(C, F, generator=g) / F ** 0.5, torch.randn(C, generator=g)
    params = [t.to(kernel_device, dtype) for t in (w1, b1, w2, b2)]
    with torch.no_grad():
        got = fused_mlp(x, *params)
        want = fused_mlp_reference(x.float(), *(p.float() for p in params))
    assert_close(got.float(), want, **TOL[dtype])


def test_bad_arguments_name_themselves():
    qkv = torch.randn(12, 48)
    with pytest.raises(ValueError, match="window_attention: qkv's rows must be a multiple of window = 5"):
        window_attention(qkv, None, heads=2, window=5)
    with pytest.raises(ValueError, match=r"window_attention: prefix must be \[E, P, 2C\] = \[E, P, 32\]"):
        window_attention(qkv, torch.randn(1, 2, 30), heads=2, window=6)
    with pytest.raises(ValueError, match="window_attention: window must be an int >= 1 and <= 64, got 0"):
        window_attention(qkv, None, heads=2, window=0)
    with pytest.raises(ValueError, match="window_attention: inference-only op"):
        window_attention(qkv.requires_grad_(), None, heads=2, window=6)
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"fused_mlp: w2 must be \[C, F\] = \[8, 16\], got \[16, 8\]"):
        fused_mlp(x, torch.randn(16, 8), torch.randn(16), torch.randn(16, 8), torch.randn(8))
    with pytest.raises(TypeError, match="fused_mlp: b1 must have the dtype of x"):
        fused_mlp(x, torch.randn(16, 8), torch.randn(16, dtype=torch.bfloat16), torch.randn(8, 16), torch.randn(8))
