"""EMA of a target encoder in one launch: ``target = m * target + (1 - m) * online`` for a whole list.

Math (per element, fp32 whatever the storage dtype; ``w = 1 - m`` computed in fp32)::

    w == 0 (m = 1):  target unchanged, bit for bit (the tile is written back unchanged)
    w == 1 (m = 0):  target = online (an exact copy, rounded to the target dtype)
    otherwise:       target = lerp(target, online, w)   (the two-sided form ``torch.lerp`` uses:
                     t + w (o - t) for w < 0.5, o - (o - t)(1 - w) otherwise, so both ends are exact)
    distance = sum over the averaged tensors of (target - online)^2, before the update (fp32)

The two ends are selected explicitly: ``m*t + (1-m)*o`` and ``t + (1-m)(o-t)`` both turn a target
``-0.0`` into ``+0.0`` at m = 1 and the latter does not copy exactly at m = 0 (``t + (o - t) != o``
in floating point), so neither alone gives the exact ends the EMA promises.

Shapes and dtypes: ``targets[i]`` and ``onlines[i]`` have the same shape and the same dense layout
(contiguous, or any dense layout with equal strides); targets are fp32, fp16 or bf16, onlines any of
the three, independently (bf16 online parameters with an fp32 target copy is a real case). Buffers
(BatchNorm running statistics) are copied, not averaged: floating buffers ride in the same launch as
entries with a copy flag, integer buffers (``num_batches_tracked``) take ``torch._foreach_copy_``.

Launch design. Triton pointers carry a static element type, so entries are grouped by
``(target dtype, online dtype)``; each group is ONE launch of :func:`_ema_kernel` over a device table
of the group's tensors (int64 addresses cast to typed pointers in the kernel, sizes, copy flags) and
a table of ``BLOCK``-element blocks (owner tensor, start). A homogeneous model (all fp32, or all bf16
targets with bf16 online) is one launch; a mixed list needs one launch per distinct dtype pair (plus
one per pair holding a tensor whose address is not 16-byte aligned, which runs without the
vectorisation hint). The tables are built once per parameter set and cached (:class:`EMAPlan`).
Programs are persistent (a grid sized to the machine, each program striding over the blocks), full
blocks load and store without a mask so the compiler emits 16-byte vector accesses, and the momentum
is read from a device scalar so a step can be captured in a CUDA graph. The distance is one fp32
partial per program, summed on device: no atomics, deterministic.

The op. ``jepa_engine::ema_update_`` (:data:`SCHEMA`: the lists, a one-element momentum tensor, the
distance always returned, 0 when not asked) is defined by the native library with its C++ CPU kernel
(csrc/ema.cpp: the same arithmetic bit for bit, one multi-threaded pass over every tensor) or, without
it, here; its Python kernel is the dispatch above (Triton plan on CUDA / under the interpreter, foreach
otherwise). The public :func:`ema_update_` takes the C++ kernel on plain CPU tensors (:func:`_native_runs`).
"""
from __future__ import annotations

import functools
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from . import _launch, _native, routes
from ._launch import tl, triton
from ._registry import KernelSpec, LaunchConfig, register_kernel, signature

OP = "ema_update_"
# Persistent programs per SM (8 warps each). The plain update compiles to <= 64 registers, so 4
# programs (32 warps) are resident per SM; with copy flags or the distance it takes up to 126, which
# leaves room for 2: the grid follows, so every program is resident and the blocks split evenly.
PROGRAMS_PER_SM = 4
PROGRAMS_PER_SM_HEAVY = 2
_PLAN_CACHE_SIZE = 8


