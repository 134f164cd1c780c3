"""Run-time choices shared by every command and config: the device "auto" resolves to, and how often a
progress bar redraws."""
from __future__ import annotations

import sys

import torch


def resolved_device(device: str) -> torch.device:
    """The device a config's ``device`` field names: ``"auto"`` is CUDA when available, else the CPU;
    anything else (``"cpu"``, ``"cuda"``, ``"cuda:1"``) as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def progress_mininterval() -> float:
    """Seconds between tqdm redraws: 0.1 on a terminal, where the bar redraws in place; 10 when stderr
    is a file or a CI log, where every redraw is a new chunk of text."""
    return 0.1 if sys.stderr.isatty() else 10.0
