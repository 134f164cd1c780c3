"""FLOP counts of one decision (multiply-adds x 2; biases and norms ignored): the world model's encoder
and predictor, a planner budget, and the decoder writing a plan token by token."""
from __future__ import annotations

import torch


def _linear_params(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def encoder_flops(model) -> int:
    """One frame through the ViT encoder and projector: 2 x linear params x tokens + attention."""
    c = model.cfg
    tokens = (c.img_size // c.patch_size) ** 2 + 1
    blocks = _linear_params(model.encoder) - _linear_params(model.encoder.proj) if hasattr(model.encoder, "proj") \
        else _linear_params(model.encoder)
    proj = _linear_params(model.encoder.proj) if hasattr(model.encoder, "proj") else 0
    return 2 * blocks * tokens + 4 * tokens * tokens * c.enc_dim * c.enc_depth + 2 * proj


def predictor_flops(model, frames: int) -> int:
    """One predictor forward over a window of `frames` frames (2 tokens each), at one candidate."""
    c = model.cfg
    S, Dp = 2 * frames, c.pred_dim
    hidden = int(Dp * c.mlp_ratio)
    blocks = c.pred_depth * (2 * S * (4 * Dp * Dp + 2 * Dp * hidden) + 4 * S * S * Dp)
    return blocks + 2 * frames * c.embed_dim * Dp * 2 + 2 * frames * _linear_params(model.action_encoder)


def planner_flops(model, samples: int, iterations: int, horizon: int) -> int:
    """N x I x H predictor forwards with a full window of `history` frames, plus the encoder once."""
    return samples * iterations * horizon * predictor_flops(model, model.cfg.history) + encoder_flops(model)


def decoder_flops(cfg, reasoning_tokens: int) -> int:
    """Prefill over P + 1 tokens, then L + H*A - 1 one-token steps at growing context."""
    d, depth = cfg.dim, cfg.depth
    mm = depth * (4 * d * d + 2 * d * cfg.hidden) + d * cfg.vocab_size
    P = cfg.prefix_len
    prefill = 2 * mm * (P + 1) + 2 * P * cfg.channels * cfg.patch_size ** 2 * d + 4 * depth * d * (P + 1) ** 2 // 2
    steps = reasoning_tokens + cfg.action_tokens - 1
    decode = sum(2 * mm + 4 * depth * d * (P + 2 + i) for i in range(steps))
    return prefill + decode