# --------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------
@triton.jit
def _round_bf16(x):
    """fp32 -> bf16 rounding to nearest even, written out: the interpreter's cast truncates."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, bits >> 16, rounded)  # NaN: keep the (quiet) payload's top bits
    return rounded.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _ema_tile(t_ptrs, o_ptrs, offs, n, w, acc, is_copy,
              MASKED: tl.constexpr, DISTANCE: tl.constexpr, HAS_COPY: tl.constexpr,
              ROUND_BF16: tl.constexpr):
    if MASKED:
        ok = offs < n
        t_raw = tl.load(t_ptrs, mask=ok, other=0.0)
        o = tl.load(o_ptrs, mask=ok, other=0.0).to(tl.float32)
    else:
        t_raw = tl.load(t_ptrs)
        o = tl.load(o_ptrs).to(tl.float32)
    t = t_raw.to(tl.float32)
    d = o - t
    if DISTANCE:
        if HAS_COPY:
            acc += tl.where(is_copy, 0.0, d * d)
        else:
            acc += d * d
    wt = w
    if HAS_COPY:
        wt = tl.where(is_copy, 1.0, w)
    new = tl.where(wt < 0.5, t + wt * d, o - d * (1.0 - wt))
    new = tl.where(wt == 1.0, o, new)
    # m = 1: write back the loaded bits (a storage -> fp32 -> storage round trip is exact).
    if ROUND_BF16:
        out = tl.where(wt == 0.0, t_raw, _round_bf16(new))
    else:
        out = tl.where(wt == 0.0, t_raw, new.to(t_ptrs.dtype.element_ty))
    if MASKED:
        tl.store(t_ptrs, out, mask=ok)
    else:
        tl.store(t_ptrs, out)
    return acc


@triton.jit
def _ema_kernel(
    # tables: [n_tensors, 4] int64 (target address, online address, numel, copy flag),
    # [n_blocks, 2] int64 (owner tensor, first element); the momentum (fp32 device scalar)
    meta_ptr, blocks_ptr, momentum_ptr,
    # output: one fp32 distance partial per program
    partial_ptr,
    # sizes
    n_blocks,
    # meta-parameters
    T_DTYPE: tl.constexpr, O_DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
    HAS_COPY: tl.constexpr, DISTANCE: tl.constexpr, BLOCK: tl.constexpr,
    ROUND_BF16: tl.constexpr,  # interpreter only: round bf16 stores to nearest even by hand
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    m = tl.load(momentum_ptr).to(tl.float32)
    w = 1.0 - m  # exact for m in [0.5, 1] (Sterbenz), the range EMA momenta live in
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    lanes = tl.arange(0, BLOCK)

    # Persistent loop: program pid takes blocks pid, pid + nprog, ... (static, so deterministic).
    for b in range(pid, n_blocks, nprog):
        owner = tl.load(blocks_ptr + 2 * b)
        start = tl.multiple_of(tl.load(blocks_ptr + 2 * b + 1), BLOCK)
        row = meta_ptr + 4 * owner
        t_base = tl.load(row).to(tl.pointer_type(T_DTYPE))
        o_base = tl.load(row + 1).to(tl.pointer_type(O_DTYPE))
        n = tl.load(row + 2)
        is_copy = False
        if HAS_COPY:
            is_copy = tl.load(row + 3) != 0
        if ALIGNED:
            # The launcher checked every address of this group is 16-byte aligned: vector accesses.
            t_base = tl.multiple_of(t_base, 16)
            o_base = tl.multiple_of(o_base, 16)
        offs = start + lanes
        # Full blocks go unmasked (a mask against a runtime size would defeat vectorisation).
        if start + BLOCK <= n:
            acc = _ema_tile(t_base + offs, o_base + offs, offs, n, w, acc, is_copy,
                            False, DISTANCE, HAS_COPY, ROUND_BF16)
        else:
            acc = _ema_tile(t_base + offs, o_base + offs, offs, n, w, acc, is_copy,
                            True, DISTANCE, HAS_COPY, ROUND_BF16)

    if DISTANCE:
        tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


# --------------------------------------------------------------------------------------------------
# Plan (the cached device tables) and launcher
# --------------------------------------------------------------------------------------------------
# 4096 elements x 8 warps: 16 per thread per operand (4 x 16 B fp32 vectors, 2 for 16-bit storage).
_CONFIG = LaunchConfig({"BLOCK": 4096}, num_warps=8, num_stages=1)
# What the tuner (kernels/tuning.py) times beside it (rows: BLOCK, num_warps, num_stages; all compile
# spill-free for sm_90a and sm_80: `audit --search-space`; 32 elements per thread and operand reach the
# 255-register limit, and 8192 over 8 warps needs a stack frame). A plan is built for its config.
_SEARCH = _launch.search_space({(): _CONFIG}, {
    (): _launch.candidates("BLOCK", (2048, 4, 1), (8192, 16, 1), (1024, 2, 1)),
})
# Under the interpreter every block is a numpy step: a bigger block keeps large tests fast.
_INTERPRET_BLOCK = 1 << 15


@dataclass
class _Group:
    t_dtype: torch.dtype
    o_dtype: torch.dtype
    aligned: bool
    meta: torch.Tensor     # [n_tensors, 4] int64
    blocks: torch.Tensor   # [n_blocks, 2] int64
    n_blocks: int
    has_copy: bool
    grid: int              # programs of the plain update
    grid_heavy: int        # programs when the distance is computed
    partials: Optional[torch.Tensor] = None  # this group's slice of the plan's partials


class EMAPlan:
    """The device tables of one parameter set: built once, reused every step.

    ``pairs`` are ``(target, online, copy)`` triples of floating tensors; integer buffers are kept
    aside and copied with ``torch._foreach_copy_``. The plan holds addresses, not tensors: the
    caller keeps the tensors alive (the cache key includes every address, shape and dtype).
    """

    def __init__(self, pairs, int_buffers, device: torch.device, block: int, num_warps: int = _CONFIG.num_warps):
        self.device = device
        self.block = block
        self.num_warps = num_warps
        self.int_targets = [t for t, _ in int_buffers]
        self.int_onlines = [o for _, o in int_buffers]
        by_key: dict[tuple, list] = {}
        for t, o, copy in pairs:
            aligned = t.data_ptr() % 16 == 0 and o.data_ptr() % 16 == 0
            by_key.setdefault((t.dtype, o.dtype, aligned), []).append((t, o, copy))
        sms = _launch.num_sms(device.index or 0) if device.type == "cuda" else _launch.num_sms()
        self.groups: list[_Group] = []
        for (td, od, aligned), items in by_key.items():
            meta, blocks = [], []
            for i, (t, o, copy) in enumerate(items):
                n = t.numel()
                meta.append([t.data_ptr(), o.data_ptr(), n, int(copy)])
                blocks.extend([i, s] for s in range(0, n, block))
            n_blocks = len(blocks)
            has_copy = any(c for _, _, c in items)
            self.groups.append(_Group(
                td, od, aligned,
                torch.tensor(meta, dtype=torch.int64).to(device),
                torch.tensor(blocks, dtype=torch.int64).reshape(-1, 2).to(device),
                n_blocks, has_copy,
                max(1, min(n_blocks, sms * (PROGRAMS_PER_SM_HEAVY if has_copy else PROGRAMS_PER_SM))),
                max(1, min(n_blocks, sms * PROGRAMS_PER_SM_HEAVY))))
        self.partials = torch.zeros(max(1, sum(g.grid_heavy for g in self.groups)), dtype=torch.float32,
                                    device=device)
        self._n_partials = 0
        for g in self.groups:
            g.partials = self.partials[self._n_partials:self._n_partials + g.grid_heavy]
            self._n_partials += g.grid_heavy
        self._round_bf16 = _launch.interpreting()

    @property
    def launches(self) -> int:
        """Kernel launches per step (one per (target dtype, online dtype, alignment) group)."""
        return len(self.groups)

    def run(self, momentum: torch.Tensor, distance: bool) -> Optional[torch.Tensor]:
        for g in self.groups:
            _ema_kernel[(g.grid_heavy if distance else g.grid,)](
                g.meta, g.blocks, momentum, g.partials, g.n_blocks,
                T_DTYPE=_TL_DTYPE[g.t_dtype], O_DTYPE=_TL_DTYPE[g.o_dtype], ALIGNED=g.aligned,
                HAS_COPY=g.has_copy, DISTANCE=distance, BLOCK=self.block,
                ROUND_BF16=self._round_bf16 and g.t_dtype == torch.bfloat16,
                num_warps=self.num_warps, num_stages=_CONFIG.num_stages,
            )
        if self.int_targets:
            torch._foreach_copy_(self.int_targets, self.int_onlines)
        if not distance:
            return None
        # One partial per program of every group, summed on device (no host synchronisation).
        return self.partials.sum() if self._n_partials else self.partials.new_zeros(())


_TL_DTYPE = ({torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
             if _launch.triton_available() else {})


def _register():
    # The tensors' dtypes are constexprs (T_DTYPE, O_DTYPE): the pointers are the fixed-type tables.
    sig = signature(_ema_kernel, types={"meta_ptr": "*i64", "blocks_ptr": "*i64", "momentum_ptr": "*fp32",
                                        "partial_ptr": "*fp32"})
    names = _launch.TYPE_NAMES
    variants = {}
    for td in _launch.FLOAT_DTYPES:
        for od in _launch.FLOAT_DTYPES:
            if td != od and torch.float32 not in (td, od):
                continue  # fp16 <-> bf16 pairs compile the same code paths as the fp32 mixes
            for extra, consts in (("", {"HAS_COPY": True, "DISTANCE": True}),
                                  ("/plain", {"HAS_COPY": False, "DISTANCE": False})):
                label = f"{names[td]}<-{names[od]}{extra}"
                variants[label] = (sig, {"T_DTYPE": _TL_DTYPE[td], "O_DTYPE": _TL_DTYPE[od],
                                         "ALIGNED": True, "ROUND_BF16": False, **consts})
    register_kernel(KernelSpec("ema", _ema_kernel, variants, [_CONFIG], search_space=_SEARCH))


if _launch.triton_available():
    _register()


# --------------------------------------------------------------------------------------------------
# Reference (the specification) and the foreach fallback
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _weight(momentum: float) -> float:
    """``1 - m`` rounded the way the kernel computes it (fp32)."""
    m = torch.tensor(momentum, dtype=torch.float32)
    return float(torch.tensor(1.0, dtype=torch.float32) - m)


@torch.no_grad()
def ema_update_reference(targets, onlines, momentum, target_buffers=(), online_buffers=(),
                         return_distance: bool = False):
    """Per tensor, in fp32: ``target = lerp(target, online, 1 - m)`` with the exact ends (m = 1 leaves
    the target unchanged, m = 0 copies); buffers copied; returns sum((target - online)^2) before the
    update (fp32 scalar) when asked."""
    m = float(momentum)
    w = _weight(m)
    dist = torch.zeros((), dtype=torch.float32, device=targets[0].device if targets else "cpu")
    for t, o in zip(targets, onlines):
        t32, o32 = t.float(), o.float()
        if return_distance:
            dist += (t32 - o32).square().sum()
        if w == 0.0:
            continue
        t.copy_(o32 if w == 1.0 else torch.lerp(t32, o32, torch.tensor(w, dtype=torch.float32)))
    for t, o in zip(target_buffers, online_buffers):
        t.copy_(o)
    return dist if return_distance else None


@torch.no_grad()
def _ema_foreach(targets, onlines, m: float, target_buffers, online_buffers, distance: bool,
                 all_same: bool = False):
    """The CPU / no-Triton path: ``torch._foreach_lerp_`` per dtype group (same results as the
    reference: same fp32 weight, same exact ends)."""
    w = _weight(m)
    dist = None
    if distance:
        dist = torch.zeros((), dtype=torch.float32, device=targets[0].device if targets else "cpu")
        for t, o in zip(targets, onlines):
            dist += (t.float() - o.float()).square().sum()
    if w != 0.0:
        if all_same:
            same_t, same_o = targets, onlines
        else:
            same_t, same_o = [], []
            for t, o in zip(targets, onlines):
                if t.dtype == o.dtype:
                    same_t.append(t)
                    same_o.append(o)
                elif w == 1.0:
                    t.copy_(o)
                else:  # mixed dtypes: fp32 math, rounded once to the target dtype
                    t.copy_(torch.lerp(t.float(), o.float(), w))
        if same_t:
            if w == 1.0:
                torch._foreach_copy_(same_t, same_o)
            else:
                torch._foreach_lerp_(same_t, same_o, w)
    if target_buffers:
        torch._foreach_copy_(list(target_buffers), list(online_buffers))
    return dist


# --------------------------------------------------------------------------------------------------
# Public op: validation, plan cache, dispatch
# --------------------------------------------------------------------------------------------------
TensorList = Sequence[torch.Tensor]
_PLANS: "OrderedDict[tuple, EMAPlan]" = OrderedDict()
# foreach path: ids -> (all pairs share a dtype, weakrefs that drop the entry when a tensor dies)
_VALIDATED: "OrderedDict[tuple, tuple]" = OrderedDict()


def _fmt(shape) -> str:
    return _launch._fmt_shape(shape)


def _dense_like(t: torch.Tensor, o: torch.Tensor) -> bool:
    """Both dense (no gaps, no overlap) with the same strides, so element k of one's memory is
    element k of the other's."""
    if t.stride() != o.stride():
        return False
    if t.is_contiguous():
        return o.is_contiguous()
    span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0)
    return span == t.numel() and all(st > 0 for s, st in zip(t.shape, t.stride()) if s > 1)


