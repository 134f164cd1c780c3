"""Print a short file-name tag for the device benchmarks run on (``h100``, ``cpu``...)."""
from __future__ import annotations

from jepa_engine.profiling.hardware import device_name, device_tag

__all__ = ["device_name", "device_tag"]

if __name__ == "__main__":
    print(device_tag())
