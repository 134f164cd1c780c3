"""Tuned launch configs: what the launchers take before their fixed tables.

``python -m jepa_engine.kernels.tuning`` times each kernel's search space on a GPU and writes
``kernels/configs/<device>.json``, one file per device (``<device>`` is :func:`device_key` of
``torch.cuda.get_device_name()``, e.g. ``nvidia-h100-80gb-hbm3``). A launcher asks :func:`tuned`
for its config: on a device with a file, the file's config for that kernel and table key, else the
fixed table's. The file is read once per process (on the first launch), each kernel's entries
checked once; a launch does two dict lookups.

What a file may say, per kernel and table key (``kernels[<kernel>][<key label>]["config"]``): one of
the candidates of that key's search space (``KernelSpec.search_space``: the configs the audit compiles
for sm_90a and sm_80). Anything else -- a file that is not JSON or not this format, a file written for
another device, an unknown kernel or key, a config outside the search space -- is ignored with a
``RuntimeWarning`` that names the file, and the fixed table's config runs.

Order of precedence: a :func:`override` block (the tuner's), then, under the Triton interpreter, the
fixed table (the interpreter's own small tiles are the launchers' business), then the file, then
the fixed table. ``JEPA_ENGINE_KERNEL_CONFIGS`` names another folder to read ``<device>.json`` from
(the GPU report points it at the configs it has just tuned); ``off`` reads none.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

from ._registry import KERNELS, LaunchConfig, key_label

ENV = "JEPA_ENGINE_KERNEL_CONFIGS"
FORMAT = 1
PACKAGE_DIR = Path(__file__).resolve().parent / "configs"

# kernel -> config forced by an override() block (the tuner's candidate under measurement)
_OVERRIDES: dict[str, LaunchConfig] = {}
# kernel -> {table key: config} for this process's device, checked on first use
_TABLES: dict[str, dict[tuple, LaunchConfig]] = {}
# the file of this process's device, read once: [(path, {kernel: {key label: entry}})] or [(None, {})]
_FILE: list[tuple[Optional[Path], dict]] = []


def device_key(name: str) -> str:
    """A device name as a file name: lower case, runs of other characters than letters and digits as
    one ``-`` (``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``)."""
    key = re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-")
    if not key:
        raise ValueError(f"device_key: name must contain a letter or digit, got {name!r}")
    return key


def device_name() -> Optional[str]:
    """The name of the current CUDA device, or None without one (no tuned configs then)."""
    return _cuda_device_name()


@functools.lru_cache(maxsize=1)
def _cuda_device_name() -> Optional[str]:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(torch.cuda.current_device())


def configs_dir() -> Optional[Path]:
    """Where ``<device>.json`` is read from: ``$JEPA_ENGINE_KERNEL_CONFIGS``, else the package's
    ``kernels/configs``; None when the variable says ``off`` (or ``0``, ``none``)."""
    env = os.environ.get(ENV)
    if env is None or env == "":
        return PACKAGE_DIR
    if env.strip().lower() in ("off", "0", "none"):
        return None
    return Path(env)


def config_path(name: Optional[str] = None) -> Optional[Path]:
    """The configs file for device ``name`` (default: the current device), or None (no device, or
    tuned configs switched off). The file need not exist."""
    name = device_name() if name is None else name
    folder = configs_dir()
    if name is None or folder is None:
        return None
    return folder / f"{device_key(name)}.json"


def reset() -> None:
    """Forget what was read (the next launch reads the file again): after changing the environment
    variable or the file within a process."""
    _TABLES.clear()
    _FILE.clear()


@contextlib.contextmanager
def override(kernel: str, config: LaunchConfig) -> Iterator[None]:
    """Every launch of ``kernel`` inside the block takes ``config``, whatever its key (the tuner
    measures one key's shapes at a time)."""
    if not isinstance(config, LaunchConfig):
        raise TypeError(f"override: config must be a LaunchConfig, got {type(config).__name__}")
    old = _OVERRIDES.get(kernel)
    _OVERRIDES[kernel] = config
    try:
        yield
    finally:
        if old is None:
            _OVERRIDES.pop(kernel, None)
        else:
            _OVERRIDES[kernel] = old


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tuned(kernel: str, key: tuple, fixed: LaunchConfig) -> LaunchConfig:
    """The config a launch of ``kernel`` with table key ``key`` runs: an override, else (compiled
    kernels only) the device's tuned file, else ``fixed`` (the table's)."""
    if _OVERRIDES:
        forced = _OVERRIDES.get(kernel)
        if forced is not None:
            return forced
    if _interpreting():
        return fixed
    table = _TABLES.get(kernel)
    if table is None:
        table = _TABLES[kernel] = _kernel_table(kernel)
    return table.get(key, fixed)


# --------------------------------------------------------------------------------------------------
# Reading and checking a file
# --------------------------------------------------------------------------------------------------
def _warn(path: Path, what: str) -> None:
    warnings.warn(f"kernel configs {path}: {what}; the fixed launch table is used there", RuntimeWarning,
                  stacklevel=4)


def read_file(path: Path, expect_device: Optional[str] = None) -> tuple[dict, list[str]]:
    """``(kernels, problems)`` of a configs file: ``kernels`` maps kernel -> key label -> entry (only
    when the file as a whole is usable), ``problems`` says what makes it unusable. ``expect_device``:
    the device key the file must be written for (its ``device_key`` field)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        return {}, [f"not readable as JSON ({type(e).__name__}: {e})"]
    if not isinstance(data, dict):
        return {}, [f"expected a JSON object at the top, got {type(data).__name__}"]
    if data.get("format") != FORMAT:
        return {}, [f"format must be {FORMAT}, got {data.get('format')!r}"]
    if expect_device is not None and data.get("device_key") != expect_device:
        return {}, [f"written for device {data.get('device_key')!r}, not this device {expect_device!r}"]
    kernels = data.get("kernels")
    if not isinstance(kernels, dict) or not all(isinstance(v, dict) for v in kernels.values()):
        return {}, ["'kernels' must map kernel names to objects of table keys"]
    return kernels, []


def _device_file() -> tuple[Optional[Path], dict]:
    if not _FILE:
        path = config_path()
        kernels: dict = {}
        if path is not None and path.is_file():
            kernels, problems = read_file(path, device_key(device_name()))
            for p in problems:
                _warn(path, p)
            for name in kernels:
                if name not in KERNELS:
                    _warn(path, f"unknown kernel {name!r} (registered: {', '.join(sorted(KERNELS))})")
        _FILE.append((path, kernels))
    return _FILE[0]


def entry_config(kernel: str, label: str, entry: Any) -> tuple[tuple, LaunchConfig]:
    """``(table key, config)`` of one file entry ``kernels[kernel][label]``; a ``ValueError`` says
    what is wrong with it (unknown kernel or key, malformed, not a candidate of the search space)."""
    spec = KERNELS.get(kernel)
    if spec is None:
        raise ValueError(f"unknown kernel {kernel!r}")
    keys = {key_label(k): k for k in spec.search_space}
    if label not in keys:
        raise ValueError(f"{kernel}: unknown table key {label!r} (its search space has {sorted(keys)})")
    key = keys[label]
    raw = entry.get("config") if isinstance(entry, dict) else None
    if not isinstance(raw, dict):
        raise ValueError(f"{kernel} {label}: entry must be an object with a 'config' object, got {entry!r:.120}")
    consts, warps, stages = raw.get("constexprs"), raw.get("num_warps"), raw.get("num_stages")
    if (not isinstance(consts, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in consts.values())
            or not isinstance(warps, int) or not isinstance(stages, int)):
        raise ValueError(f"{kernel} {label}: config must have integer 'constexprs', 'num_warps' and 'num_stages', "
                         f"got {raw!r:.160}")
    cfg = LaunchConfig(dict(consts), num_warps=warps, num_stages=stages)
    if cfg not in spec.search_space[key]:
        raise ValueError(f"{kernel} {label}: config {cfg.label()} is not in its search space "
                         f"({'; '.join(c.label() for c in spec.search_space[key])})")
    return key, cfg


def _kernel_table(kernel: str) -> dict[tuple, LaunchConfig]:
    path, kernels = _device_file()
    out: dict[tuple, LaunchConfig] = {}
    for label, entry in kernels.get(kernel, {}).items():
        try:
            key, cfg = entry_config(kernel, label, entry)
        except ValueError as e:
            _warn(path, str(e))
            continue
        out[key] = cfg
    return out
