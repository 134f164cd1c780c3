"""The launch/tile-work ledger: for each launch of a kernel, the work its problem needs against the work
its launch grid and tiles compute.

For a kernel and a problem shape, :func:`work_of` returns a :class:`Work`:

- ``useful_flops``: what the math needs. Kernels with ``tl.dot`` count the dots' multiply-adds
  (2 FLOPs each; norms, softmax, epilogues are not counted, as the benchmarks count them). Masked
  attention counts ``4 D`` per visible (query, key) pair forward and ``10 D`` backward (the five
  products of a FlashAttention-2 backward: S, dV, dP, dK, dQ). The bandwidth-bound kernels count their
  per-element arithmetic with the constants named in each entry.
- ``launched_flops``: the same count over what the launch computes: every program of the grid the
  launcher builds, each on whole tiles (rows and columns past the problem's edge, K chunks past K,
  the head dim padded to its power-of-two tile, key blocks a mask hides but the loop still visits,
  S and dP recomputed by the attention backward's two passes, query blocks of a short varlen sequence
  that return at once count nothing).
- ``bytes``: the minimum HBM traffic: every input element read once, every output written once (only
  the visible keys of a key-padding / index-set mask).
- ``precision``: where the FLOPs run: ``"16bit"`` (fp16/bf16 dots, tensor cores), ``"tf32"`` (fp32
  dots at TF32, tensor cores), ``"fp32"`` (IEEE fp32 dots, the window attention's per-key products and
  elementwise math: FMA units).

The launch configs come from the launchers' own tables and config functions (their CUDA entries,
also under the Triton interpreter) and the grids from the launchers' formulas, so the ledger follows
the code. A kernel joins with :func:`register_work`: its shape fields, the config its launcher picks,
and ``work(shape, config) -> Work`` (a few lines; see the entries below). A :class:`Launch` names a
kernel, a shape and a count; :func:`expand` turns a declarative list of :class:`Call` (a caller's
kernel calls with sizes as products of named symbols) into launches. Peaks and roofline times live
above this package (``jepa_engine.ledger``), which knows the hardware.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence

import torch

from . import _launch
from ._registry import LaunchConfig
# The launchers' own tables, config functions and grid helpers (the package's __init__ rebinds the
# module names to the ops, so the names are imported from the modules).
from .elite_refit import MODES as _REFIT_MODES
from .elite_refit import _config as _refit_config
from .ema import _CONFIG as _EMA_CONFIG
from .fused_linear import _cost_config, _linear_config
from .masked_attention import (_BWD_CONFIGS, _FWD_CONFIGS, _PRE_CONFIG, BWD_ALLOWS_TF32, FWD_ALLOWS_TF32, _bh_chunks,
                               _block_d, _pick_config)
from .predictor_step import _attn_config, _mlp_config
from .sample_actions import _CONFIG as _SAMPLE_CONFIG

PRECISIONS = ("16bit", "tf32", "fp32")
REQUIRED = object()   # a shape field without a default
_ELEMENT_SIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


class Work(NamedTuple):
    """The work of one launch (or of ``n`` identical ones: :meth:`times`)."""

    useful_flops: float
    launched_flops: float
    bytes: float
    precision: str

    @property
    def tensor_cores(self) -> bool:
        return self.precision in ("16bit", "tf32")

    @property
    def ratio(self) -> float:
        """launched / useful FLOPs (1.0 for no work at all, inf for work where none is needed)."""
        if self.useful_flops > 0:
            return self.launched_flops / self.useful_flops
        return 1.0 if self.launched_flops == 0 else math.inf

    def times(self, n: int) -> "Work":
        return Work(self.useful_flops * n, self.launched_flops * n, self.bytes * n, self.precision)


@dataclass(frozen=True)
class KernelWork:
    """A kernel's ledger entry: its shape fields (name -> default, or :data:`REQUIRED`), the launch
    config its launcher picks for a shape, the launch grid, and the work for a shape and that config."""

    name: str
    fields: Mapping[str, Any]
    config: Callable[[SimpleNamespace], LaunchConfig]
    work: Callable[[SimpleNamespace, LaunchConfig], Work]
    grid: Optional[Callable[[SimpleNamespace, LaunchConfig], tuple[int, ...]]] = None
    doc: str = ""


KERNEL_WORK: dict[str, KernelWork] = {}


def register_work(name: str, fields: Mapping[str, Any], config: Callable[[SimpleNamespace], LaunchConfig],
                  grid: Optional[Callable[[SimpleNamespace, LaunchConfig], tuple[int, ...]]] = None):
    """Decorator: ``work(shape, config) -> Work`` becomes the ledger entry of kernel ``name``; ``config``
    is the launcher's pick for a shape (its CUDA table), ``grid`` (when the launcher's grid is a formula
    of the shape) the grid it launches."""
    def add(fn):
        KERNEL_WORK[name] = KernelWork(name, dict(fields), config, fn, grid, (fn.__doc__ or "").strip())
        return fn
    return add


@dataclass(frozen=True)
class Launch:
    """``count`` launches of ``kernel`` on ``shape`` (a kernel without a ledger entry, e.g. a torch op,
    is listed with its count only); ``label`` says what the call is."""

    kernel: str
    shape: Mapping[str, Any] = field(default_factory=dict)
    count: int = 1
    label: str = ""


# --------------------------------------------------------------------------------------------------
# Shapes: validation and the entry points
# --------------------------------------------------------------------------------------------------
def _dtype(kernel: str, name: str, value) -> torch.dtype:
    if isinstance(value, str) and value in _launch.NAMED_DTYPES:
        return _launch.NAMED_DTYPES[value]
    if value in _ELEMENT_SIZE:
        return value
    raise ValueError(f"ledger: {kernel} shape field {name!r} must be a float dtype or one of "
                     f"{sorted(_launch.NAMED_DTYPES)}, got {value!r}")


def shape_of(kernel: str, shape: Mapping[str, Any]) -> SimpleNamespace:
    """``shape`` checked against kernel's fields (defaults filled in), as attributes."""
    entry = _entry(kernel)
    unknown = sorted(set(shape) - set(entry.fields))
    if unknown:
        raise ValueError(f"ledger: {kernel} shape has no field(s) {unknown}; its fields are {sorted(entry.fields)}")
    missing = sorted(k for k, v in entry.fields.items() if v is REQUIRED and k not in shape)
    if missing:
        raise ValueError(f"ledger: {kernel} shape needs field(s) {missing}, got {sorted(shape)}")
    out = {**{k: v for k, v in entry.fields.items() if v is not REQUIRED}, **shape}
    for name, value in out.items():
        if name == "dtype" or name.endswith("_dtype"):
            out[name] = None if value is None else _dtype(kernel, name, value)
        elif value is None or isinstance(value, (bool, str, list, tuple)):
            continue   # switches, names and per-sample counts: checked by the kernel's entry
        else:
            default = entry.fields[name]
            low = 0 if type(default) is int and default == 0 else 1   # fields defaulting to 0 may be 0
            if not (isinstance(value, int) and value >= low):
                raise ValueError(f"ledger: {kernel} shape field {name!r} must be an int >= {low}, got {value!r}")
    return SimpleNamespace(**out)


