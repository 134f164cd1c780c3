"""Fused masked attention against SDPA (boolean mask; gather-and-pad), FlexAttention and the reference.

Problems (GPU; tiny CPU stand-ins otherwise, where ``jepa_engine`` runs the PyTorch reference):
- JEPA context attention: ViT-B/16 and ViT-L/16 at 224 px (N = 197, head dim 64, bf16), batch 64
  and 256, per-sample visible key counts around a fraction 0.25 / 0.5 / 0.85. Ours reads the visible
  keys through ``keep_index`` (and, as a second row, through ``key_padding``).
- V-JEPA 2-AC frame-causal: 8 frames x (256 patches + 2 action/state tokens), head dim 64.
- Long dense sequences 1k-16k at head dim 128.
FLOPs count only unmasked work: 4 * D per (query, visible key) pair forward, 2.5x that for backward.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jepa_engine.kernels import masked_attention, masked_attention_reference, use_backend
from jepa_engine.profiling import bench_shapes as shapes

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32

try:  # FlexAttention: a peer only where it compiles (CUDA)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    _flex = torch.compile(flex_attention) if CUDA else None
except ImportError:  # pragma: no cover - older torch
    _flex = None

# The GPU shapes live in jepa_engine/profiling/bench_shapes.py (shared with `jepa-engine ledger`).
# (name, batch, heads, N, D) for the context problem; fractions of visible keys.
CONTEXT = shapes.ATTENTION_CONTEXT if CUDA else [("tiny", 2, 2, 37, 16)]
FRACTIONS = shapes.ATTENTION_FRACTIONS if CUDA else [0.5]
FRAME = shapes.ATTENTION_FRAME if CUDA else (1, 2, 3, 6, 1, 16)  # batch, heads, frames, patches, extra, D
LONG = shapes.ATTENTION_LONG if CUDA else [(64, 1)]  # (N, batch), heads 16 (2 on CPU), D 128


def _qkv(B, H, N, D, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return [torch.randn(B, H, N, D, device=DEVICE, dtype=DTYPE, generator=g) for _ in range(3)]


def _visible(B, N, frac, seed=0):
    """Per-sample visible counts in frac +- 0.1 of N; returns (keep_index [B, Kmax] padded with -1, bool [B, N])."""
    g = torch.Generator().manual_seed(seed)
    counts = shapes.visible_counts(B, N, frac, g)
    kmax = int(counts.max())
    idx = torch.full((B, kmax), -1, dtype=torch.int32)
    pad = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        sel = torch.randperm(N, generator=g)[: counts[b]].sort().values
        idx[b, : counts[b]] = sel.int()
        pad[b, sel] = True
    return idx.to(DEVICE), pad.to(DEVICE), counts


def _flex_context_mask(pad, H, N):
    return create_block_mask(lambda b, h, q, kv: pad[b, kv], pad.shape[0], None, N, N, device=DEVICE)


def _gather_pad(k, v, idx):
    """SDPA after gather-and-pad: K/V rows of the index set copied to [B, H, Kmax, D] plus a pad mask."""
    safe = idx.clamp_min(0).long()[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
    return k.gather(2, safe), v.gather(2, safe), (idx >= 0)[:, None, None, :]


def _context_impls(q, k, v, idx, pad):
    impls = {
        "jepa_engine": lambda: masked_attention(q, k, v, keep_index=idx),
        "jepa_engine_key_padding": lambda: masked_attention(q, k, v, key_padding=pad),
        "sdpa_bool_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=pad[:, None, None, :]),
    }

    def gather_sdpa():
        kg, vg, m = _gather_pad(k, v, idx)
        return F.scaled_dot_product_attention(q, kg, vg, attn_mask=m)

    impls["sdpa_gather_pad"] = gather_sdpa
    if _flex is not None:
        bm = _flex_context_mask(pad, q.shape[1], q.shape[2])
        impls["flex_attention"] = lambda: _flex(q, k, v, block_mask=bm)
    if not CUDA:
        def ref():
            with use_backend("reference"):
                return masked_attention_reference(q, k, v, keep_index=idx)
        impls["reference"] = ref
    return impls


def _fwd_bwd(fn, leaves):
    def run():
        out = fn()
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        return grads
    return run


@pytest.mark.parametrize("impl", ["jepa_engine", "jepa_engine_key_padding", "sdpa_bool_mask", "sdpa_gather_pad",
                                  "flex_attention", "reference"])
@pytest.mark.parametrize("frac", FRACTIONS)
@pytest.mark.parametrize("name,B,H,N,D", CONTEXT)
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_context_attention(benchmark, run_bench, impl, name, B, H, N, D, frac, direction):
    q, k, v = _qkv(B, H, N, D)
    if direction == "fwd+bwd":
        for x in (q, k, v):
            x.requires_grad_(True)
    idx, pad, counts = _visible(B, N, frac)
    impls = _context_impls(q, k, v, idx, pad)
    if impl not in impls:
        pytest.skip(f"{impl} is not available on {DEVICE}")
    fn = impls[impl] if direction == "fwd" else _fwd_bwd(impls[impl], (q, k, v))
    flops = 4.0 * H * N * D * float(counts.sum()) * (1.0 if direction == "fwd" else 3.5)
    run_bench(benchmark, fn, impl="jepa_engine" if impl == "jepa_engine" else impl,
              group=f"context {direction} {name} B={B} frac={frac} {DTYPE}", flops=flops,
              shape=[B, H, N, D], visible_keys=int(counts.sum()))


@pytest.mark.parametrize("impl", ["jepa_engine", "sdpa_bool_mask", "flex_attention"])
def test_frame_causal_attention(benchmark, run_bench, impl):
    B, H, T, P, E, D = FRAME
    L = P + E
    N = T * L
    q, k, v = _qkv(B, H, N, D)
    frame = torch.arange(N, device=DEVICE) // L
    if impl == "jepa_engine":
        fn = lambda: masked_attention(q, k, v, frame_size=P, frame_extra_tokens=E)  # noqa: E731
    elif impl == "sdpa_bool_mask":
        mask = frame[None, :] <= frame[:, None]
        fn = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    else:
        if _flex is None:
            pytest.skip("flex_attention needs CUDA")
        bm = create_block_mask(lambda b, h, qi, kv: frame[kv] <= frame[qi], None, None, N, N, device=DEVICE)
        fn = lambda: _flex(q, k, v, block_mask=bm)  # noqa: E731
    visible_pairs = L * L * T * (T + 1) / 2
    run_bench(benchmark, fn, impl=impl, group=f"frame-causal fwd {T}x({P}+{E}) B={B} {DTYPE}",
              flops=4.0 * B * H * D * visible_pairs, shape=[B, H, N, D])


@pytest.mark.parametrize("impl", ["jepa_engine", "sdpa"])
@pytest.mark.parametrize("N,B", LONG)
def test_long_dense_attention(benchmark, run_bench, impl, N, B):
    H, D = (shapes.ATTENTION_LONG_HEADS, shapes.ATTENTION_LONG_HEAD_DIM) if CUDA else (2, 16)
    q, k, v = _qkv(B, H, N, D)
    fn = ((lambda: masked_attention(q, k, v)) if impl == "jepa_engine"
          else (lambda: F.scaled_dot_product_attention(q, k, v)))
    run_bench(benchmark, fn, impl=impl, group=f"dense fwd N={N} D={D} B={B} {DTYPE}",
              flops=4.0 * B * H * N * N * D, shape=[B, H, N, D])
