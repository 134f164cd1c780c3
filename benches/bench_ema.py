"""EMA of a ViT target encoder: one launch per step against the ways PyTorch code does it.

Peers on the same parameter list (the real tensor-size mix of a ViT): a Python loop of
``mul_/add_`` (one or two kernels per tensor), ``torch._foreach_lerp_`` (what timm's ModelEmaV3
uses), ``torch._foreach_mul_ + torch._foreach_add_``, and a device-to-device copy moving the same
bytes (reading 1.5x and writing 1.5x the parameter bytes), whose bandwidth the EMA is measured
against. Bytes moved per step: 3 x parameter bytes (read target, read online, write target).
Two rows of ours: ``jepa_engine`` (a float momentum, the op's own dispatch: on CUDA the plain
same-dtype update takes ``_foreach_lerp_``, which measured faster there) and ``jepa_engine_kernel``
(a device-tensor momentum, as a CUDA-graph-captured step passes it: always the one-launch kernel).
"""
from __future__ import annotations

import pytest
import torch

from jepa_engine.kernels import ema_update_
# The ViTs' parameter shapes, shared with `jepa-engine ledger`.
from jepa_engine.profiling.bench_shapes import VITS, vit_param_shapes

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
MOMENTUM = 0.996

MODELS = list(VITS) if CUDA else ["vit_small"]
DTYPES = [torch.float32, torch.bfloat16]


def _lists(model: str, dtype: torch.dtype):
    shapes = list(vit_param_shapes(*VITS[model]))
    g = torch.Generator(device=DEVICE).manual_seed(0)
    targets = [torch.randn(s, device=DEVICE, generator=g).to(dtype) for s in shapes]
    onlines = [torch.randn(s, device=DEVICE, generator=g).to(dtype) for s in shapes]
    return targets, onlines


def _impl(impl: str, targets, onlines):
    m, w = MOMENTUM, 1.0 - MOMENTUM
    if impl == "jepa_engine":  # a float momentum: the op's own dispatch (foreach where it wins)
        return lambda: ema_update_(targets, onlines, m)
    if impl == "jepa_engine_kernel":  # a device momentum (CUDA-graph safe): always the one-launch kernel
        momentum = torch.full((1,), m, device=DEVICE) if CUDA else m
        return lambda: ema_update_(targets, onlines, momentum)
    if impl == "python_loop":
        def loop():
            for t, o in zip(targets, onlines):
                t.mul_(m).add_(o, alpha=w)
        return loop
    if impl == "foreach_lerp":
        return lambda: torch._foreach_lerp_(targets, onlines, w)
    if impl == "foreach_mul_add":
        def mul_add():
            torch._foreach_mul_(targets, m)
            torch._foreach_add_(targets, onlines, alpha=w)
        return mul_add
    # copy: the same bytes as the EMA moves (3 x numel elements), read half, write half.
    n = sum(t.numel() for t in targets) * 3 // 2
    src = torch.empty(n, device=DEVICE, dtype=targets[0].dtype).normal_()
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


@pytest.mark.parametrize("impl", ["jepa_engine", "jepa_engine_kernel", "foreach_lerp", "foreach_mul_add", "python_loop", "copy"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("model", MODELS)
def test_ema_vit(benchmark, run_bench, impl, model, dtype):
    targets, onlines = _lists(model, dtype)
    numel = sum(t.numel() for t in targets)
    fn = _impl(impl, targets, onlines)
    with torch.no_grad():
        run_bench(benchmark, fn, impl=impl, group=f"ema {model} {str(dtype).replace('torch.', '')}",
                  bytes=3.0 * numel * targets[0].element_size(), flush_l2=CUDA, model=model,
                  params=numel, tensors=len(targets), dtype=str(dtype))