def _check_lists(targets, onlines, tname: str, oname: str, floating: bool, device):
    for name, seq in ((tname, targets), (oname, onlines)):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{OP}: {name} must be a list or tuple of tensors, got {type(seq).__name__}")
    if len(targets) != len(onlines):
        raise ValueError(f"{OP}: {oname} must have one tensor per {tname} entry ({len(targets)}), "
                         f"got {len(onlines)}")
    for i, (t, o) in enumerate(zip(targets, onlines)):
        for name, x in ((f"{tname}[{i}]", t), (f"{oname}[{i}]", o)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{OP}: {name} must be a torch.Tensor, got {type(x).__name__}")
            if floating and x.dtype not in _launch.FLOAT_DTYPES:
                raise TypeError(f"{OP}: {name} must have dtype in (float32, float16, bfloat16), "
                                f"got {str(x.dtype).replace('torch.', '')}")
            if x.device != device:
                raise ValueError(f"{OP}: {name} must be on {device} like {tname}[0], got {x.device}")
        if t.shape != o.shape:
            raise ValueError(f"{OP}: {oname}[{i}] must have the shape of {tname}[{i}] {_fmt(t.shape)}, "
                             f"got {_fmt(o.shape)}")
        if t.requires_grad:
            raise ValueError(f"{OP}: {tname}[{i}] must not require grad (the target is updated in place "
                             f"by the EMA, not trained), got requires_grad=True")
        if not _dense_like(t, o):
            raise ValueError(f"{OP}: {tname}[{i}] and {oname}[{i}] must be dense with equal strides, got "
                             f"strides {tuple(t.stride())} and {tuple(o.stride())}")


def _check_momentum(momentum, device) -> None:
    if isinstance(momentum, torch.Tensor):
        if momentum.numel() != 1 or not momentum.is_floating_point():
            raise TypeError(f"{OP}: momentum tensor must be one floating element, got dtype "
                            f"{str(momentum.dtype).replace('torch.', '')} shape {_fmt(momentum.shape)}")
        if momentum.device != device:
            raise ValueError(f"{OP}: momentum tensor must be on {device} like targets, got {momentum.device}")
        if momentum.device.type != "cuda":  # reading a CUDA value would synchronise: not checked there
            _check_momentum(float(momentum), device)
        return
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"{OP}: momentum must be a float or a device scalar tensor, got {type(momentum).__name__}")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"{OP}: momentum must be in [0, 1], got {momentum}")


