"""Fused JEPA latent loss (forward + backward) against the PyTorch reference and torch.compile."""
from __future__ import annotations

import pytest
import torch

from jepa_engine.kernels import latent_loss, latent_loss_reference, use_backend
from jepa_engine.profiling.bench_shapes import LATENT_LOSS_SHAPES

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# (tokens, D): I-JEPA ViT-B/H predictor targets (4 blocks x ~40 patches x batch), CPU-sized when no GPU.
SHAPES = LATENT_LOSS_SHAPES if CUDA else [(64 * 40, 384)]
DTYPE = torch.bfloat16 if CUDA else torch.float32


def _inputs(M, D):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    pred = torch.randn(M, D, device=DEVICE, dtype=DTYPE, generator=g, requires_grad=True)
    target = torch.randn(M, D, device=DEVICE, dtype=DTYPE, generator=g)
    mask = torch.rand(M, device=DEVICE, generator=g) < 0.9
    return pred, target, mask


def _step(fn, pred, target, mask):
    def run():
        loss = fn(pred, target, mask)
        loss.backward()
        pred.grad = None
    return run


@pytest.mark.parametrize("impl", ["jepa_engine", "reference", "torch_compile"])
@pytest.mark.parametrize("M,D", SHAPES)
def test_latent_loss_fwd_bwd(benchmark, run_bench, impl, M, D):
    pred, target, mask = _inputs(M, D)
    if impl == "jepa_engine":
        fn = latent_loss
    elif impl == "reference":
        def fn(p, t, m):
            with use_backend("reference"):
                return latent_loss_reference(p, t, m)
    else:
        fn = torch.compile(latent_loss_reference)
    elem = pred.element_size()
    # forward reads pred+target, backward reads them again and writes grad_pred.
    bytes_moved = M * D * elem * 5 + M
    run_bench(benchmark, _step(fn, pred, target, mask), impl=impl, group=f"latent_loss fwd+bwd M={M} D={D} {DTYPE}",
              bytes=bytes_moved, shape=[M, D], dtype=str(DTYPE))
