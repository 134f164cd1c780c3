"""Time and energy meters (NVML on the GPU, RAPL on the CPU) and their pytest-benchmark integration."""
from .meters import EnergyMeter, Measurement, NvmlSource, RaplSource, measure, wrapped_delta

__all__ = ["EnergyMeter", "Measurement", "NvmlSource", "RaplSource", "measure", "wrapped_delta"]