def plan_key(targets, onlines, target_buffers=(), online_buffers=()) -> tuple:
    """What identifies a parameter set: every address, shape and dtype (cheap enough per step)."""
    return (tuple([(t.data_ptr(), o.data_ptr(), t.shape, t.dtype, o.dtype) for t, o in zip(targets, onlines)]),
            tuple([(t.data_ptr(), o.data_ptr(), t.shape, t.dtype, o.dtype)
                   for t, o in zip(target_buffers, online_buffers)]))


def _plan_config(device: torch.device) -> LaunchConfig:
    """The launch config of a plan on ``device``: the device's tuned one on CUDA (``_launch.tuned``)."""
    return _launch.tuned("ema", (), _CONFIG) if device.type == "cuda" else _CONFIG


def get_plan(targets, onlines, target_buffers=(), online_buffers=(), *, validate: bool = True) -> EMAPlan:
    """The cached :class:`EMAPlan` of these lists (validated and built on first sight)."""
    device = targets[0].device
    # The launch config is part of the key: a tuned file or the tuner's override gives another block.
    cfg = _plan_config(device)
    key = (plan_key(targets, onlines, target_buffers, online_buffers), cfg.constexprs["BLOCK"], cfg.num_warps)
    plan = _PLANS.get(key)
    if plan is not None:
        _PLANS.move_to_end(key)
        return plan
    if validate:
        _check_lists(targets, onlines, "targets", "onlines", True, device)
        _check_lists(target_buffers, online_buffers, "target_buffers", "online_buffers", False, device)
    pairs = [(t, o, False) for t, o in zip(targets, onlines)]
    int_buffers = []
    for t, o in zip(target_buffers, online_buffers):
        if t.dtype in _launch.FLOAT_DTYPES and o.dtype in _launch.FLOAT_DTYPES:
            pairs.append((t, o, True))
        else:
            int_buffers.append((t, o))
    block = _INTERPRET_BLOCK if device.type == "cpu" else cfg.constexprs["BLOCK"]
    plan = EMAPlan([p for p in pairs if p[0].numel() > 0], int_buffers, device, block, cfg.num_warps)
    _PLANS[key] = plan
    while len(_PLANS) > _PLAN_CACHE_SIZE:
        _PLANS.popitem(last=False)
    return plan


