"""Kernel-vs-reference self-check: each op's Triton kernel against its PyTorch reference.

On a GPU the compiled kernels run; on a CPU machine the check re-runs itself under the Triton
interpreter (``TRITON_INTERPRET=1``), which must be set before Triton kernels are defined.
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable


def _latent_loss_case(device: str) -> tuple[float, float]:
    import torch

    from jepa_engine.kernels import latent_loss, latent_loss_reference, use_backend

    g = torch.Generator().manual_seed(0)
    pred = torch.randn(4, 37, 96, generator=g).to(device).requires_grad_(True)
    target = torch.randn(4, 37, 96, generator=g).to(device)
    mask = (torch.rand(4, 37, generator=g) < 0.7).to(device)
    out = []
    for backend in ("triton", "reference"):
        with use_backend(backend):
            fn = latent_loss if backend == "triton" else latent_loss_reference
            loss = fn(pred, target, mask)
            (grad,) = torch.autograd.grad(loss, pred)
        out.append((loss.detach(), grad))
    return (out[0][0] - out[1][0]).abs().item(), (out[0][1] - out[1][1]).abs().max().item()


CHECKS: dict[str, Callable[[str], tuple[float, float]]] = {"latent_loss (fwd, bwd)": _latent_loss_case}


def run() -> int:
    import torch

    from jepa_engine.kernels._launch import interpreting, triton_available

    if not triton_available():
        print("self-check: triton is not installed here; ops run their PyTorch references")
        return 0
    if not torch.cuda.is_available() and not interpreting():
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.run([sys.executable, "-m", "jepa_engine", "selfcheck"], env=env).returncode
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mode = "compiled on " + torch.cuda.get_device_name(0) if device == "cuda" else "Triton interpreter on CPU"
    print(f"Kernel vs reference ({mode}): max abs difference of output and gradient")
    worst = 0.0
    for name, case in CHECKS.items():
        d_out, d_grad = case(device)
        worst = max(worst, d_out, d_grad)
        print(f"  {name:32s} out {d_out:.2e}   grad {d_grad:.2e}   {'ok' if max(d_out, d_grad) < 1e-4 else 'MISMATCH'}")
    return 0 if worst < 1e-4 else 1
