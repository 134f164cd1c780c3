"""The command line's argument types and error handling: one-line parser errors with a did-you-mean, ints and
finite numbers with a lower bound, devices present on this machine."""
from __future__ import annotations

import argparse
import difflib
import math
import re


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) that suggest the closest option, command or choice."""

    def __init__(self, *args, **kwargs):
        self.options: list[str] = []   # every option string, for the did-you-mean of an unknown one
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        self.options.extend(action.option_strings)
        return action

    def error(self, message: str):
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if m and "maybe you meant" not in message:
            choices = [c.strip().strip("'\"") for c in m.group(2).split(",")]
            close = difflib.get_close_matches(m.group(1), choices, n=1)
            message += f" (did you mean {close[0]!r}?)" if close else ""
        self.exit(2, f"{self.prog}: error: {message}\n")


def option_hint(extra: list[str], options: list[str]) -> str:
    """`` (did you mean --samples?)`` for the first unknown option with a close known one."""
    for arg in extra:
        if arg.startswith("--"):
            close = difflib.get_close_matches(arg.split("=", 1)[0], options, n=1)
            if close:
                return f" (did you mean {close[0]}?)"
    return ""


def int_at_least(minimum: int):
    """An argparse type: an int >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {text!r}")
        return value

    return parse


def number_at_least(minimum: float, strict: bool = False):
    """An argparse type: a finite number >= ``minimum`` (> with ``strict``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > minimum if strict else value >= minimum)):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>' if strict else '>='} {minimum:g}, "
                                             f"got {text!r}")
        return value

    return parse


def known_device(text: str) -> str:
    """An argparse type: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, and present on this machine."""
    if text == "auto":
        return text
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"no CUDA device on this machine (torch {torch.__version__}), "
                                             f"got {text!r}")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"this machine has {count} CUDA device(s), cuda:0 .. cuda:{count - 1}, "
                                             f"got {text!r}")
    return text