def _route_class(targets, onlines, momentum, distance: bool) -> tuple:
    """The update's shape class in the route table (kernels/routes.py): ``"plain"`` (a float momentum, no
    distance, one dtype throughout: one ``torch._foreach_lerp_`` does it) or ``"fused"`` (what the foreach
    path cannot do in one pass without a host synchronisation: a device-tensor momentum, which CUDA graphs
    replay, the fused distance, mixed target/online dtypes)."""
    if distance or isinstance(momentum, torch.Tensor):
        return routes.ema_class(False)
    dtype = targets[0].dtype
    return routes.ema_class(all(t.dtype == dtype for t in targets) and all(o.dtype == dtype for o in onlines))


def _foreach_wins(targets, onlines, momentum, device: torch.device, distance: bool) -> bool:
    """Whether ``torch._foreach_lerp_`` takes a CUDA update: the route table says so for its class (the
    kernel measured slower than one ``_foreach_lerp_`` on an H100 at every size of the plain update), and
    no ``use_backend("triton")`` block forces the kernel."""
    if device.type != "cuda" or _launch.forced_backend() == "triton":
        return False
    return routes.row_for(OP, device, _route_class(targets, onlines, momentum, distance)).route == "torch"


def _check_targets(targets) -> None:
    if not isinstance(targets, (list, tuple)) or not targets:
        raise ValueError(f"{OP}: targets must be a non-empty list or tuple of tensors, got "
                         f"{type(targets).__name__} of length {len(targets) if hasattr(targets, '__len__') else '?'}")
    if not isinstance(targets[0], torch.Tensor):
        raise TypeError(f"{OP}: targets[0] must be a torch.Tensor, got {type(targets[0]).__name__}")


