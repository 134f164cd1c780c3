"""Tune the kernels' launch configs on this GPU: ``python -m jepa_engine.kernels.tuning --out DIR --budget-s S``.

For every kernel with a search space (``KernelSpec.search_space``: per launch-table key, the table's
config and a few candidates, all compiled spill-free for sm_90a and sm_80 by ``audit --search-space``)
and every key, the tuner runs each candidate at the benchmark shapes of that key (those of
benches/bench_*.py: masked attention at I-JEPA / V-JEPA shapes, the ``lewm`` plan's linear layers and
goal cost at E=1 and E=64, EMA of ViT-B and ViT-H, the latent loss at I-JEPA predictor sizes, the
planner's sampling, refit and cost), checks that it computes what the table's config computes (the
same outputs within the dtype's tolerance, bit for bit where the outputs are integers or drawn
samples), times it with CUDA events (median of repetitions of about 20 ms, the L2 cache flushed before
each one for the bandwidth-bound EMA) and writes ``DIR/<device>.json`` (:mod:`._configs` reads it; the
launchers take its configs before their tables). Per (kernel, table key, shape) the file records every
candidate's time, the winner and the table's time; per key the chosen config: the candidate with the
lowest geometric mean of (time / table time) over the key's shapes, where it is at least
:data:`MIN_GAIN` faster, else the table's own.

Within a budget (``--budget-s``, counted from the tuner's start): the groups (kernel, key) run in
:data:`PRIORITY` order, those the existing file has not measured completely first; the file is rewritten
after every group, so a run stopped anywhere keeps what it measured, and a group cut short keeps the
candidates measured at all of its shapes. An existing ``DIR/<device>.json`` is the base: its other
entries stay (``--fresh`` starts empty). Compiling the candidates dominates a cold run, so worker
processes (``--workers``, default: CPUs - 2, at most 12) compile them ahead into Triton's cache in the
order they are timed, while this process times them one after another on the otherwise idle GPU.

``--interpret`` (with ``TRITON_INTERPRET=1``, no GPU) rehearses the whole path on tiny CPU shapes with
a CPU clock: its numbers mean nothing, its file is named for ``cpu-interpreter``. ``--list`` prints the
groups, candidates and shapes and exits. A kernel added later needs two things here: a search space on
its ``KernelSpec`` and a case builder (``@cases_for("kernel")``, a few lines), plus a place in
:data:`PRIORITY` if it should come early.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from . import _configs
from ._launch import use_backend
from .precision import matmul_precision
from ._registry import KERNELS, LaunchConfig, key_label

MIN_GAIN = 0.03            # a candidate replaces the table's config only when this much faster
TARGET_S = 0.02            # timed repetitions per measurement (seconds of GPU time, about)
WAIT_COMPILED_S = 30.0     # how long the timing waits for a worker to finish compiling an item
INTERPRETER_DEVICE = "cpu-interpreter"
# Groups first in this order (what the benchmarks and the planner run most); the others follow in the
# registry's order.
PRIORITY = [
    ("masked_attention_fwd", ("16bit", 64)), ("masked_attention_bwd", ("16bit", 64)),
    ("fused_linear", ("fp32", 128)), ("linear_goal_cost", ("fp32", 256)),
    ("latent_loss_fwd", (256,)), ("latent_loss_bwd", (256,)), ("ema", ()),
    ("masked_attention_fwd", ("16bit", 128)), ("masked_attention_bwd", ("16bit", 128)),
    ("latent_cost_fwd", (256,)), ("elite_refit", (16,)), ("sample_actions", ()),
    ("fused_linear", ("16bit", 128)), ("linear_goal_cost", ("16bit", 256)),
    ("masked_attention_bwd_preprocess", ()),
]


# --------------------------------------------------------------------------------------------------
# Cases: the shapes each (kernel, key) is timed at
# --------------------------------------------------------------------------------------------------
Run = Callable[[], Any]


@dataclass
class Case:
    """One problem of a group: ``make()`` allocates its inputs and returns ``(run, check)``: ``run`` is
    timed, ``check`` returns the outputs compared between candidates (often ``run`` itself)."""

    shape: str
    make: Callable[[], tuple[Run, Run]]
    flush_l2: bool = False       # bandwidth-bound: each repetition starts from a cold L2
    precompile: bool = True      # the workers may compile it (False: its inputs are too big to copy 12x)


@dataclass
class Group:
    kernel: str
    key: tuple
    candidates: tuple[LaunchConfig, ...]
    cases: list[Case]

    @property
    def label(self) -> str:
        return f"{self.kernel} {key_label(self.key)}"


CASES: dict[str, Callable[[torch.device, bool], dict[tuple, list[Case]]]] = {}


def cases_for(*kernels: str):
    """Register a case builder ``fn(device, tiny) -> {table key: [Case, ...]}`` for these kernels
    (``tiny``: the interpreter rehearsal's CPU shapes; return only the keys that have them)."""
    def register(fn):
        for k in kernels:
            CASES[k] = fn if len(kernels) == 1 else (lambda device, tiny, _k=k: fn(device, tiny, _k))
        return fn
    return register


def _gen(device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(0)


def _randn(*shape, device, dtype=torch.float32, scale=1.0, g=None) -> torch.Tensor:
    return (torch.randn(*shape, device=device, generator=g or _gen(device)) * scale).to(dtype)


def _triton(fn: Callable) -> Run:
    """``fn`` on the Triton kernels whatever the route table says (the tuner times the kernels)."""
    def run():
        with use_backend("triton"):
            return fn()
    return run


def _visible(B: int, N: int, frac: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep_index [B, K] int32 padded with -1, key_padding bool [B, N]): about ``frac`` of each
    sample's keys visible (frac +- 0.1, as benches/bench_masked_attention.py draws them)."""
    g = torch.Generator().manual_seed(0)
    counts = ((frac + (torch.rand(B, generator=g) - 0.5) * 0.2).clamp(0.05, 1.0) * N).long().clamp(1, N)
    order = torch.rand(B, N, generator=g).argsort(dim=1)
    kmax = int(counts.max())
    idx = order[:, :kmax].sort(dim=1).values
    slot = torch.arange(kmax)[None, :]
    idx = torch.where(slot < counts[:, None], idx, -1).to(torch.int32)
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad.scatter_(1, idx.clamp_min(0).long(), (idx >= 0))
    return idx.to(device), pad.to(device)


def _attention_case(shape: str, B: int, H: int, N: int, D: int, dtype, mask: str, device, backward: bool,
                    frac: float = 0.5, frame: tuple[int, int] = (256, 2)) -> Case:
    from .masked_attention import masked_attention

    def make():
        g = _gen(device)
        q, k, v = (_randn(B, H, N, D, device=device, dtype=dtype, g=g) for _ in range(3))
        kw: dict = {}
        if mask in ("index", "padding"):
            idx, pad = _visible(B, N, frac, device)
            kw = {"keep_index": idx} if mask == "index" else {"key_padding": pad}
        elif mask == "frame":
            kw = {"frame_size": frame[0], "frame_extra_tokens": frame[1]}
        if not backward:
            run = _triton(lambda: masked_attention(q, k, v, **kw))
            return run, run
        for x in (q, k, v):
            x.requires_grad_(True)
        with use_backend("triton"):
            out = masked_attention(q, k, v, **kw)
        grad = _randn(*out.shape, device=device, dtype=dtype, g=g)
        run = _triton(lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True))
        return run, run

    return Case(shape, make)


def _attention_cases(device, tiny: bool, kernel: str) -> dict[tuple, list[Case]]:
    if tiny:
        return {}
    bwd = kernel != "masked_attention_fwd"
    bf16, fp32 = torch.bfloat16, torch.float32
    c = lambda *a, **kw: _attention_case(*a, device=device, backward=bwd, **kw)  # noqa: E731
    return {
        # I-JEPA context attention (ViT-B/16, 224 px, half the keys visible), V-JEPA 2-AC frame-causal
        ("16bit", 64): [c("vit_b B=64 N=197 D=64 index bf16", 64, 12, 197, 64, bf16, "index"),
                        c("vit_b B=64 N=197 D=64 key_padding bf16", 64, 12, 197, 64, bf16, "padding"),
                        c("frame-causal 8x(256+2) B=4 H=16 D=64 bf16", 4, 16, 8 * 258, 64, bf16, "frame")],
        # ViT-H/14 head dim 80 in the 128 tile; long dense sequences at head dim 128
        ("16bit", 128): [c("vit_h B=32 N=257 D=80 key_padding bf16", 32, 16, 257, 80, bf16, "padding"),
                         c("dense N=2048 B=4 H=16 D=128 bf16", 4, 16, 2048, 128, bf16, "dense")],
        ("16bit", 256): [c("dense N=1024 B=4 H=8 D=256 bf16", 4, 8, 1024, 256, bf16, "dense")],
        ("fp32", 64): [c("vit_b B=64 N=197 D=64 index fp32", 64, 12, 197, 64, fp32, "index")],
        ("fp32", 128): [c("dense N=1024 B=4 H=8 D=128 fp32", 4, 8, 1024, 128, fp32, "dense")],
        ("fp32", 256): [c("dense N=512 B=2 H=8 D=256 fp32", 2, 8, 512, 256, fp32, "dense")],
    }


cases_for("masked_attention_fwd", "masked_attention_bwd")(_attention_cases)


@cases_for("masked_attention_bwd_preprocess")
def _preprocess_cases(device, tiny: bool) -> dict[tuple, list[Case]]:
    if tiny:
        return {}
    return {(): [_attention_case("vit_b B=64 N=197 D=64 index bf16 (backward)", 64, 12, 197, 64, torch.bfloat16,
                                 "index", device, backward=True)]}


def _linear_case(shape: str, M: int, K: int, N: int, dtype, device, normalize=False, gelu=False,
                 residual=False, tf32=False) -> Case:
    """``tf32``: fp32 dots as TF32 (``torch.backends.cuda.matmul.allow_tf32``, as the planners' default
    precision on CUDA runs them)."""
    from .fused_linear import fused_linear

    def make():
        g = _gen(device)
        x = _randn(M, K, device=device, dtype=dtype, g=g)
        w = _randn(N, K, device=device, dtype=dtype, scale=K ** -0.5, g=g)
        b = _randn(N, device=device, dtype=dtype, g=g)
        r = _randn(M, N, device=device, dtype=dtype, g=g) if residual else None
        linear = _triton(lambda: fused_linear(x, w, b, normalize=normalize, activation="gelu" if gelu else None,
                                              residual=r))

        def run():
            with matmul_precision("tf32") if tf32 else contextlib.nullcontext():
                return linear()
        return run, run

    return Case(shape, make)


@cases_for("fused_linear")
def _fused_linear_cases(device, tiny: bool) -> dict[tuple, list[Case]]:
    if tiny:
        return {}
    out = {}
    # The lewm predictor (width 384, MLP 1536, qkv 1152) at N=300 candidates: E=1 over a 6-token window,
    # E=64 on the last row.
    for cls, dt in (("fp32", torch.float32), ("16bit", torch.bfloat16)):
        name = "fp32" if dt == torch.float32 else "bf16"
        lin = lambda s, *a, **kw: _linear_case(f"{s} {name}", *a, dt, device, **kw)  # noqa: E731
        out[(cls, 128)] = [lin("qkv M=1800 K=384 N=1152 ln", 1800, 384, 1152, normalize=True),
                           lin("fc1 M=19200 K=384 N=1536 ln+gelu", 19200, 384, 1536, normalize=True, gelu=True),
                           lin("fc2 M=19200 K=1536 N=384 +res", 19200, 1536, 384, residual=True)]
        if dt == torch.float32:
            out[(cls, 128)].append(lin("fc1 M=19200 K=384 N=1536 ln+gelu tf32", 19200, 384, 1536, normalize=True,
                                       gelu=True, tf32=True))
        out[(cls, 64)] = [lin("M=19200 K=192 N=64 ln", 19200, 192, 64, normalize=True)]
    return out


def _cost_case(shape: str, M: int, K: int, D: int, G: int, dtype, device) -> Case:
    from .fused_linear import linear_goal_cost

    def make():
        g = _gen(device)
        x = _randn(M, K, device=device, dtype=dtype, g=g)
        w = _randn(D, K, device=device, dtype=dtype, scale=K ** -0.5, g=g)
        b = _randn(D, device=device, dtype=dtype, g=g)
        goal = _randn(G, D, device=device, dtype=dtype, g=g)
        run = _triton(lambda: linear_goal_cost(x, w, b, goal, normalize=True))
        return run, run

    return Case(shape, make)


@cases_for("window_attention")
def _window_attention_cases(device, tiny: bool) -> dict[tuple, list[Case]]:
    """The lewm plan's windows (300 candidates, 6 tokens, 6 heads of 64) at E=1 and E=64, with the shared
    prefix of 4 tokens, at fp32 (the tf32 plan: attention on FMA units either way) and bf16."""
    if tiny:
        return {}
    from .predictor_step import window_attention

    def case(shape: str, E: int, dtype, last: bool) -> Case:
        def make():
            g = _gen(device)
            qkv = _randn(E * 300 * 6, 3 * 384, device=device, dtype=dtype, g=g)
            prefix = _randn(E, 4, 2 * 384, device=device, dtype=dtype, g=g)
            run = _triton(lambda: window_attention(qkv, prefix, heads=6, window=6, last_only=last))
            return run, run
        return Case(shape, make)

    out = {}
    for cls, dt, name in (("fp32", torch.float32, "fp32"), ("16bit", torch.bfloat16, "bf16")):
        out[(cls, 64)] = [case(f"lewm E={E} {name}{' last row' if last else ''}", E, dt, last)
                          for E in (1, 64) for last in (False, True)]
    return out


@cases_for("fused_mlp")
def _fused_mlp_cases(device, tiny: bool) -> dict[tuple, list[Case]]:
    """The lewm predictor's MLP (384 -> 1536 -> 384) over the 1800 window rows of E=1 and the 19200 of
    E=64, at tf32 and bf16 (its C=384 takes the 512-wide tile, whose table entry is the only candidate)."""
    if tiny:
        return {}
    from .predictor_step import fused_mlp

    def case(shape: str, M: int, C: int, dtype, tf32: bool = False) -> Case:
        def make():
            g = _gen(device)
            x = _randn(M, C, device=device, dtype=dtype, g=g)
            w1 = _randn(4 * C, C, device=device, dtype=dtype, scale=C ** -0.5, g=g)
            b1 = _randn(4 * C, device=device, dtype=dtype, g=g)
            w2 = _randn(C, 4 * C, device=device, dtype=dtype, scale=(4 * C) ** -0.5, g=g)
            b2 = _randn(C, device=device, dtype=dtype, g=g)

            def run():
                with matmul_precision("tf32" if tf32 else "fp32"), use_backend("triton"):
                    return fused_mlp(x, w1, b1, w2, b2)
            return run, run
        return Case(shape, make)

    return {("16bit", 128): [case("demo-width M=19200 C=128 bf16", 19200, 128, torch.bfloat16)],
            ("16bit", 256): [case("M=19200 C=256 bf16", 19200, 256, torch.bfloat16)],
            ("fp32", 128): [case("demo-width M=19200 C=128 tf32", 19200, 128, torch.float32, tf32=True)]}


@cases_for("linear_goal_cost")
def _goal_cost_cases(device, tiny: bool) -> dict[tuple, list[Case]]:
    if tiny:
        return {}
    out = {}
    for cls, dt in (("fp32", torch.float32), ("16bit", torch.bfloat16)):
        name = "fp32" if dt == torch.float32 else "bf16"
        # the lewm output projection (384 -> 192) and its goal distance, E=1 and E=64 (N=300)
        out[(cls, 256)] = [_cost_case(f"lewm out M=300 K=384 D=192 G=1 {name}", 300, 384, 192, 1, dt, device),
                           _cost_case(f"lewm out M=19200 K=384 D=192 G=64 {name}", 19200, 384, 192, 64, dt, device)]
        out[(cls, 128)] = [_cost_case(f"M=19200 K=256 D=128 G=64 {name}", 19200, 256, 128, 64, dt, device)]
        out[(cls, 64)] = [_cost_case(f"M=19200 K=128 D=64 G=64 {name}", 19200, 128, 64, 64, dt, device)]
    return out


def _loss_case(shape: str, M: int, D: int, dtype, device, backward: bool) -> Case:
    from .latent_loss import latent_loss

    def make():
        g = _gen(device)
        pred = _randn(M, D, device=device, dtype=dtype, g=g)
        target = _randn(M, D, device=device, dtype=dtype, g=g)
        mask = torch.rand(M, device=device, generator=g) < 0.9
        if not backward:
            run = _triton(lambda: latent_loss(pred, target, mask))
            return run, run
        pred.requires_grad_(True)
        with use_backend("triton"):
            loss = latent_loss(pred, target, mask)
        run = _triton(lambda: torch.autograd.grad(loss, pred, retain_graph=True))
        return run, run

    return Case(shape, make)


def _latent_loss_cases(device, tiny: bool, kernel: str) -> dict[tuple, list[Case]]:
    bwd = kernel == "latent_loss_bwd"
    if tiny:
        return {(64,): [_loss_case("M=40 D=16 fp32", 40, 16, torch.float32, device, bwd)]}
    bf16 = torch.bfloat16
    # I-JEPA ViT-B / ViT-H predictor targets (benches/bench_latent_loss.py), and narrower latents
    return {(256,): [_loss_case("M=40960 D=768 bf16", 40960, 768, bf16, device, bwd),
                     _loss_case("M=20480 D=1280 bf16", 20480, 1280, bf16, device, bwd)],
            (128,): [_loss_case("M=40960 D=128 bf16", 40960, 128, bf16, device, bwd)],
            (64,): [_loss_case("M=40960 D=64 bf16", 40960, 64, bf16, device, bwd)]}


cases_for("latent_loss_fwd", "latent_loss_bwd")(_latent_loss_cases)


def _latent_cost_case(shape: str, B: int, H: int, D: int, G: int, dtype, device) -> Case:
    from .latent_cost import latent_cost

    def make():
        g = _gen(device)
        z = _randn(B, H, D, device=device, dtype=dtype, g=g)
        goal = _randn(G, D, device=device, dtype=dtype, g=g)
        run = _triton(lambda: latent_cost(z, goal, metric="l2", reduce="sum"))
        return run, run

    return Case(shape, make)


@cases_for("latent_cost_fwd")
def _latent_cost_cases(device, tiny: bool) -> dict[tuple, list[Case]]:
    if tiny:
        return {(64,): [_latent_cost_case("B=24 H=3 D=16 G=2 fp32", 24, 3, 16, 2, torch.float32, device)]}
    f32 = torch.float32
    # the lewm latent (192) over a horizon of 5, N=300 candidates at E=1 and E=64
    return {(256,): [_latent_cost_case("B=300 H=5 D=192 G=1 fp32", 300, 5, 192, 1, f32, device),
                     _latent_cost_case("B=19200 H=5 D=192 G=64 fp32", 19200, 5, 192, 64, f32, device)],
            (128,): [_latent_cost_case("B=19200 H=5 D=128 G=64 fp32", 19200, 5, 128, 64, f32, device)],
            (64,): [_latent_cost_case("B=19200 H=5 D=64 G=64 fp32", 19200, 5, 64, 64, f32, device)]}


@cases_for("ema")
def _ema_cases(device, tiny: bool) -> dict[tuple, list[Case]]:
    if tiny:
        return {}

    def case(model: str, dims: tuple, dtype) -> Case:
        def make():
            from .ema import ema_update_

            shapes = list(_vit_param_shapes(*dims))
            g = _gen(device)
            targets = [_randn(*s, device=device, dtype=dtype, g=g) for s in shapes]
            onlines = [_randn(*s, device=device, dtype=dtype, g=g) for s in shapes]
            start = [t.clone() for t in targets]
            momentum = torch.full((1,), 0.996, device=device)
            run = _triton(lambda: ema_update_(targets, onlines, momentum))

            def check():
                torch._foreach_copy_(targets, start)
                run()
                return [t.clone() for t in targets]
            return run, check
        return Case(f"{model} {str(dtype).replace('torch.', '')}", make, flush_l2=True, precompile=False)

    vit_b, vit_h = (12, 768, 4.0, 16), (32, 1280, 4.0, 14)
    return {(): [case("vit_base", vit_b, torch.float32), case("vit_base", vit_b, torch.bfloat16),
                 case("vit_huge", vit_h, torch.bfloat16)]}


def _vit_param_shapes(depth: int, width: int, mlp_ratio: float, patch: int, img: int = 224):
    """A ViT encoder's parameter shapes (benches/bench_ema.py's list: timm's ViTs at 224 px)."""
    hidden, n_tokens = int(width * mlp_ratio), (img // patch) ** 2 + 1
    yield from [(1, 1, width), (1, n_tokens, width), (width, 3, patch, patch), (width,)]
    for _ in range(depth):
        yield from [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,), (width,), (width,),
                    (hidden, width), (hidden,), (width, hidden), (width,)]
    yield from [(width,), (width,)]


def _planner_inputs(E: int, N: int, H: int, A: int, device, g):
    mean = torch.zeros(E, H * A, device=device)
    std = torch.ones(E, H * A, device=device)
    samples = (torch.randn(E, N, H * A, device=device, generator=g)).clamp(-1, 1)
    costs = torch.rand(E, N, device=device, generator=g)
    return mean, std, samples, costs


@cases_for("elite_refit")
def _refit_cases(device, tiny: bool) -> dict[tuple, list[Case]]:
    from .elite_refit import elite_refit

    def case(E: int, N: int, H: int, A: int, mode: str) -> Case:
        def make():
            mean, std, samples, costs = _planner_inputs(E, N, H, A, device, _gen(device))
            k = max(1, min(30, N // 10))
            run = _triton(lambda: elite_refit(costs, samples, mean, std, mode=mode, k=k, momentum=0.1))
            return run, run
        return Case(f"E={E} N={N} P={H * A} {mode}", make)

    if tiny:
        return {(16,): [case(2, 40, 2, 2, "cem")]}
    # the LeWorldModel CEM budget (N=300, horizon 5, 2-D actions: P=10) at E=1 and 64; P=20 and 60
    return {(16,): [case(1, 300, 5, 2, "cem"), case(64, 300, 5, 2, "cem"), case(64, 300, 5, 2, "mppi")],
            (32,): [case(64, 300, 5, 4, "cem")],
            (64,): [case(64, 300, 10, 6, "cem")]}


@cases_for("sample_actions")
def _sample_cases(device, tiny: bool) -> dict[tuple, list[Case]]:
    if tiny:
        return {}
    from .sample_actions import sample_actions

    def case(E: int, N: int, P: int) -> Case:
        def make():
            mean, std = torch.zeros(E, P, device=device), torch.ones(E, P, device=device)
            low, high = -torch.ones(2, device=device), torch.ones(2, device=device)
            rng = torch.tensor([1234, 0], dtype=torch.int64, device=device)
            run = _triton(lambda: sample_actions(mean, std, low, high, rng, N))
            return run, run
        return Case(f"E={E} N={N} P={P}", make)

    return {(): [case(1, 300, 10), case(64, 300, 10)]}


# --------------------------------------------------------------------------------------------------
# The plan: groups in order
# --------------------------------------------------------------------------------------------------
def plan_groups(kernels: Optional[Iterable[str]] = None, device="cuda", tiny: bool = False,
                measured: Iterable[tuple[str, str]] = ()) -> list[Group]:
    """Every (kernel, key) group with a search space of more than one config and cases, in
    :data:`PRIORITY` order, the groups in ``measured`` ((kernel, key label) complete in the base
    file) after the others. ``kernels``: only these (unknown names raise)."""
    import jepa_engine.kernels  # noqa: F401  (importing the ops registers their kernels)

    names = list(kernels) if kernels is not None else list(KERNELS)
    unknown = [n for n in names if n not in KERNELS]
    if unknown:
        raise ValueError(f"tuning: unknown kernels {unknown}; registered: {sorted(KERNELS)}")
    device = torch.device(device)
    groups = []
    for name in names:
        spec = KERNELS[name]
        if name not in CASES or not spec.search_space:
            continue
        by_key = CASES[name](device, tiny)
        for key, space in spec.search_space.items():
            if len(space) > 1 and by_key.get(key):
                groups.append(Group(name, key, tuple(space), by_key[key]))
    rank = {g: i for i, g in enumerate(PRIORITY)}
    done = set(measured)
    return sorted(groups, key=lambda g: ((g.kernel, key_label(g.key)) in done,
                                         rank.get((g.kernel, g.key), len(rank))))


def untuned_kernels() -> dict[str, str]:
    """Registered kernels the tuner leaves alone, and why."""
    import jepa_engine.kernels  # noqa: F401

    out = {}
    for name, spec in KERNELS.items():
        if not spec.search_space or all(len(s) < 2 for s in spec.search_space.values()):
            out[name] = "no search space"
        elif name not in CASES:
            out[name] = "no tuning cases (kernels/tuning.py @cases_for)"
    return out


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------
_FLUSH: list = []


def cuda_timer(run: Run, *, flush_l2: bool = False, **_: Any) -> float:
    """Median seconds of one call of ``run`` on the current CUDA device (CUDA events): repetitions of
    about :data:`TARGET_S` in all, each of enough calls for about a millisecond (one call, after
    writing a 256 MB buffer, with ``flush_l2``)."""
    Event = torch.cuda.Event
    run()
    s, e = Event(enable_timing=True), Event(enable_timing=True)
    s.record()
    run()
    e.record()
    e.synchronize()
    est = max(s.elapsed_time(e) / 1e3, 1e-7)
    calls = 1 if flush_l2 else max(1, min(100, int(1e-3 / est)))
    reps = max(5, min(200, int(TARGET_S / (est * calls))))
    if flush_l2 and not _FLUSH:
        _FLUSH.append(torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda"))
    events = [(Event(enable_timing=True), Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        if flush_l2:
            _FLUSH[0].zero_()
        start.record()
        for _ in range(calls):
            run()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) / 1e3 / calls for a, b in events)


def cpu_timer(run: Run, **_: Any) -> float:
    """Median seconds of three calls (the interpreter rehearsal: the numbers mean nothing)."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


# Relative tolerance of a candidate's outputs against the table config's, by dtype: another tiling
# changes the order of sums only (fp32 dots may be TF32 in a backward: 1e-3 of the largest value).
_RTOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def mismatch(expected, actual) -> Optional[str]:
    """None when ``actual`` matches ``expected`` (same structure; floating tensors within
    :data:`_RTOL` of the largest expected magnitude, non-finite entries in the same places; other
    tensors equal), else what differs."""
    exp, act = _tensors(expected), _tensors(actual)
    if len(exp) != len(act):
        return f"{len(act)} outputs, expected {len(exp)}"
    for i, (e, a) in enumerate(zip(exp, act)):
        if e.shape != a.shape or e.dtype != a.dtype:
            return f"output {i}: {a.dtype} {list(a.shape)}, expected {e.dtype} {list(e.shape)}"
        if not e.is_floating_point():
            if not torch.equal(e, a):
                return f"output {i}: {int((e != a).sum())} entries differ"
            continue
        ef, af = e.float(), a.float()
        fin = torch.isfinite(ef)
        if not torch.equal(fin, torch.isfinite(af)) or not torch.equal(ef[~fin].nan_to_num(), af[~fin].nan_to_num()):
            return f"output {i}: non-finite entries differ"
        if fin.any():
            err = (ef[fin] - af[fin]).abs().max().item()
            tol = _RTOL.get(e.dtype, 1e-3) * max(ef[fin].abs().max().item(), 1e-6)
            if err > tol:
                return f"output {i}: max difference {err:.3g} > {tol:.3g}"
    return None


@dataclass
class GroupResult:
    kernel: str
    key: tuple
    candidates: tuple[LaunchConfig, ...]
    times: dict[str, dict[str, Any]] = field(default_factory=dict)   # shape -> candidate label -> s or error
    complete: bool = False
    seconds: float = 0.0

    @property
    def fixed(self) -> LaunchConfig:
        return self.candidates[0]


def measure_group(group: Group, deadline: float, timer=cuda_timer, clock=time.monotonic,
                  wait_compiled: Callable[[Group, int], None] = lambda g, i: None) -> GroupResult:
    """Time every candidate of ``group`` at every shape, the table's config first, candidate by
    candidate (so a cut leaves whole candidates); stop at ``deadline`` (``clock()`` seconds)."""
    t0 = clock()
    res = GroupResult(group.kernel, group.key, group.candidates)
    built: dict[int, tuple[Run, Run]] = {}
    expected: dict[int, Any] = {}
    res.times = {c.shape: {} for c in group.cases}
    try:
        for ci, cfg in enumerate(group.candidates):
            if clock() >= deadline:
                return res
            wait_compiled(group, ci)
            for si, case in enumerate(group.cases):
                if clock() >= deadline:
                    return res
                res.times[case.shape][cfg.label()] = _measure_one(group, case, si, ci, cfg, built, expected, timer)
        res.complete = True
        return res
    finally:
        res.seconds = clock() - t0
        built.clear()
        expected.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _measure_one(group, case, si, ci, cfg, built, expected, timer):
    try:
        if si not in built:
            built[si] = case.make()
        run, check = built[si]
        with _configs.override(group.kernel, cfg):
            out = check()
            if ci == 0:
                expected[si] = _tensors(out) and [t.detach().clone() for t in _tensors(out)]
            elif si not in expected:
                return "error: the table's config did not run"
            else:
                bad = mismatch(expected[si], [t.detach() for t in _tensors(out)])
                if bad:
                    return f"mismatch: {bad}"
            del out
            return float(timer(run, flush_l2=case.flush_l2, config=cfg, case=case))
    except Exception as e:   # one candidate's failure is its row; the others still run
        msg = str(e).strip().splitlines()
        return f"error: {type(e).__name__}: {msg[0][:200] if msg else ''}"


def choose(res: GroupResult) -> tuple[Optional[LaunchConfig], Optional[float]]:
    """``(config, speedup)``: the candidate with the lowest geometric mean of (time / table time) over
    the shapes where the table's config has a time, among those timed at all of them; the table's own
    config unless that one is at least MIN_GAIN faster. ``(None, None)`` when the table's config has
    no time at any shape."""
    fixed = res.fixed.label()
    shapes = [s for s, t in res.times.items() if isinstance(t.get(fixed), float) and t[fixed] > 0]
    if not shapes:
        return None, None
    best, best_ratio = res.fixed, 1.0
    for cfg in res.candidates[1:]:
        ts = [res.times[s].get(cfg.label()) for s in shapes]
        if not all(isinstance(t, float) and t > 0 for t in ts):
            continue
        ratio = math.exp(sum(math.log(t / res.times[s][fixed]) for t, s in zip(ts, shapes)) / len(shapes))
        if ratio < best_ratio:
            best, best_ratio = cfg, ratio
    if best_ratio > 1.0 - MIN_GAIN:
        return res.fixed, 1.0
    return best, 1.0 / best_ratio


def entry(res: GroupResult) -> Optional[dict]:
    """The file's entry of a measured group (None when nothing can be chosen)."""
    cfg, speedup = choose(res)
    if cfg is None:
        return None
    fixed = res.fixed.label()
    shapes = {}
    for shape, times in res.times.items():
        timed = {k: v for k, v in times.items() if isinstance(v, float)}
        winner = min(timed, key=timed.get) if timed else None
        shapes[shape] = {"winner": winner, "winner_s": timed.get(winner), "fixed_s": timed.get(fixed),
                         "times": times}
    return {"config": cfg.to_json(), "chosen": cfg.label(), "fixed": fixed, "speedup_vs_fixed": round(speedup, 4),
            "complete": res.complete, "seconds": round(res.seconds, 2), "shapes": shapes}


# --------------------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------------------
def load_base(path: Path) -> dict:
    """The kernels of an existing configs file that can serve as a base ({} when there is none or it
    is not usable: it is then replaced)."""
    if not path.is_file():
        return {}
    kernels, problems = _configs.read_file(path)
    if problems:
        print(f"tuning: {path}: {'; '.join(problems)}: starting a new file", file=sys.stderr)
        return {}
    return kernels


def write_file(path: Path, device: str, kernels: dict, meta: dict) -> None:
    data = {"format": _configs.FORMAT, "device": device, "device_key": _configs.device_key(device), **meta,
            "kernels": {k: dict(sorted(v.items())) for k, v in sorted(kernels.items())}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def merge(kernels: dict, res: GroupResult) -> bool:
    """Put ``res``'s entry into ``kernels`` (kernel -> key label -> entry); an incomplete measurement
    does not replace a complete one. Returns whether it was put."""
    new = entry(res)
    if new is None:
        return False
    old = kernels.get(res.kernel, {}).get(key_label(res.key))
    if old is not None and old.get("complete") and not new["complete"]:
        return False
    kernels.setdefault(res.kernel, {})[key_label(res.key)] = new
    return True


def tune(groups: list[Group], out: Path, device: str, *, budget_s: float, timer=cuda_timer, clock=time.monotonic,
         start: Optional[float] = None, base: Optional[dict] = None, wait_compiled=lambda g, i: None,
         log: Callable[[str], None] = print) -> dict:
    """Measure ``groups`` in order within ``budget_s`` (from ``start``, default now), rewriting
    ``out`` (a file) after each; returns the summary written into it."""
    start = clock() if start is None else start
    deadline = start + budget_s
    kernels = {k: dict(v) for k, v in (base or {}).items()}
    summary: dict = {"budget_s": budget_s, "groups_planned": [g.label for g in groups], "groups_measured": [],
                     "groups_cut": [], "groups_not_run": [], "torch": torch.__version__, "triton": _triton_version()}
    for i, g in enumerate(groups):
        if clock() >= deadline:
            summary["groups_not_run"] = [x.label for x in groups[i:]]
            break
        res = measure_group(g, deadline, timer, clock, wait_compiled)
        (summary["groups_measured"] if res.complete else summary["groups_cut"]).append(g.label)
        merged = merge(kernels, res)
        cfg, speedup = choose(res)
        if cfg is None:
            what = "nothing (the table's config did not run)"
        elif cfg == res.fixed:
            what = f"the table's {res.fixed.label()}"
        else:
            what = f"{cfg.label()} ({speedup:.3f}x the table's {res.fixed.label()})"
        log(f"tuning: {g.label}: {'' if res.complete else 'cut by the budget, '}{what} in {res.seconds:.1f} s"
            + ("" if merged else " (kept the earlier complete entry)"))
        summary["seconds"] = round(clock() - start, 2)
        summary["written"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_file(out, device, kernels, summary)
    summary["seconds"] = round(clock() - start, 2)
    summary["written"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_file(out, device, kernels, summary)
    return summary


def _triton_version() -> Optional[str]:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


# --------------------------------------------------------------------------------------------------
# Compiling ahead in worker processes
# --------------------------------------------------------------------------------------------------
def _items(groups: list[Group]) -> list[tuple[str, str, int]]:
    return [(g.kernel, key_label(g.key), ci) for g in groups for ci in range(len(g.candidates))]


class Precompile:
    """Worker processes that compile the plan's items (group, candidate) into Triton's cache in timing
    order, worker w taking items w, w + n, ...; :meth:`wait` lets the timing wait for an item."""

    def __init__(self, groups: list[Group], workers: int, deadline_epoch: float, kernels: list[str],
                 device: str = "cuda", tiny: bool = False):
        self.groups, self.deadline_epoch = groups, deadline_epoch
        self.index = {item: i for i, item in enumerate(_items(groups))}
        self.dir = Path(tempfile.mkdtemp(prefix="tuning-compile-"))
        plan = self.dir / "plan.json"
        plan.write_text(json.dumps({"items": _items(groups), "kernels": kernels, "device": device, "tiny": tiny}))
        self.logs = [open(self.dir / f"worker{w}.log", "w") for w in range(workers)]
        self.procs = [subprocess.Popen([sys.executable, "-m", "jepa_engine.kernels.tuning", "--precompile", str(plan),
                                        "--shard", f"{w}/{workers}", "--deadline-epoch", str(deadline_epoch)],
                                       stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
                      for w, log in enumerate(self.logs)]

    def wait(self, group: Group, ci: int) -> None:
        i = self.index.get((group.kernel, key_label(group.key), ci))
        if i is None:
            return
        marker = self.dir / f"{i}.done"
        t_end = min(time.time() + WAIT_COMPILED_S, self.deadline_epoch)
        while not marker.exists() and time.time() < t_end and any(p.poll() is None for p in self.procs):
            time.sleep(0.02)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            with contextlib.suppress(Exception):
                p.wait(timeout=5)
        for log in self.logs:
            log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def precompile_worker(plan_path: Path, shard: int, count: int, deadline_epoch: float) -> int:
    plan = json.loads(Path(plan_path).read_text())
    cuda = plan["device"] == "cuda"
    groups = {(g.kernel, key_label(g.key)): g for g in plan_groups(plan["kernels"], plan["device"], plan["tiny"])}
    current: tuple = ()
    built: dict[int, tuple[Run, Run]] = {}
    for i, (kernel, label, ci) in enumerate(plan["items"]):
        if i % count != shard:
            continue
        if time.time() >= deadline_epoch:
            break
        g = groups.get((kernel, label))
        if g is None:
            continue
        if current != (kernel, label):
            current, built = (kernel, label), {}
            if cuda:
                torch.cuda.empty_cache()
        with _configs.override(kernel, g.candidates[ci]):
            for si, case in enumerate(g.cases):
                if not case.precompile:
                    continue
                with contextlib.suppress(Exception):   # the timing process reports what fails
                    if si not in built:
                        built[si] = case.make()
                    built[si][0]()
        if cuda:
            torch.cuda.synchronize()
        (Path(plan_path).parent / f"{i}.done").touch()
    return 0


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def default_workers() -> int:
    return max(0, min(12, (os.cpu_count() or 1) - 2))


def main(argv: Optional[list[str]] = None) -> int:
    t_start = time.monotonic()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    ap = argparse.ArgumentParser(prog="python -m jepa_engine.kernels.tuning", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(_configs.PACKAGE_DIR), help="folder of <device>.json (default: the package's "
                    "kernels/configs)")
    ap.add_argument("--budget-s", type=float, default=300.0, help="seconds for the whole run (default 300)")
    ap.add_argument("--kernel", action="append", help="tune only this kernel (repeatable)")
    ap.add_argument("--workers", type=int, default=None,
                    help="processes compiling ahead (default: CPUs - 2, at most 12)")
    ap.add_argument("--fresh", action="store_true", help="ignore an existing <device>.json (default: keep its other "
                    "entries)")
    ap.add_argument("--interpret", action="store_true", help="rehearse on tiny CPU shapes under TRITON_INTERPRET=1")
    ap.add_argument("--list", action="store_true", help="print the groups, candidates and shapes, then exit")
    ap.add_argument("--precompile", help=argparse.SUPPRESS)
    ap.add_argument("--shard", help=argparse.SUPPRESS)
    ap.add_argument("--deadline-epoch", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.precompile:
        w, n = (int(x) for x in args.shard.split("/"))
        return precompile_worker(Path(args.precompile), w, n, args.deadline_epoch)
    if args.budget_s <= 0:
        ap.error(f"--budget-s must be positive, got {args.budget_s}")
    if args.workers is not None and args.workers < 0:
        ap.error(f"--workers must be >= 0, got {args.workers}")
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if args.interpret and not interp:
        ap.error("--interpret needs TRITON_INTERPRET=1 in the environment (set before Python starts)")
    if not args.interpret and not args.list and (interp or not torch.cuda.is_available()):
        print("tuning: no CUDA device (or TRITON_INTERPRET is set): nothing to time; --interpret rehearses on the CPU",
              file=sys.stderr)
        return 2
    device = "cpu" if args.interpret else "cuda"
    name = INTERPRETER_DEVICE if args.interpret else (_configs.device_name() or "no-device")
    out = Path(args.out) / f"{_configs.device_key(name)}.json"
    base = {} if args.fresh else load_base(out)
    done = [(k, label) for k, entries in base.items() for label, e in entries.items()
            if isinstance(e, dict) and e.get("complete")]
    try:
        groups = plan_groups(args.kernel, device, tiny=args.interpret, measured=done)
    except ValueError as e:
        ap.error(str(e))
    if args.list:
        for g in groups:
            print(f"{g.label}: {len(g.candidates)} configs x {len(g.cases)} shapes")
            for c in g.candidates:
                print(f"    {c.label()}")
            for c in g.cases:
                print(f"    at {c.shape}")
        for k, why in untuned_kernels().items():
            print(f"{k}: not tuned ({why})")
        return 0
    # (the interpreter compiles nothing: workers there only when asked, to rehearse them)
    workers = (0 if args.interpret else default_workers()) if args.workers is None else args.workers
    print(f"tuning: {name}: {len(groups)} groups, {sum(len(g.candidates) for g in groups)} configs, budget "
          f"{args.budget_s:.0f} s, {workers} compile workers; writing {out}", flush=True)
    pre = (Precompile(groups, workers, time.time() + args.budget_s - (time.monotonic() - t_start),
                      args.kernel or list(KERNELS), device, args.interpret) if workers else None)
    try:
        summary = tune(groups, out, name, budget_s=args.budget_s, timer=cpu_timer if args.interpret else cuda_timer,
                       start=t_start, base=base, wait_compiled=pre.wait if pre else (lambda g, i: None),
                       log=lambda m: print(m, flush=True))
    except KeyboardInterrupt:
        print(f"tuning: interrupted; {out} holds the groups finished", flush=True)
        return 130
    finally:
        if pre:
            pre.close()
    print(f"tuning: {len(summary['groups_measured'])} groups measured, {len(summary['groups_cut'])} cut, "
          f"{len(summary['groups_not_run'])} not run in {summary['seconds']:.0f} s; wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