def _entry(kernel: str) -> KernelWork:
    if kernel not in KERNEL_WORK:
        raise KeyError(f"ledger: no entry for kernel {kernel!r}; kernels with entries: {sorted(KERNEL_WORK)}")
    return KERNEL_WORK[kernel]


def config_of(kernel: str, **shape) -> Optional[LaunchConfig]:
    """The launch config the kernel's launcher picks on CUDA for ``shape``."""
    return _entry(kernel).config(shape_of(kernel, shape))


def grid_of(kernel: str, **shape) -> tuple[int, ...]:
    """The grid the kernel's launcher launches on CUDA for ``shape``."""
    entry, s = _entry(kernel), shape_of(kernel, shape)
    if entry.grid is None:
        raise ValueError(f"ledger: {kernel}'s grid is not a formula of its shape (e.g. a persistent grid)")
    return entry.grid(s, entry.config(s))


def work_of(kernel: str, **shape) -> Work:
    """The :class:`Work` of one launch of ``kernel`` on ``shape`` (fields: ``KERNEL_WORK[kernel].fields``)."""
    s = shape_of(kernel, shape)
    entry = _entry(kernel)
    return entry.work(s, entry.config(s))


def has_entry(kernel: str) -> bool:
    return kernel in KERNEL_WORK