def _validate_once(targets, onlines, target_buffers, online_buffers, device) -> bool:
    """The list checks, once per set of tensor objects (they cost 3x the foreach launch on a ViT-S list);
    returns whether every target has its online's dtype. Keyed by identity (cheap); an entry is dropped as
    soon as one of its tensors dies, so a recycled id never meets a stale entry."""
    key = (tuple(map(id, targets)), tuple(map(id, onlines)), tuple(map(id, target_buffers)),
           tuple(map(id, online_buffers)))
    entry = _VALIDATED.get(key)
    if entry is None:
        _check_lists(targets, onlines, "targets", "onlines", True, device)
        _check_lists(target_buffers, online_buffers, "target_buffers", "online_buffers", False, device)
        drop = lambda _ref, key=key: _VALIDATED.pop(key, None)
        refs = [weakref.ref(x, drop) for seq in (targets, onlines, target_buffers, online_buffers) for x in seq]
        entry = (all(t.dtype == o.dtype for t, o in zip(targets, onlines)), refs)
        _VALIDATED[key] = entry
        while len(_VALIDATED) > _PLAN_CACHE_SIZE:
            _VALIDATED.popitem(last=False)
    return entry[0]


@torch.no_grad()
def _python_update(targets, onlines, momentum, target_buffers, online_buffers, distance: bool):
    """The Python paths, after the momentum check: the Triton plan (CUDA, or the interpreter) unless
    the route table sends the update to the foreach path (:func:`_route_class`), else
    ``torch._foreach_lerp_``."""
    device = targets[0].device
    shape = _route_class(targets, onlines, momentum, distance) if device.type == "cuda" else None
    if _launch.backend_for(OP, device, shape) == "triton":
        plan = get_plan(targets, onlines, target_buffers, online_buffers)
        if not isinstance(momentum, torch.Tensor):
            momentum = torch.full((1,), float(momentum), dtype=torch.float32, device=device)
        elif momentum.dtype != torch.float32:
            momentum = momentum.float()
        return plan.run(momentum.reshape(1), distance)
    all_same = _validate_once(targets, onlines, target_buffers, online_buffers, device)
    return _ema_foreach(targets, onlines, float(momentum), target_buffers, online_buffers, distance, all_same)


