"""`DecoderConfig`: the decoding baseline's shape, its prompt layout and action vocabulary, with presets.

The token sequence of one decision (P = prefix_len, L = reasoning tokens, n = horizon * action_dim):

    [patches of the current frame | patches of the goal frame]   P continuous prefix embeddings
    BOS                                                         1 token
    r_1 ... r_L                                                 "reasoning" tokens (free text; untrained)
    a_1 ... a_n                                                 action tokens, step-major: (t0 d0, t0 d1, t1 d0, ...)

Vocabulary: ids [0, bins) are action bins, [bins, bins + reasoning_vocab) reasoning tokens, then BOS.
Positions are learned, one table of `max_seq_len` rows for the whole sequence; with
`prefix_pos = "sincos"` (the default) the patch embeddings of each frame also get the fixed 2-D
sin-cos positions of the world model's ViT encoder (a buffer: no parameters), so where the mass is
reaches the decoder from the first step instead of through a table learned from 0.02-scale noise.
With `patch_norm` (the default) each patch embedding is layer-normalised before the positions are
added: a standardised frame puts values near 10 on the few pixels of the mass, and unnormalised the
mass's patch embedding drowns its own position, the one position the decision needs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from jepa_engine.config import ConfigIO


PREFIX_POS = ("sincos", "learned")


@dataclass
class DecoderConfig(ConfigIO):
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    image_size: int = 64           # frames are image_size x image_size (the world's observation size)
    channels: int = 1
    patch_size: int = 8            # linear patch embedding of non-overlapping patch_size^2 patches
    action_dim: int = 2
    horizon: int = 5               # H: actions per decision
    bins: int = 32                 # uniform bins per action dimension (see ActionTokenizer)
    low: float = -1.0              # action bounds
    high: float = 1.0
    reasoning_vocab: int = 64
    reasoning_tokens: int = 0      # the largest L the position table supports
    prefix_pos: str = "sincos"     # "sincos": fixed 2-D patch positions added to the prefix; "learned": the table only
    patch_norm: bool = True        # LayerNorm on each patch embedding before the positions are added

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"DecoderConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        for name in ("dim", "depth", "heads", "image_size", "patch_size", "action_dim", "horizon", "reasoning_vocab"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "an int >= 1")
        need(isinstance(self.bins, int) and self.bins >= 2, "bins", "an int >= 2")
        need(isinstance(self.reasoning_tokens, int) and self.reasoning_tokens >= 0, "reasoning_tokens", "an int >= 0")
        need(self.dim % self.heads == 0, "heads", f"a divisor of dim = {self.dim}")
        need(self.mlp_ratio > 0, "mlp_ratio", "> 0")
        need(self.channels in (1, 3), "channels", "1 or 3")
        need(self.image_size % self.patch_size == 0, "patch_size", f"a divisor of image_size = {self.image_size}")
        need(self.low < self.high, "high", f"> low = {self.low}")
        need(self.prefix_pos in PREFIX_POS, "prefix_pos", f"one of {PREFIX_POS}")
        need(self.prefix_pos != "sincos" or self.dim % 4 == 0, "dim", "divisible by 4 with prefix_pos='sincos'")

    # ---- derived sizes
    @property
    def patches_per_frame(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def prefix_len(self) -> int:
        return 2 * self.patches_per_frame

    @property
    def action_tokens(self) -> int:
        return self.horizon * self.action_dim

    @property
    def vocab_size(self) -> int:
        return self.bins + self.reasoning_vocab + 1

    @property
    def bos_id(self) -> int:
        return self.vocab_size - 1

    @property
    def max_seq_len(self) -> int:
        return self.prefix_len + 1 + self.reasoning_tokens + self.action_tokens

    @property
    def hidden(self) -> int:
        return int(self.dim * self.mlp_ratio)

    def num_params(self) -> int:
        """Exact parameter count of `Decoder(self)` (checked against the module in the tests)."""
        d, h, V = self.dim, self.hidden, self.vocab_size
        patch = self.channels * self.patch_size ** 2 * d + d + (2 * d if self.patch_norm else 0)
        embeds = 2 * d + V * d + self.max_seq_len * d
        block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * h + h) + (h * d + d)
        return patch + embeds + self.depth * block + 2 * d + d * V

    # ---- presets
    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        """"tiny", "small", "demo", "lewm" (about 15M parameters)."""
        return PRESETS

    @classmethod
    def matched(cls, n_params: int, **overrides: Any) -> "DecoderConfig":
        """The (dim, depth) whose parameter count is closest to `n_params` (log scale), with dim a
        multiple of 32, heads = max(2, dim / 64), depth >= 2 and a width/depth ratio of at most 128; other
        fields from `overrides` (they count: image size, horizon, reasoning_tokens change the embeddings).

        Depth >= 2 and two heads: the decision compares two frames (where the mass is, where the goal
        is); one layer with one head can only read a mix of the two, so a one-layer decoder is not a fair
        baseline however well its size matches."""
        if not (isinstance(n_params, int) and n_params >= 1):
            raise ValueError(f"DecoderConfig.matched: n_params must be an int >= 1, got {n_params!r}")
        base = cls(**{k: v for k, v in overrides.items() if k not in ("dim", "depth", "heads")})
        best, best_err = None, math.inf
        for dim in range(32, 8192 + 1, 32):
            heads = max(2, dim // 64)
            if dim % heads:
                continue
            for depth in range(max(2, math.ceil(dim / 128)), max(2, min(96, dim // 32)) + 1):
                cfg = replace(base, dim=dim, depth=depth, heads=heads)
                err = abs(math.log(cfg.num_params() / n_params))
                if err < best_err:
                    best, best_err = cfg, err
        return best

    @classmethod
    def sweep(cls, n_params: int, factors: tuple[float, ...] = (1.0, 10.0, 100.0), **overrides: Any
              ) -> dict[str, "DecoderConfig"]:
        """Configs matched to `n_params` times each factor: {"1x": ..., "10x": ..., "100x": ...}."""
        return {f"{f:g}x": cls.matched(int(round(n_params * f)), **overrides) for f in factors}


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"dim": 64, "depth": 2, "heads": 2, "image_size": 32, "patch_size": 8, "horizon": 2, "bins": 16},
    "small": {"dim": 128, "depth": 4, "heads": 4},
    "demo": {"dim": 192, "depth": 4, "heads": 3},
    "lewm": {"dim": 384, "depth": 8, "heads": 6},     # about 15M parameters: LeWorldModel scale
}