# --------------------------------------------------------------------------------------------------
# Declarative call lists
# --------------------------------------------------------------------------------------------------
class Call(NamedTuple):
    """One kernel call of a caller's loop, declared: ``scope`` names where it runs (the caller binds each
    scope to a list of symbol tables, one per time the scope runs), ``shape`` maps a field to a value,
    where a string of upper-case symbols, ints and ``*`` is a product (``"EN*L"``, ``"3*C"``), and
    ``count`` (a product as well) repeats it within one run of the scope."""

    scope: str
    kernel: str
    shape: Mapping[str, Any]
    label: str = ""
    count: str | int = 1


def evaluate(expr, symbols: Mapping[str, int]):
    """A product of symbols and ints (``"EN*L"``: upper-case names, digits and ``*``); any other value
    (a dtype, ``"fp32"``, a switch) is returned as it is."""
    if not (isinstance(expr, str) and re.fullmatch(r"[A-Z0-9_*\s]+", expr)):
        return expr
    value = 1
    for factor in expr.split("*"):
        factor = factor.strip()
        if factor.isdigit():
            value *= int(factor)
        elif factor in symbols:
            value *= int(symbols[factor])
        else:
            raise ValueError(f"ledger: unknown symbol {factor!r} in {expr!r}; known: {sorted(symbols)}")
    return value


def expand(calls: Iterable[Call], scopes: Mapping[str, Sequence[Mapping[str, int]]]) -> list[Launch]:
    """The launches of ``calls``: each call once per symbol table of its scope (a scope missing from
    ``scopes`` runs no time), its sizes evaluated there; identical launches are merged (counts added)."""
    merged: dict[tuple, Launch] = {}
    for call in calls:
        for symbols in scopes.get(call.scope, ()):
            n = evaluate(call.count, symbols)
            if n <= 0:
                continue
            shape = {k: evaluate(v, symbols) for k, v in call.shape.items()}
            key = (call.kernel, call.label, tuple(sorted((k, str(v)) for k, v in shape.items())))
            old = merged.get(key)
            merged[key] = Launch(call.kernel, shape, n + (old.count if old else 0), call.label)
    return list(merged.values())


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
cdiv = _launch.cdiv


def padded(n: int, block: int) -> int:
    """``n`` rounded up to whole blocks."""
    return cdiv(n, block) * block


def dot_class(dtype: torch.dtype, allow_tf32: bool) -> str:
    """Where a kernel's dots run: ``"16bit"``, ``"tf32"`` or ``"fp32"`` (IEEE, FMA units), by the
    project's one rule (:func:`jepa_engine.kernels._launch.dot_precision`)."""
    if dtype != torch.float32:
        return "16bit"
    return "tf32" if _launch.dot_precision(dtype, allow_tf32=allow_tf32) == "tf32" else "fp32"


def _per_sample(kernel: str, name: str, values, B: int, default: int) -> list[int]:
    if values is None:
        return [default] * B
    values = [int(v) for v in values]
    if len(values) != B or not all(0 <= v <= default for v in values):
        raise ValueError(f"ledger: {kernel} shape field {name!r} must hold B = {B} counts in [0, {default}], "
                         f"got {len(values)} values in [{min(values, default=0)}, {max(values, default=0)}]")
    return values


# --------------------------------------------------------------------------------------------------
# fused_linear, linear_goal_cost (kernels/fused_linear.py)
# --------------------------------------------------------------------------------------------------
def _c(cfg, *names) -> tuple[int, ...]:
    return tuple(cfg.constexprs[n] for n in names)


@register_work("fused_linear", dict(M=REQUIRED, K=REQUIRED, N=REQUIRED, dtype=REQUIRED, bias=True, residual=False,
                                    normalize=False, gelu=False, allow_tf32=False),
               config=lambda s: _linear_config(s.dtype, s.N, cuda=True),
               grid=lambda s, cfg: (cdiv(s.M, cfg.constexprs["BLOCK_M"]), cdiv(s.N, cfg.constexprs["BLOCK_N"])))