# --------------------------------------------------------------------------------------------------
# The op jepa_engine::ema_update_: schema defined in C++ (csrc/ema.cpp, with its CPU kernel) when the
# native library is loaded, else here. The momentum is a one-element float tensor, so a captured CUDA
# graph or an exported program reads whatever it holds when it runs; the distance is always returned, an
# fp32 scalar (0 when not asked): one fixed output type keeps the schema plain for export and tracing.
# --------------------------------------------------------------------------------------------------
SCHEMA = ("ema_update_(Tensor(a!)[] targets, Tensor[] onlines, Tensor momentum, Tensor(b!)[] target_buffers, "
          "Tensor[] online_buffers, bool return_distance) -> Tensor")


@torch.no_grad()
def _op_kernel(targets, onlines, momentum, target_buffers, online_buffers, return_distance):
    """The Python kernel of the op (CUDA tensors; CPU tensors without the C++ kernel): the checks of the
    public function, then its Python paths."""
    _check_targets(targets)
    device = targets[0].device
    _check_momentum(momentum, device)
    dist = _python_update(targets, onlines, momentum, target_buffers, online_buffers, return_distance)
    return dist if dist is not None else torch.zeros((), dtype=torch.float32, device=device)


def _op_fake(targets, onlines, momentum, target_buffers, online_buffers, return_distance):
    if not targets:
        _check_targets(targets)
    return torch.empty((), dtype=torch.float32, device=targets[0].device)


_ema_op = _native.Op(OP, SCHEMA, _op_kernel, _op_fake)


def _native_runs(t0: torch.Tensor) -> bool:
    """Whether the public op takes the C++ kernel: it is loaded, the tensors are plain CPU tensors (or
    parameters) and neither the interpreter nor ``use_backend`` claims the call. Then always: it measured
    nowhere slower than the foreach path.

    Measured with the public op both ways (momentum 0.996, calls interleaved) on a 2-core AMD EPYC VM
    (AVX2), torch 2.13, shared with other jobs, ViT-S/16 (21.7M parameters, 150 tensors) and ViT-B/16
    (85.8M, 150 tensors); foreach against C++, min / median of 40 calls at load average 2 to 4:
    the plain same-dtype update, 1 thread, is memory-bound and equal within the noise: ViT-S fp32
    17.0 / 25.3 against 16.3 / 26.1 ms, bf16 10.8 / 11.9 against 10.7 / 12.2 ms; ViT-B fp32 95 / 124
    against 93 / 125 ms, bf16 37 / 48 against 35 / 51 ms. 2 threads: ViT-S fp32 24 / 116 against
    12 / 41 ms, bf16 14 / 87 against 12 / 34 ms; ViT-B fp32 235 / 604 against 71 / 107 ms, bf16 78 / 599
    against 35 / 67 ms (the foreach path forks and joins the threads once per tensor, and a busy
    machine makes every join wait). Min of 9 at load average 5 to 10, 1 thread: with the distance ViT-S
    fp32 284 against 32 ms, ViT-B bf16 858 against 132 ms (a float copy and a sum per tensor); fp32
    targets of bf16 onlines ViT-S 123 against 39 ms, ViT-B 628 against 161 ms. Small lists (1 thread,
    min of 40): 4 tensors of 37K elements 26 against 20 us, fp32; one tensor of 100 elements 14.8
    against 11.0 us.
    """
    return (_ema_op.native and type(t0) in (torch.Tensor, torch.nn.Parameter) and t0.is_cpu
            and _native.cpu_kernel_runs())


