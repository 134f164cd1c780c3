"""The benchmarks' problem shapes on a GPU, in one place: ``benches/bench_*.py`` run them (with small CPU
stand-ins where they say so) and ``jepa-engine ledger`` accounts for the kernel launches they make."""
from __future__ import annotations

from typing import Iterator

import torch

# ---- bench_masked_attention.py (bf16) -------------------------------------------------------------
# (name, batch, heads, N, D) of the JEPA context problem: ViT-B/16 and ViT-L/16 at 224 px (196 patches
# + cls); fractions of visible keys per sample (+- 0.1, see visible_counts).
ATTENTION_CONTEXT = [("vit_b", 64, 12, 197, 64), ("vit_b", 256, 12, 197, 64), ("vit_l", 64, 16, 197, 64)]
ATTENTION_FRACTIONS = [0.25, 0.5, 0.85]
# V-JEPA 2-AC frame-causal: batch, heads, frames, patches, extra (action/state) tokens per frame, D.
ATTENTION_FRAME = (4, 16, 8, 256, 2, 64)
# Long dense sequences: (N, batch) at ATTENTION_LONG_HEADS heads of ATTENTION_LONG_HEAD_DIM.
ATTENTION_LONG = [(1024, 16), (4096, 4), (16384, 1)]
ATTENTION_LONG_HEADS, ATTENTION_LONG_HEAD_DIM = 16, 128


def visible_counts(B: int, N: int, frac: float, generator: torch.Generator) -> torch.Tensor:
    """Per-sample visible key counts in ``frac +- 0.1`` of N (int64 ``[B]``), drawn from ``generator``."""
    counts = ((frac + (torch.rand(B, generator=generator) - 0.5) * 0.2).clamp(0.05, 1.0) * N).long()
    return counts.clamp(1, N)


# ---- JEPA encoders (training attention, dense, bf16): sequence lengths 196-1568, head dims 64-128 ---
# (name, batch, heads, N, D): ViT-B/16 at 224 px (I-JEPA), ViT-H/14 at 224 px (head dim 80), V-JEPA
# ViT-L/16 on 16 frames of 224 px (tubelet 2: 8 x 196 tokens), and 128-wide heads at both lengths.
ENCODER_ATTENTION = [("vit_b16", 64, 12, 196, 64), ("vit_h14", 64, 16, 256, 80), ("vjepa_l16", 16, 16, 1568, 64),
                     ("d128_n196", 64, 8, 196, 128), ("d128_n1568", 16, 8, 1568, 128)]

# ---- bench_ema.py ----------------------------------------------------------------------------------
# name: (depth, width, mlp ratio, patch size); parameter counts match timm's ViTs at 224 px.
VITS = {
    "vit_tiny": (12, 192, 4.0, 16),   # 5.5M
    "vit_small": (12, 384, 4.0, 16),  # 21.7M
    "vit_base": (12, 768, 4.0, 16),   # 85.8M
    "vit_large": (24, 1024, 4.0, 16),  # 303.3M
    "vit_huge": (32, 1280, 4.0, 14),  # 630.8M
}
EMA_DTYPES = ["fp32", "bf16"]


def vit_param_shapes(depth: int, width: int, mlp_ratio: float = 4.0, patch: int = 16,
                     img: int = 224, in_chans: int = 3) -> Iterator[tuple[int, ...]]:
    """The parameter shapes of a ViT encoder (no classifier head), in ``named_parameters`` order."""
    hidden = int(width * mlp_ratio)
    n_tokens = (img // patch) ** 2 + 1
    yield (1, 1, width)                          # cls_token
    yield (1, n_tokens, width)                   # pos_embed
    yield (width, in_chans, patch, patch)        # patch_embed.proj.weight
    yield (width,)                               # patch_embed.proj.bias
    for _ in range(depth):
        yield from [(width,), (width,)]                      # norm1
        yield from [(3 * width, width), (3 * width,)]        # attn.qkv
        yield from [(width, width), (width,)]                # attn.proj
        yield from [(width,), (width,)]                      # norm2
        yield from [(hidden, width), (hidden,)]              # mlp.fc1
        yield from [(width, hidden), (width,)]               # mlp.fc2
    yield from [(width,), (width,)]                          # final norm


# ---- bench_latent_loss.py (bf16) -------------------------------------------------------------------
# (tokens, D): I-JEPA ViT-B/H predictor targets (4 blocks x ~40 patches x batch).
LATENT_LOSS_SHAPES = [(256 * 160, 768), (128 * 160, 1280)]

# ---- bench_planning.py: CEM with an analytic cost ----------------------------------------------------
CEM_BUDGET = dict(N=300, H=5, A=2, I=30, K=30)   # LeWorldModel's CEM budget
CEM_ENVS = [1, 64]

# ---- bench_plan.py: CEM through the lewm world model -------------------------------------------------
PLAN_PRESET = "lewm"
PLAN_BUDGET = dict(N=300, H=5, I=30, K=30)
PLAN_ENVS = [1, 64]

# ---- bench_train.py: one I-JEPA step (bf16 autocast) -------------------------------------------------
TRAIN_CONFIGS = {"demo": dict(batch_size=32), "small": dict(batch_size=256)}
