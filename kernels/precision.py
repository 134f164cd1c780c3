"""The precision of a planning or inference run: ``"fp32"``, ``"tf32"`` or ``"bf16"``.

- ``"fp32"``: fp32 storage, every product in IEEE fp32 (FMA units on a GPU).
- ``"tf32"``: fp32 storage, the products' inputs rounded to TF32 (a 10-bit mantissa) with fp32
  accumulation: tensor cores on CUDA (Triton ``input_precision="tf32"``, torch's
  ``allow_tf32``). On the CPU, which has no TF32 unit, it is *emulated* (:func:`round_tf32` on both
  operands of every product), to show what the rounding does to decisions.
- ``"bf16"``: bf16 weights and activations, fp32 accumulation (tensor cores on CUDA).

The default is ``"tf32"`` on CUDA and ``"fp32"`` on the CPU (:func:`default_precision`); reports
state the precision they ran at.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

PRECISIONS = ("fp32", "tf32", "bf16")


def default_precision(device) -> str:
    """``"tf32"`` on CUDA (tensor cores), ``"fp32"`` elsewhere."""
    return "tf32" if torch.device(device).type == "cuda" else "fp32"


def check_precision(who: str, precision: Optional[str], device=None) -> str:
    """``precision`` validated (None: the device's default); raises naming ``who``."""
    if precision is None:
        return default_precision(device if device is not None else "cpu")
    if precision not in PRECISIONS:
        raise ValueError(f"{who}: precision must be one of {PRECISIONS} or None (the device's default), "
                         f"got {precision!r}")
    return precision


def storage_dtype(precision: str) -> torch.dtype:
    """The weights' and activations' dtype of a precision: bf16 for ``"bf16"``, else fp32."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def round_tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 ``t`` rounded to TF32 (10 explicit mantissa bits, round to nearest, ties to even), as
    tensor cores read fp32 inputs; other dtypes are returned as they are. Infinities and NaN pass."""
    if t.dtype != torch.float32:
        return t
    bits = t.contiguous().view(torch.int32)
    # round half to even on the 13 dropped bits, then clear them (carry into the exponent is correct
    # rounding; inf/nan have an all-ones exponent and are left alone)
    lsb = (bits >> 13) & 1
    rounded = (bits + (0xFFF + lsb)) & ~0x1FFF
    finite = (bits & 0x7F800000) != 0x7F800000
    return torch.where(finite, rounded, bits).view(torch.float32).view(t.shape)


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """Inside the block CUDA fp32 products run as ``precision`` asks: TF32 allowed for ``"tf32"``,
    IEEE fp32 for ``"fp32"`` (torch's ``allow_tf32``, which the Triton launchers read too); ``"bf16"``
    changes nothing (its tensors are bf16). Restored on exit."""
    if precision == "bf16":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