@functools.lru_cache(maxsize=64)
def _cpu_momentum(m: float) -> torch.Tensor:
    """A float momentum as the op's one-element tensor (read-only: the op does not write it)."""
    return torch.tensor(m, dtype=torch.float32)


def _native_update(targets, onlines, momentum, target_buffers, online_buffers, distance: bool):
    """The C++ kernel. It checks every argument the way :func:`_check_lists` does, in the same order and
    with the same messages, on every call (nanoseconds a tensor in C++); what only Python can say (a list
    that is not one, an entry that is not a tensor: the dispatcher refuses those with its own words) is
    asked of :func:`_check_lists` first or when the dispatcher refuses the call."""
    device = targets[0].device
    lists = (targets, onlines, target_buffers, online_buffers)
    if not all(isinstance(x, (list, tuple)) for x in lists):
        _check_lists(targets, onlines, "targets", "onlines", True, device)
        _check_lists(target_buffers, online_buffers, "target_buffers", "online_buffers", False, device)
    if not isinstance(momentum, torch.Tensor):
        momentum = _cpu_momentum(float(momentum))
    grad = torch.is_grad_enabled()   # off around the call (the no_grad decorator costs 4 us a call)
    try:
        torch._C._set_grad_enabled(False)
        dist = _ema_op.op(targets, onlines, momentum, target_buffers, online_buffers, bool(distance))
    except RuntimeError:
        try:   # an entry that is not a tensor: the message the Python paths give
            _check_lists(targets, onlines, "targets", "onlines", True, device)
            _check_lists(target_buffers, online_buffers, "target_buffers", "online_buffers", False, device)
        except (TypeError, ValueError) as e:
            raise e from None
        raise
    finally:
        torch._C._set_grad_enabled(grad)
    return dist if distance else None


def ema_update_(targets: TensorList, onlines: TensorList, momentum: Union[float, torch.Tensor], *,
                target_buffers: TensorList = (), online_buffers: TensorList = (),
                return_distance: bool = False) -> Optional[torch.Tensor]:
    """In place: ``targets[i] = momentum * targets[i] + (1 - momentum) * onlines[i]`` for every i.

    Args:
        targets: tensors updated in place (fp32, fp16, bf16; must not require grad).
        onlines: one tensor per target, same shape and layout, any of the three float dtypes.
        momentum: a float in [0, 1], or a one-element float tensor on the targets' device (read by
            the kernel on device, so a step can be captured in a CUDA graph; its range is checked
            only where reading it is free, i.e. not on CUDA).
        target_buffers / online_buffers: copied, not averaged (BatchNorm running statistics; integer
            buffers such as ``num_batches_tracked`` included).
        return_distance: also return sum((target - online)^2) over ``targets`` before the update, an
            fp32 device scalar computed in the same pass (a cheap collapse monitor).

    On CUDA (or under ``TRITON_INTERPRET=1``) one launch per distinct (target, online) dtype pair
    updates every tensor and floating buffer; the plain same-dtype update with a float momentum takes
    ``torch._foreach_lerp_`` on CUDA, where it measured faster (kernels/routes.py). On the CPU the
    native library's C++ kernel (csrc/ema.cpp) takes the update in one multi-threaded pass, checking its
    arguments in C++ on every call; without it, ``torch._foreach_lerp_``. The device tables are cached
    per parameter set and the Python paths check the lists once per set of tensors (a cache hit skips
    the checks: they ran when it was built).
    """
    _check_targets(targets)
    device = targets[0].device
    _check_momentum(momentum, device)
    if _native_runs(targets[0]):
        return _native_update(targets, onlines, momentum, target_buffers, online_buffers, return_distance)
    return _python_update(targets, onlines, momentum, target_buffers, online_buffers, return_distance)
