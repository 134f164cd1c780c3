"""Print a short file-name tag for the device benchmarks run on (``h100``, ``cpu``...)."""
from __future__ import annotations

import re

import torch


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import platform

    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def device_tag() -> str:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0).lower()
        m = re.search(r"\b([a-z]\d{2,4})\b", name)
        return m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return "cpu"


if __name__ == "__main__":
    print(device_tag())
