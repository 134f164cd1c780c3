"""A timm ViT training step, ``jepa_engine.accelerate``-patched vs unpatched vs unpatched + torch.compile.

One step = forward of the ViT (bf16 autocast on CUDA) on images with an I-JEPA context mask (variable
visible tokens per sample, given to timm as its ``attn_mask`` = key padding ``[B, 1, 1, N]``) or
dense, a smooth-L1 loss against a fixed target, backward, AdamW, and a timm ``ModelEmaV3`` update
(the patched row's EMA runs the one-launch kernel through ``accelerate(..., ema=...)``).

ViT-B/16 at 224 px, batch 64 and 256 on a GPU; a 2-block 64-wide ViT on 32 px images on CPU, where
the patched row runs the reference op (Triton needs a GPU) and only says that nothing breaks.
Every row records the peak memory of a step (``torch.cuda.max_memory_allocated`` on CUDA).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import jepa_engine
from jepa_engine.masks import MaskConfig, MultiBlockMaskCollator
from tests.timm_compat import import_timm

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# name -> (timm model, img, patch, embed dim, depth, heads)
MODELS = {"vit_b16": ("vit_base_patch16_224", 224, 16, 768, 12, 12),
          "tiny": ("vit_tiny_patch16_224", 32, 8, 64, 2, 2)}
CASES = [("vit_b16", 64), ("vit_b16", 256)] if CUDA else [("tiny", 8)]


def _context_key_padding(B: int, grid: int) -> torch.Tensor:
    """bool [B, 1, 1, 1 + grid^2]: the class token plus each sample's I-JEPA context patches."""
    masks = MultiBlockMaskCollator(MaskConfig(grid=(grid, grid)), seed=0).sample(B, torch.Generator().manual_seed(0))
    kp = torch.zeros(B, grid * grid, dtype=torch.bool)
    kp.scatter_(1, masks.context_index, masks.context_valid)
    kp = torch.cat([torch.ones(B, 1, dtype=torch.bool), kp], dim=1)
    return kp[:, None, None, :].to(DEVICE)


def _setup(name: str, B: int, impl: str, masked: bool):
    timm = import_timm()
    if timm is None:
        pytest.skip("timm/torchvision are not installed (make install adds them)")
    from timm.utils import ModelEmaV3

    arch, img, patch, dim, depth, heads = MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, img_size=img, patch_size=patch, embed_dim=dim, depth=depth,
                              num_heads=heads, num_classes=0).to(DEVICE)
    ema = ModelEmaV3(model, decay=0.996)
    if impl == "jepa_engine":
        jepa_engine.accelerate(model, ema=ema)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=CUDA)
    fwd = torch.compile(model.forward_features) if impl == "torch_compile" else model.forward_features
    images = torch.randn(B, 3, img, img, device=DEVICE)
    mask = _context_key_padding(B, img // patch) if masked else None
    target = torch.randn(B, 1 + (img // patch) ** 2, dim, device=DEVICE)
    visible = mask[:, 0, 0, :, None].float() if masked else 1.0

    def step():
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=CUDA):
            out = fwd(images, attn_mask=mask)
        loss = (F.smooth_l1_loss(out.float(), target, reduction="none") * visible).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model, step=100)

    return step


def _peak_memory(step) -> int | None:
    if not CUDA:
        return None
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


@pytest.mark.parametrize("impl", ["jepa_engine", "timm", "torch_compile"])
@pytest.mark.parametrize("masking", ["ijepa", "dense"])
@pytest.mark.parametrize("case", CASES, ids=[f"{n}-B{b}" for n, b in CASES])
def test_vit_train_step(benchmark, run_bench, impl, case, masking):
    name, B = case
    step = _setup(name, B, impl, masked=masking == "ijepa")
    peak = _peak_memory(step)
    run_bench(benchmark, step, impl=impl, group=f"timm {name} train step B={B} {masking}", images=B,
              peak_memory_bytes=peak, masking=masking)
