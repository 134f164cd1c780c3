"""The decoding baseline: a decoder-only transformer that writes a plan token by token with a KV cache.

Architecture: pre-norm blocks (LayerNorm, fused qkv Linear, PyTorch SDPA, GELU MLP), learned
positions (plus the fixed 2-D sin-cos patch positions of the world model's encoder on the prompt,
added after a LayerNorm of each patch embedding), untied output head. The prompt is a prefix of patch embeddings of the current and goal
frames, each standardised to zero mean and unit variance (see `DecoderConfig` for the layout).

Two KV-cache forms, measured side by side:
- "dynamic": eager, each layer's K/V grow by concatenation (the plain implementation);
- "static": K/V preallocated for `max_seq_len`, written in place at `input_pos`, attention masked to
  the filled positions; the one-token decode step can be compiled with
  ``torch.compile(mode="reduce-overhead", fullgraph=True)`` (CUDA graphs on a GPU; "default" mode
  on the CPU, where CUDA graphs do not exist).
Generation: one prefill over prompt + BOS, then one token per step (L reasoning tokens, then the
action tokens), greedy or sampled; tokens stay on the device (no host sync inside the loop).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from jepa_engine.models.blocks import sincos_pos_embed_2d

from .config import DecoderConfig

CACHE_FORMS = ("dynamic", "static")
NO_CACHE = object()  # a per-layer cache argument meaning "plain causal attention, leave any static cache alone"


class StaticKVCache(nn.Module):
    """K/V of one layer preallocated as [B, heads, max_len, head_dim] buffers."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device):
        super().__init__()
        shape = (batch, heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        causal = torch.ones(max_len, max_len, dtype=torch.bool, device=device).tril()
        self.register_buffer("causal", causal, persistent=False)

    def update(self, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor):
        """k, v [B, h, S, Dh] at positions input_pos [S] -> (K, V [B, h, max_len, Dh], mask [S, max_len])."""
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v, self.causal[input_pos]


class DynamicKVCache:
    """K/V of one layer grown by concatenation (eager only)."""

    def __init__(self):
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    def update(self, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor):
        if self.k is None:
            self.k, self.v = k, v
            return k, v, None  # prefill from an empty cache: plain causal attention
        self.k, self.v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        if k.shape[2] == 1:
            return self.k, self.v, None  # one new token sees every cached position
        mask = torch.arange(self.k.shape[2], device=k.device)[None, :] <= input_pos[:, None]
        return self.k, self.v, mask


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.cache = None  # a StaticKVCache when set up

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor, cache=None) -> torch.Tensor:
        # x: [B, S, D]; input_pos: [S]
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, h, S, Dh]
        cache = self.cache if cache is None else (None if cache is NO_CACHE else cache)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k, v, mask = cache.update(k, v, input_pos)
            causal = mask is None and S > 1
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.proj(out.transpose(1, 2).reshape(B, S, D))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.fc1 = nn.Linear(cfg.dim, cfg.hidden)
        self.fc2 = nn.Linear(cfg.hidden, cfg.dim)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor, cache=None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), input_pos, cache)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Decoder(nn.Module):
    """``forward(obs, goal_obs, tokens) -> logits`` (full sequence, training and reference);
    ``generate(obs, goal_obs, ...) -> tokens`` (KV cache, one token per step)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.config = cfg
        d = cfg.dim
        self.patch_embed = nn.Linear(cfg.channels * cfg.patch_size ** 2, d)
        self.patch_norm = nn.LayerNorm(d) if cfg.patch_norm else nn.Identity()
        self.frame_embed = nn.Parameter(torch.zeros(2, d))  # current frame, goal frame
        self.tok_embed = nn.Embedding(cfg.vocab_size, d)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.max_seq_len, d))
        g = cfg.image_size // cfg.patch_size
        patch_pos = sincos_pos_embed_2d(d, (g, g)) if cfg.prefix_pos == "sincos" else torch.zeros(g * g, d)
        self.register_buffer("patch_pos", patch_pos, persistent=False)   # [patches_per_frame, D], fixed
        self.blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.apply(self._init)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.frame_embed, std=0.02)
        self._static_batch: Optional[int] = None
        self._compiled_step = None

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    # ---- embeddings
    def patchify(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [B, C, H, W] -> [B, (H/p) * (W/p), C * p * p], patches in row-major order."""
        cfg = self.config
        want = (cfg.channels, cfg.image_size, cfg.image_size)
        if frames.dim() != 4 or tuple(frames.shape[1:]) != want:
            raise ValueError(f"Decoder: frames must be [B, {', '.join(map(str, want))}], got {list(frames.shape)}")
        p = cfg.patch_size
        B, C, H, W = frames.shape
        x = frames.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, (H // p) * (W // p), C * p * p)

    def embed_prompt(self, obs: torch.Tensor, goal_obs: torch.Tensor) -> torch.Tensor:
        """obs, goal_obs [B, C, H, W] -> prefix [B, P, D]."""
        dtype = self.patch_embed.weight.dtype
        pos = self.patch_pos.to(dtype)
        cur = self.patch_norm(self.patch_embed(self.patchify(standardize(obs)).to(dtype))) + self.frame_embed[0] + pos
        goal = self.patch_norm(self.patch_embed(self.patchify(standardize(goal_obs)).to(dtype))) + self.frame_embed[1] + pos
        x = torch.cat([cur, goal], dim=1)
        return x + self.pos_embed[: x.shape[1]]

    def embed_tokens(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """tokens [B, S] at positions input_pos [S] -> [B, S, D]."""
        return self.tok_embed(tokens) + self.pos_embed[input_pos]

    def trunk(self, x: torch.Tensor, input_pos: torch.Tensor, caches=None) -> torch.Tensor:
        """x [B, S, D] -> logits [B, S, V]; caches: a list of per-layer caches, or None (static/no cache)."""
        for i, blk in enumerate(self.blocks):
            x = blk(x, input_pos, caches[i] if caches is not None else None)
        return self.head(self.norm(x))

    def forward(self, obs: torch.Tensor, goal_obs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Full recomputation, no cache: tokens [B, S] (starting with BOS) -> logits [B, S, V], where
        logits[:, i] predicts tokens[:, i + 1]."""
        prefix = self.embed_prompt(obs, goal_obs)
        P, S = prefix.shape[1], tokens.shape[1]
        pos = torch.arange(P, P + S, device=tokens.device)
        x = torch.cat([prefix, self.embed_tokens(tokens, pos)], dim=1)
        return self.trunk(x, torch.arange(P + S, device=tokens.device), [NO_CACHE] * len(self.blocks))[:, P:]

    # ---- static cache
    def setup_static_cache(self, batch: int, device=None, dtype=None) -> None:
        """Preallocate every layer's K/V for `batch` sequences of `max_seq_len`."""
        cfg = self.config
        w = self.head.weight
        device, dtype = device or w.device, dtype or w.dtype
        for blk in self.blocks:
            blk.attn.cache = StaticKVCache(batch, cfg.heads, cfg.max_seq_len, cfg.dim // cfg.heads, dtype, device)
        if self._static_batch != batch:
            self._compiled_step = None
        self._static_batch = batch

    def release_static_cache(self) -> None:
        for blk in self.blocks:
            blk.attn.cache = None
        self._static_batch, self._compiled_step = None, None

    def decode_step(self, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """One token through the static cache: token [B, 1] at input_pos [1] -> logits [B, V]."""
        return self.trunk(self.embed_tokens(token, input_pos), input_pos)[:, -1]

    def compiled_decode_step(self):
        """`decode_step` under torch.compile(fullgraph=True): "reduce-overhead" (CUDA graphs) on a
        GPU, "default" on the CPU. Compiled once per static-cache setup."""
        if self._compiled_step is None:
            mode = "reduce-overhead" if self.head.weight.is_cuda else "default"
            self._compiled_step = torch.compile(self.decode_step, mode=mode, fullgraph=True)
        return self._compiled_step

    # ---- generation
    @torch.no_grad()
    def generate(self, obs: torch.Tensor, goal_obs: torch.Tensor, reasoning_tokens: int = 0, cache: str = "static",
                 compile: bool = False, greedy: bool = True, temperature: float = 1.0,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Prefill prompt + BOS, then emit L reasoning tokens and H * A action tokens one at a time.

        obs, goal_obs [B, C, H, W] -> tokens [B, L + H * A] (the action tokens are the last H * A, ids
        in [0, bins); reasoning ids in [bins, bins + reasoning_vocab)).
        """
        cfg = self.config
        if cache not in CACHE_FORMS:
            raise ValueError(f"Decoder.generate: cache must be one of {CACHE_FORMS}, got {cache!r}")
        if not (isinstance(reasoning_tokens, int) and 0 <= reasoning_tokens <= cfg.reasoning_tokens):
            raise ValueError(f"Decoder.generate: reasoning_tokens must be an int in [0, config.reasoning_tokens = "
                             f"{cfg.reasoning_tokens}], got {reasoning_tokens!r}")
        if compile and cache != "static":
            raise ValueError("Decoder.generate: compile=True needs cache='static'")
        if not greedy and not temperature > 0:
            raise ValueError(f"Decoder.generate: temperature must be > 0, got {temperature!r}")
        B, dev = obs.shape[0], obs.device
        caches = None
        if cache == "static":
            if self._static_batch != B:
                self.setup_static_cache(B)
        else:
            caches = [DynamicKVCache() for _ in self.blocks]
        prefix = self.embed_prompt(obs, goal_obs)
        P = prefix.shape[1]
        bos = torch.full((B, 1), cfg.bos_id, dtype=torch.long, device=dev)
        x = torch.cat([prefix, self.embed_tokens(bos, torch.tensor([P], device=dev))], dim=1)
        logits = self.trunk(x, torch.arange(P + 1, device=dev), caches)[:, -1]
        step = self.compiled_decode_step() if compile else self.decode_step
        L, n = reasoning_tokens, cfg.action_tokens
        out = torch.empty(B, L + n, dtype=torch.long, device=dev)
        positions = torch.arange(P + 1, P + L + n, device=dev)  # made once: no host-to-device copy per step
        for i in range(L + n):
            lo, hi = (cfg.bins, cfg.bins + cfg.reasoning_vocab) if i < L else (0, cfg.bins)
            tok = pick(logits[:, lo:hi], greedy, temperature, generator) + lo  # [B, 1]
            out[:, i] = tok[:, 0]
            if i + 1 == L + n:
                break
            pos = positions[i:i + 1]
            if caches is None:
                logits = step(tok, pos).clone()  # clone: a CUDA-graph output is overwritten by the next replay
            else:
                logits = self.trunk(self.embed_tokens(tok, pos), pos, caches)[:, -1]
        return out


def standardize(frames: torch.Tensor) -> torch.Tensor:
    """Each frame to zero mean and unit variance: the mass covers a few pixels of a dark frame, and
    unscaled its signal starts far below the position embeddings and trains slowly."""
    mean = frames.mean(dim=(1, 2, 3), keepdim=True)
    std = frames.std(dim=(1, 2, 3), keepdim=True)
    return (frames - mean) / (std + 1e-6)


def pick(logits: torch.Tensor, greedy: bool, temperature: float = 1.0,
         generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits [B, V'] -> token index [B, 1] within the slice (argmax, or a sample at `temperature`)."""
    if greedy:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