def _fused_linear_work(s, cfg) -> Work:
    """Grid cdiv(M, BLOCK_M) x cdiv(N, BLOCK_N), each program a K loop of BLOCK_K chunks (the layer norm's
    row statistics and the GELU are not counted)."""
    bm, bn, bk = _c(cfg, "BLOCK_M", "BLOCK_N", "BLOCK_K")
    e = _ELEMENT_SIZE[s.dtype]
    moved = e * (s.M * s.K + s.N * s.K + s.M * s.N * (2 if s.residual else 1) + (s.N if s.bias else 0))
    return Work(2.0 * s.M * s.K * s.N, 2.0 * padded(s.M, bm) * padded(s.K, bk) * padded(s.N, bn), moved,
                dot_class(s.dtype, s.allow_tf32))


@register_work("linear_goal_cost", dict(M=REQUIRED, K=REQUIRED, D=REQUIRED, dtype=REQUIRED, G=1, bias=True,
                                        allow_tf32=False),
               config=lambda s: _cost_config(s.dtype, s.D, cuda=True),
               grid=lambda s, cfg: (cdiv(s.M, cfg.constexprs["BLOCK_M"]),))
def _goal_cost_work(s, cfg) -> Work:
    """Grid cdiv(M, BLOCK_M), one BLOCK_N >= D column tile; the cost reduction is not counted."""
    bm, bn, bk = _c(cfg, "BLOCK_M", "BLOCK_N", "BLOCK_K")
    e = _ELEMENT_SIZE[s.dtype]
    moved = e * (s.M * s.K + s.D * s.K + (s.D if s.bias else 0) + s.G * s.D + s.M * s.D) + 4 * s.M
    return Work(2.0 * s.M * s.K * s.D, 2.0 * padded(s.M, bm) * padded(s.K, bk) * bn, moved,
                dot_class(s.dtype, s.allow_tf32))


# --------------------------------------------------------------------------------------------------
# masked_attention (kernels/masked_attention.py): forward, backward preprocess, backward
# --------------------------------------------------------------------------------------------------
ATTENTION_MASKS = ("dense", "key_padding", "index", "varlen")
_ATTENTION_FIELDS = dict(B=REQUIRED, H=REQUIRED, N_q=REQUIRED, N_k=REQUIRED, D=REQUIRED, dtype=REQUIRED,
                         mask="dense", frame_len=None, q_counts=None, k_counts=None, seqlens=None)


class _Sequences(NamedTuple):
    """Per (batch entry): queries, key slots the kernel visits, useful queries, visible keys."""

    n_q: list[int]
    n_k: list[int]
    q_use: list[int]
    k_use: list[int]
    max_q: int
    max_k: int


def _sequences(name: str, s) -> _Sequences:
    if s.mask not in ATTENTION_MASKS:
        raise ValueError(f"ledger: {name} shape field 'mask' must be one of {ATTENTION_MASKS}, got {s.mask!r}")
    if s.frame_len is not None and s.mask in ("key_padding", "index"):
        raise ValueError(f"ledger: {name}: frame_len with mask={s.mask!r} is not modelled (dense or varlen only)")
    if s.mask == "varlen":
        lens = _per_sample(name, "seqlens", s.seqlens, s.B, s.N_q)
        return _Sequences(lens, lens, lens, lens, max(lens), max(lens))
    q_use = _per_sample(name, "q_counts", s.q_counts, s.B, s.N_q)
    k_use = _per_sample(name, "k_counts", s.k_counts, s.B, s.N_k)
    # An index set's slots are its width N_k (the longest set); key padding visits every position.
    return _Sequences([s.N_q] * s.B, [s.N_k] * s.B, q_use, k_use, s.N_q, s.N_k)


def _visible_pairs(n_q: int, n_k: int, frame_len: Optional[int]) -> int:
    """Query i sees keys j < n_k with j // F <= i // F (every key without frames)."""
    if not frame_len:
        return n_q * n_k
    total = 0
    for f in range(cdiv(n_q, frame_len)):
        rows = min(n_q, (f + 1) * frame_len) - f * frame_len
        total += rows * min(n_k, (f + 1) * frame_len)
    return total


