"""Head dims outside the power-of-two tiles (the flagship ViTs': 80 for ViT-H, 88 for ViT-g, 104 for
ViT-G; and 8, 160 at the small and wide ends) against the reference, forward and every gradient, on
every mask kind that the 128- and 256-wide tiles share."""
from __future__ import annotations

import pytest
import torch

from jepa_engine.kernels.masked_attention import MAX_HEAD_DIM, _block_d, supports_head_dim
from tests.kernels.test_masked_attention import check


@pytest.mark.parametrize("D,dtype,mask", [
    (80, torch.float32, "padding+frame"), (80, torch.bfloat16, "keep_index"),
    (88, torch.float16, "padding+frame"), (88, torch.float32, "varlen+frame"),
    (104, torch.bfloat16, "key_padding"), (104, torch.float32, "frame"),
    (8, torch.float32, "padding+frame"), (160, torch.float16, "frame"),
])
def test_odd_head_dims_match_reference(kernel_device, D, dtype, mask):
    check(kernel_device, mask, dtype, B=1, H=2, N=21, D=D)


def test_head_dim_tiles():
    assert [_block_d(d) for d in (1, 8, 16, 24, 64, 80, 88, 96, 104, 128, 129, 256)] == \
        [16, 16, 16, 32, 64, 128, 128, 128, 128, 128, 256, 256]
    assert supports_head_dim(MAX_HEAD_DIM) and not supports_head_dim(MAX_HEAD_DIM + 1)
    assert not supports_head_dim(0)
