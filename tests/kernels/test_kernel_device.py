"""Where kernel tests run (the ``kernel_device`` rule), their tolerances, and the CPU dispatch itself.

The rule: a CUDA device when present, else CPU under ``TRITON_INTERPRET=1``, else none (the reason
says why). The ``test_cpu_dispatch_*`` tests are about what ops do with CPU tensors when the
interpreter is or is not on; they patch the environment, so they run on any machine.
"""
from __future__ import annotations

import pytest
import torch

from jepa_engine.kernels import _launch, latent_loss, latent_loss_reference, use_backend
from tests.helpers import (TF32_GRAD_TOLERANCE, TF32_TOLERANCE, TOLERANCES, kernel_device_choice,
                           require_kernel_device, tolerance, uses_tf32)


def _machine(monkeypatch, cuda: bool, interpret: str | None, triton: bool = True) -> None:
    """Make this process look like a machine with or without CUDA, the interpreter flag and triton."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(_launch, "triton_available", lambda: triton)
    if interpret is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)


# --------------------------------------------------------------------------------------------------
# The choice rule
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cuda,interpret,want,words", [
    (True, None, "cuda", "compiled"),
    (True, "0", "cuda", "compiled"),
    (True, "1", "cuda", "interpreter"),          # a CUDA device wins; its kernels are then interpreted
    (False, "1", "cpu", "interpreter"),
    (False, None, None, "TRITON_INTERPRET is not set"),
    (False, "0", None, "TRITON_INTERPRET is not set"),
    (False, "", None, "TRITON_INTERPRET is not set"),
])
def test_choice_rule(monkeypatch, cuda, interpret, want, words):
    _machine(monkeypatch, cuda, interpret)
    device, reason = kernel_device_choice()
    assert device == want, reason
    assert words in reason


@pytest.mark.parametrize("cuda,interpret", [(True, None), (True, "1"), (False, "1"), (False, None)])
def test_choice_rule_without_triton_is_none(monkeypatch, cuda, interpret):
    _machine(monkeypatch, cuda, interpret, triton=False)
    device, reason = kernel_device_choice()
    assert device is None and "triton is not installed" in reason


def test_fixture_skips_with_the_reason(monkeypatch):
    _machine(monkeypatch, cuda=False, interpret=None)
    with pytest.raises(pytest.skip.Exception, match="no CUDA device and TRITON_INTERPRET is not set"):
        require_kernel_device()
    _machine(monkeypatch, cuda=False, interpret="1")
    assert require_kernel_device() == "cpu"
    _machine(monkeypatch, cuda=True, interpret=None)
    assert require_kernel_device() == "cuda"


# --------------------------------------------------------------------------------------------------
# Tolerances: TF32 only where a kernel's fp32 dots run as TF32, i.e. compiled on CUDA
# --------------------------------------------------------------------------------------------------
def test_tf32_tolerance_only_compiled_on_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert uses_tf32(torch.float32, "cuda", tf32=True)
    assert tolerance(torch.float32, "cuda", tf32=True) == TF32_TOLERANCE
    assert tolerance(torch.float32, "cuda", tf32=False) == TOLERANCES[torch.float32]
    assert tolerance(torch.float32, "cpu", tf32=True) == TOLERANCES[torch.float32]
    assert tolerance(torch.float16, "cuda", tf32=True) == TOLERANCES[torch.float16]
    assert tolerance(torch.bfloat16, torch.device("cuda", 0), tf32=True) == TOLERANCES[torch.bfloat16]
    # A gradient through chained TF32 dots: its own, wider entry, only where TF32 applies.
    assert tolerance(torch.float32, "cuda", tf32=True, grad=True) == TF32_GRAD_TOLERANCE
    assert TF32_GRAD_TOLERANCE > TF32_TOLERANCE
    assert tolerance(torch.float32, "cuda", tf32=False, grad=True) == TOLERANCES[torch.float32]
    assert tolerance(torch.float32, "cpu", tf32=True, grad=True) == TOLERANCES[torch.float32]
    assert tolerance(torch.float16, "cuda", tf32=True, grad=True) == TOLERANCES[torch.float16]
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter computes fp32 dots exactly
    assert tolerance(torch.float32, "cuda", tf32=True) == TOLERANCES[torch.float32]
    assert tolerance(torch.float32, "cuda", tf32=True, grad=True) == TOLERANCES[torch.float32]
    assert not uses_tf32(torch.float32, "cuda", tf32=True)


# --------------------------------------------------------------------------------------------------
# The CPU dispatch itself
# --------------------------------------------------------------------------------------------------
def _loss_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 5, 16, generator=g), torch.randn(3, 5, 16, generator=g), torch.rand(3, 5, generator=g) < 0.5


@pytest.mark.parametrize("interpret", [None, "0"])
def test_cpu_dispatch_without_interpreter_falls_back_to_the_reference(monkeypatch, interpret):
    if interpret is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    assert _launch.backend_for("op", torch.device("cpu")) == "reference"
    pred, target, mask = _loss_inputs()
    assert torch.equal(latent_loss(pred, target, mask), latent_loss_reference(pred, target, mask))


def test_cpu_dispatch_forcing_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pred, target, mask = _loss_inputs()
    want = r"latent_loss: the Triton backend was forced but cannot run on cpu tensors .*TRITON_INTERPRET: False"
    with use_backend("triton"), pytest.raises(RuntimeError, match=want):
        latent_loss(pred, target, mask)


@pytest.mark.skipif(not _launch.triton_available(), reason="triton is not installed")
def test_cpu_dispatch_under_the_interpreter_picks_triton_unless_reference_is_forced(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _launch.backend_for("op", torch.device("cpu")) == "triton"
    with use_backend("reference"):
        assert _launch.backend_for("op", torch.device("cpu")) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _launch.backend_for("op", torch.device("cpu")) == "reference"


# --------------------------------------------------------------------------------------------------
# jepa-engine selfcheck decides by the same rule
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cuda,interpret,device,mode,rc", [
    (True, None, "cuda", "compiled on Fake GPU", 0),              # the GPU tolerance (1e-4) holds 5e-5
    (True, "1", "cuda", "Triton interpreter on Fake GPU", 1),     # the interpreter's (1e-5) does not
    (False, "1", "cpu", "Triton interpreter on CPU", 1),
])
def test_selfcheck_runs_its_cases_on_the_rule_device(monkeypatch, capsys, cuda, interpret, device, mode, rc):
    from jepa_engine import selfcheck

    _machine(monkeypatch, cuda, interpret)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Fake GPU")
    seen = []
    monkeypatch.setattr(selfcheck, "CHECKS", {"case": (lambda d: seen.append(d) or 5e-5, 1e-4, 1e-5)})
    assert selfcheck.run() == rc
    out = capsys.readouterr().out
    assert seen == [device] and f"({mode})" in out, out


def test_selfcheck_reports_that_no_kernel_can_run_without_triton(monkeypatch, capsys):
    from jepa_engine import selfcheck

    _machine(monkeypatch, cuda=False, interpret=None, triton=False)
    monkeypatch.setattr(selfcheck, "CHECKS", {"case": (lambda d: pytest.fail("no case may run"), 1e-4, 1e-5)})
    assert selfcheck.run() == 0
    assert "no kernel can run here (triton is not installed" in capsys.readouterr().out