def _key_bound(m0: int, bm: int, n_q: int, n_k: int, frame_len: Optional[int]) -> int:
    """The launchers' loop bound ``hi``: the end of the frame of the block's last query."""
    if not frame_len:
        return n_k
    return min(n_k, ((min(m0 + bm, n_q) - 1) // frame_len + 1) * frame_len)


def _useful_pairs(seq: _Sequences, s) -> int:
    if s.mask in ("key_padding", "index"):
        return sum(q * k for q, k in zip(seq.q_use, seq.k_use))
    return sum(_visible_pairs(q, k, s.frame_len) for q, k in zip(seq.n_q, seq.n_k))


def _attention_moved(s, seq: _Sequences, outputs: int, reads: int) -> float:
    """q/o-like [.., N_q, D] tensors (``outputs`` of them) and k/v-like ones (``reads``: visible rows)."""
    e = _ELEMENT_SIZE[s.dtype]
    return e * s.H * s.D * (outputs * sum(seq.n_q) + reads * sum(seq.k_use))


def _attention_config(table, kernel: str):
    return lambda s: _pick_config(table, s.dtype, s.D, cuda=True, kernel=kernel)


def _bh(s) -> int:
    return s.B * s.H


def _max_q(s) -> int:
    return max(s.seqlens) if s.mask == "varlen" and s.seqlens else s.N_q


def _max_k(s) -> int:
    return max(s.seqlens) if s.mask == "varlen" and s.seqlens else s.N_k


@register_work("masked_attention_fwd", _ATTENTION_FIELDS,
               config=_attention_config(_FWD_CONFIGS, "masked_attention_fwd"),
               grid=lambda s, cfg: (cdiv(_max_q(s), cfg.constexprs["BLOCK_M"]), _bh(s)))
def _attention_fwd_work(s, cfg) -> Work:
    """Grid cdiv(max N_q, BLOCK_M) x B*H; each program visits key blocks up to its loop bound."""
    bm, bn = cfg.constexprs["BLOCK_M"], cfg.constexprs["BLOCK_N"]
    bd = _block_d(s.D)
    seq = _sequences("masked_attention_fwd", s)
    blocks = 0
    for n_q, n_k in zip(seq.n_q, seq.n_k):
        for m0 in range(0, seq.max_q, bm):
            if m0 < n_q:   # a program past its (varlen) sequence returns at once
                blocks += cdiv(_key_bound(m0, bm, n_q, n_k, s.frame_len), bn)
    moved = _attention_moved(s, seq, 2, 2) + 4 * s.H * sum(seq.n_q)   # q, o; k, v; lse
    return Work(4.0 * s.D * s.H * _useful_pairs(seq, s), 4.0 * bm * bn * bd * s.H * blocks, moved,
                dot_class(s.dtype, FWD_ALLOWS_TF32))


@register_work("masked_attention_bwd_pre", _ATTENTION_FIELDS,
               config=lambda s: _launch.tuned("masked_attention_bwd_preprocess", (), _PRE_CONFIG),
               grid=lambda s, cfg: (cdiv(_max_q(s), cfg.constexprs["BLOCK_M"]), _bh(s)))
def _attention_pre_work(s, cfg) -> Work:
    """delta = rowsum(dO * O): 2 FLOPs per element, grid cdiv(max N_q, BLOCK_M) x B*H, BLOCK_D columns."""
    bm, bd = cfg.constexprs["BLOCK_M"], _block_d(s.D)
    seq = _sequences("masked_attention_bwd_pre", s)
    rows = sum(sum(1 for m0 in range(0, seq.max_q, bm) if m0 < n_q) for n_q in seq.n_q) * bm
    moved = _attention_moved(s, seq, 2, 0) + 4 * s.H * sum(seq.n_q)
    return Work(2.0 * s.D * s.H * sum(seq.n_q), 2.0 * bd * s.H * rows, moved, "fp32")


@register_work("masked_attention_bwd", _ATTENTION_FIELDS,
               config=_attention_config(_BWD_CONFIGS, "masked_attention_bwd"),
               grid=lambda s, cfg: (max(cdiv(_max_q(s), cfg.constexprs["BLOCK_M"]),
                                        cdiv(_max_k(s), cfg.constexprs["BLOCK_N"])), _bh(s)))
def _attention_bwd_work(s, cfg) -> Work:
    """Grid max(cdiv(N_q, BLOCK_M), cdiv(N_k, BLOCK_N)) x B*H: program i computes dK, dV of key block i
    (four products per query block it visits) and dQ of query block i (three per key block)."""
    bm, bn = cfg.constexprs["BLOCK_M"], cfg.constexprs["BLOCK_N"]
    bd = _block_d(s.D)
    seq = _sequences("masked_attention_bwd", s)
    n_blocks = max(cdiv(seq.max_q, bm), cdiv(seq.max_k, bn))
    tiles = 0   # (query block, key block) products of BLOCK_M x BLOCK_N x BLOCK_D, 2 FLOPs per multiply-add
    for n_q, n_k in zip(seq.n_q, seq.n_k):
        for pid in range(n_blocks):
            n0, m0 = pid * bn, pid * bm
            if n0 < n_k:
                lo = (n0 // s.frame_len * s.frame_len) // bm * bm if s.frame_len else 0
                tiles += 4 * max(0, cdiv(n_q - lo, bm))
            if m0 < n_q:
                tiles += 3 * cdiv(_key_bound(m0, bm, n_q, n_k, s.frame_len), bn)
    # reads q, k, v, dO (+ lse, delta), writes dq, dk, dv
    moved = _attention_moved(s, seq, 3, 4) + 8 * s.H * sum(seq.n_q)
    return Work(10.0 * s.D * s.H * _useful_pairs(seq, s), 2.0 * bm * bn * bd * s.H * tiles, moved,
                dot_class(s.dtype, BWD_ALLOWS_TF32))


def attention_launches(direction: str = "fwd", label: str = "", count: int = 1, **shape) -> list[Launch]:
    """The launches of one ``masked_attention`` call (``direction`` ``"fwd"`` or ``"fwd+bwd"``): one per
    chunk of at most 65535 (batch, head) pairs for each kernel, as the launchers split them."""
    if direction not in ("fwd", "fwd+bwd"):
        raise ValueError(f"ledger: attention_launches direction must be 'fwd' or 'fwd+bwd', got {direction!r}")
    chunks = len(_bh_chunks(int(shape["B"]) * int(shape["H"])))
    kernels = ["masked_attention_fwd"] + (["masked_attention_bwd_pre", "masked_attention_bwd"]
                                          if direction == "fwd+bwd" else [])
    # The work of a chunked launch is that of the whole problem: counted once, launches = chunks.
    return [Launch(k, shape, count, label) if chunks == 1 else Launch(k, dict(shape, launches=chunks), count, label)
            for k in kernels]


# --------------------------------------------------------------------------------------------------
# window_attention, fused_mlp (kernels/predictor_step.py): the planners' predictor step
# --------------------------------------------------------------------------------------------------
@register_work("window_attention", dict(B=REQUIRED, L=REQUIRED, H=REQUIRED, HD=REQUIRED, dtype=REQUIRED, P=0, E=1,
                                        frame_tokens=2, last_only=False),
               config=lambda s: _attn_config(s.dtype, s.HD, cuda=True)[0],
               grid=lambda s, cfg: (cdiv(s.B if s.last_only else s.B * s.L, cfg.constexprs["BLOCK_R"]), s.H))
def _window_attention_work(s, cfg) -> Work:
    """Grid cdiv(query rows, BLOCK_R) x heads; each row walks the P prefix keys and its window's L keys one
    at a time on the FMA units (score and value update: 4 FLOPs per head column), frame-causally masked
    keys included. B candidates of L tokens, E environments sharing the prefix."""
    rows = s.B if s.last_only else s.B * s.L
    block_d = _attn_config(s.dtype, s.HD, cuda=True)[1]
    if s.last_only:
        seen = s.B * (s.P + s.L)
    else:   # query i sees the keys of frames <= its own
        seen = s.B * sum(s.P + min(s.L, (i // s.frame_tokens + 1) * s.frame_tokens) for i in range(s.L))
    launched = padded(rows, cfg.constexprs["BLOCK_R"]) * (s.P + s.L)
    e, C = _ELEMENT_SIZE[s.dtype], s.H * s.HD
    moved = e * C * (rows + 2 * s.B * s.L + 2 * s.E * s.P + rows)      # q, own k/v, prefix k/v, o
    return Work(4.0 * s.H * s.HD * seen, 4.0 * s.H * block_d * launched, moved, "fp32")


@register_work("fused_mlp", dict(M=REQUIRED, C=REQUIRED, F=REQUIRED, dtype=REQUIRED, allow_tf32=False),
               config=lambda s: _mlp_config(s.dtype, s.C, cuda=True)[0],
               grid=lambda s, cfg: (cdiv(s.M, cfg.constexprs["BLOCK_M"]),))
def _fused_mlp_work(s, cfg) -> Work:
    """Grid cdiv(M, BLOCK_M); per program the hidden in BLOCK_H chunks, each a K loop of BLOCK_K over C
    (first product) and one product into the [BLOCK_M, BLOCK_C = next_pow2(C)] output tile."""
    bm, bh, bk = _c(cfg, "BLOCK_M", "BLOCK_H", "BLOCK_K")
    block_c = _mlp_config(s.dtype, s.C, cuda=True)[1]
    m, f = padded(s.M, bm), padded(s.F, bh)
    e = _ELEMENT_SIZE[s.dtype]
    moved = e * (2 * s.M * s.C + 2 * s.C * s.F + s.F + s.C)
    return Work(4.0 * s.M * s.C * s.F, 2.0 * m * f * (padded(s.C, bk) + block_c), moved,
                dot_class(s.dtype, s.allow_tf32))


# --------------------------------------------------------------------------------------------------
# ema_update_ (kernels/ema.py)
# --------------------------------------------------------------------------------------------------
EMA_FLOPS = 3   # per element: the lerp's difference, product and sum


@register_work("ema", dict(numels=REQUIRED, dtype=REQUIRED, online_dtype=None),
               config=lambda s: _launch.tuned("ema", (), _EMA_CONFIG))
def _ema_work(s, cfg) -> Work:
    """One launch over a table of BLOCK-element blocks, cdiv(numel, BLOCK) of each tensor (a persistent
    grid strides over them); ``numels``: the tensors' element counts."""
    block = cfg.constexprs["BLOCK"]
    numels = [int(n) for n in s.numels]
    if not numels or min(numels) < 1:
        raise ValueError(f"ledger: ema shape field 'numels' must be non-empty counts >= 1, got {s.numels!r}")
    online = s.online_dtype or s.dtype
    n = sum(numels)
    moved = n * (2 * _ELEMENT_SIZE[s.dtype] + _ELEMENT_SIZE[online])
    return Work(EMA_FLOPS * n, EMA_FLOPS * sum(padded(k, block) for k in numels), moved, "fp32")


# --------------------------------------------------------------------------------------------------
# Row kernels: latent_loss forward/backward, latent_cost (kernels/_launch.ROW_TILES)
# --------------------------------------------------------------------------------------------------
LOSS_FWD_FLOPS = 4   # per element: difference, |x| (or square), the smooth-L1 branch, sum
LOSS_BWD_FLOPS = 3   # per element: difference, derivative, scale
COST_FLOPS = 3       # per element: difference, square (or |x|), sum


def _row_work(rows: int, D: int, cfg, per_element: int) -> tuple[float, float]:
    bm, bd = cfg.constexprs["BLOCK_M"], cfg.constexprs["BLOCK_D"]
    return float(per_element * rows * D), float(per_element * padded(rows, bm) * padded(D, bd))


@register_work("latent_loss_fwd", dict(M=REQUIRED, D=REQUIRED, dtype=REQUIRED, mask=True),
               config=lambda s: _launch.row_tile(s.D, "latent_loss_fwd"),
               grid=lambda s, cfg: (cdiv(s.M, cfg.constexprs["BLOCK_M"]),))
def _loss_fwd_work(s, cfg) -> Work:
    """Grid cdiv(M, BLOCK_M), a loop of BLOCK_D chunks over D; reads pred, target, keep; one fp32 per row."""
    useful, launched = _row_work(s.M, s.D, cfg, LOSS_FWD_FLOPS)
    return Work(useful, launched, 2 * _ELEMENT_SIZE[s.dtype] * s.M * s.D + s.M * (4 + s.mask), "fp32")


@register_work("latent_loss_bwd", dict(M=REQUIRED, D=REQUIRED, dtype=REQUIRED, mask=True, grad_target=False),
               config=lambda s: _launch.row_tile(s.D, "latent_loss_bwd"),
               grid=lambda s, cfg: (cdiv(s.M, cfg.constexprs["BLOCK_M"]),))
def _loss_bwd_work(s, cfg) -> Work:
    """Grid cdiv(M, BLOCK_M); reads pred, target, keep; writes grad_pred (and grad_target)."""
    useful, launched = _row_work(s.M, s.D, cfg, LOSS_BWD_FLOPS)
    tensors = 4 if s.grad_target else 3
    return Work(useful, launched, tensors * _ELEMENT_SIZE[s.dtype] * s.M * s.D + s.M * s.mask, "fp32")


@register_work("latent_cost", dict(B=REQUIRED, H=REQUIRED, D=REQUIRED, dtype=REQUIRED, G=1, final=True),
               config=lambda s: _launch.row_tile(s.D, "latent_cost_fwd"),
               grid=lambda s, cfg: (cdiv(s.B, cfg.constexprs["BLOCK_M"]),))
def _latent_cost_work(s, cfg) -> Work:
    """Grid cdiv(B, BLOCK_M); each program sweeps D in BLOCK_D chunks for the last step (``final``) or
    every step."""
    steps = 1 if s.final else s.H
    useful, launched = _row_work(s.B, s.D, cfg, COST_FLOPS)
    return Work(useful * steps, launched * steps, _ELEMENT_SIZE[s.dtype] * (s.B * steps + s.G) * s.D + 4 * s.B, "fp32")


# --------------------------------------------------------------------------------------------------
# Planner kernels: sample_actions, elite_refit
# --------------------------------------------------------------------------------------------------
SAMPLE_FLOPS = 8     # per value: Box-Muller (log, sqrt, cos, products), mean + std * z, two clamps
REFIT_RANK_FLOPS = 4  # per (candidate, candidate) comparison of the CEM ranks: two compares, select, sum
REFIT_MOMENT_FLOPS = 5  # per (candidate, parameter): w x, w x x, two sums


@register_work("sample_actions", dict(E=REQUIRED, N=REQUIRED, P=REQUIRED),
               config=lambda s: _launch.tuned("sample_actions", (), _SAMPLE_CONFIG),
               grid=lambda s, cfg: (s.E, cdiv(s.N * s.P, cfg.constexprs["BLOCK"])))
def _sample_work(s, cfg) -> Work:
    """Grid E x cdiv(N * P, BLOCK): one value per lane; writes fp32 [E, N, P], reads mean and std."""
    block = cfg.constexprs["BLOCK"]
    return Work(float(SAMPLE_FLOPS * s.E * s.N * s.P), float(SAMPLE_FLOPS * s.E * padded(s.N * s.P, block)),
                4 * s.E * (s.N * s.P + 2 * s.P), "fp32")


@register_work("elite_refit", dict(E=REQUIRED, N=REQUIRED, P=REQUIRED, dtype="fp32", mode="cem"),
               config=lambda s: _refit_config(s.P), grid=lambda s, cfg: (s.E,))
def _refit_work(s, cfg) -> Work:
    """Grid E: per environment the CEM ranks as an N x N comparison in BLOCK_N x BLOCK_N tiles (MPPI: two
    passes of exponentials over N) and the weighted moments in BLOCK_N x BLOCK_P tiles."""
    bn, bp = cfg.constexprs["BLOCK_N"], cfg.constexprs["BLOCK_P"]
    if s.mode not in _REFIT_MODES:
        raise ValueError(f"ledger: elite_refit shape field 'mode' must be one of {_REFIT_MODES}, got {s.mode!r}")
    n_pad = padded(s.N, bn)
    rank = (REFIT_RANK_FLOPS * s.N * s.N, REFIT_RANK_FLOPS * n_pad * n_pad) if s.mode == "cem" else (4 * s.N, 4 * n_pad)
    useful = rank[0] + REFIT_MOMENT_FLOPS * s.N * s.P
    launched = rank[1] + REFIT_MOMENT_FLOPS * n_pad * padded(s.P, bp)
    moved = s.E * (8 * s.N + _ELEMENT_SIZE[s.dtype] * s.N * s.P + 16 * s.P + 12)
    return Work(float(s.E * useful), float(s.E * launched), moved, "fp32")


# --------------------------------------------------------------------------------------------------
# Summing launches
# --------------------------------------------------------------------------------------------------
def account(launch: Launch) -> Optional[Work]:
    """The work of ``launch`` (all ``count`` times), or None for a kernel without a ledger entry."""
    if not has_entry(launch.kernel):
        return None
    shape = {k: v for k, v in launch.shape.items() if k != "launches"}
    return work_of(launch.kernel, **shape).times(launch.count)


def launches_of(launch: Launch) -> int:
    """Kernel launches ``launch`` stands for (a chunked attention launch is several)."""
    return int(launch.shape.get("launches", 1)) * launch.count
