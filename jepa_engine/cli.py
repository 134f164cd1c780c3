"""Command line: ``jepa-engine <command>`` (also ``python -m jepa_engine <command>``)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys


def _audit(args: argparse.Namespace) -> int:
    # The audit compiles real kernels: it runs in a process that does not interpret Triton.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run([sys.executable, "-m", "jepa_engine.kernels.audit"], env=env).returncode


def _selfcheck(args: argparse.Namespace) -> int:
    from jepa_engine import selfcheck

    return selfcheck.run()


def _demo(args: argparse.Namespace) -> int:
    print("== Kernel audit: sm_90a and sm_80, compiled ahead of time ==", flush=True)
    rc = _audit(args)
    print("\n== Self-check ==", flush=True)
    return rc or _selfcheck(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jepa-engine", description="Fused Triton kernels and a fast JEPA engine.")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="the main job on the built-in default").set_defaults(func=_demo)
    sub.add_parser("audit", help="compile every kernel for sm_90a/sm_80, print registers/spills/smem").set_defaults(
        func=_audit)
    sub.add_parser("selfcheck", help="each kernel against its PyTorch reference").set_defaults(func=_selfcheck)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
