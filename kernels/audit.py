"""Ahead-of-time audit of every registered kernel, on a machine with or without a GPU.

``python -m jepa_engine.kernels.audit`` compiles each (kernel, dtype variant, launch config) for
Hopper (sm_90a) and Ampere (sm_80) and prints registers, spills (local memory), dynamic shared memory
and tensor-core instructions (HGMMA on sm_90a, HMMA on sm_80) read from the cubin with the
``cuobjdump`` that ships inside Triton. ``--json`` prints the rows as JSON. Exit status 1 when any
kernel spills or needs more shared memory than its target has.

``--search-space`` compiles the tuner's candidates too (each kernel's ``search_space``, beyond the launch
tables: what a tuned ``kernels/configs/<device>.json`` may pick), ``--search-space-only`` them alone;
their rows say ``candidate``. The test suite's background audit compiles the tables only.

Triton's interpreter replaces ``@triton.jit`` at import time, so the audit refuses to run with
``TRITON_INTERPRET=1`` set (run it in a separate process).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
import multiprocessing
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

# Largest dynamic shared memory a block may use (opt-in maximum), bytes.
SHARED_LIMIT = {90: 232448, 80: 166912}
TARGET_NAME = {90: "sm_90a", 80: "sm_80"}


@dataclass
class AuditRow:
    kernel: str
    variant: str
    config: str
    target: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    tensor_core_ops: int
    ok: bool
    error: str = ""
    # Stack frame of the kernel (ptxas puts register spills there; LOCAL counts only .local arrays).
    stack_bytes: int = -1
    # A search-space candidate (a config only a tuned file gives the launcher), not a table entry.
    candidate: bool = False


@functools.lru_cache(maxsize=None)
def _cuobjdump() -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"audit: cuobjdump not found at {path}")
    return str(path)


def _cubin_facts(cubin: bytes) -> dict[str, int]:
    """Registers, local memory, stack frame and tensor-core instruction count of a one-kernel cubin.

    ptxas puts register spills in the stack frame (``STACK``) as well as in ``LOCAL``: a kernel is
    spill-free only when both are 0.
    """
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout

    def field(name: str) -> int:
        m = re.search(rf"{name}:(\d+)", usage)
        return int(m.group(1)) if m else -1

    return {"registers": field("REG"), "spill_bytes": field("LOCAL"), "stack_bytes": field("STACK"),
            "tensor_core_ops": len(re.findall(r"\b(?:HGMMA|HMMA)\.", sass))}


def compile_one(fn, signature: dict[str, str], constexprs: dict, num_warps: int, num_stages: int, arch: int,
                aligned: tuple[str, ...] = ()):
    """Compile a ``@triton.jit`` function for ``arch`` (90 or 80) without a GPU.

    ``signature`` types the kernel's runtime arguments (:func:`jepa_engine.kernels._registry.signature`
    derives it from the kernel), ``constexprs`` gives every ``tl.constexpr`` argument its value."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from ._registry import runtime_args

    jit = fn
    while not isinstance(jit, JITFunction):  # an Autotuner/Heuristics wraps the JITFunction
        jit = jit.fn
    runtime = set(runtime_args(jit))
    sig = {}
    for name in jit.arg_names:  # constexpr or not as the kernel declares it
        if name not in runtime and name not in constexprs:
            raise KeyError(f"audit: {jit.__name__} constexpr {name!r} has no value in the variant or config")
        if name in runtime and name not in signature:
            raise KeyError(f"audit: {jit.__name__} argument {name!r} has no type in the signature")
        sig[name] = signature[name] if name in runtime else "constexpr"
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(jit.arg_names) if name in aligned}
    src = ASTSource(fn=jit, signature=sig, constexprs=dict(constexprs), attrs=attrs or None)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _audit_one(task: tuple[str, str, int, int, bool]) -> AuditRow:
    """Compile one (kernel, variant, config index, arch, search-space candidate?) and read its cubin."""
    from ._registry import KERNELS

    name, variant, cfg_index, arch, candidate = task
    spec = KERNELS[name]
    signature, consts = spec.variants[variant]
    cfg = (spec.search_configs_for(variant) if candidate else spec.configs_for(variant))[cfg_index]
    row = AuditRow(spec.name, variant, cfg.label(), TARGET_NAME[arch], -1, -1, -1, -1, False, candidate=candidate)
    try:
        k = compile_one(spec.fn, signature, {**consts, **cfg.constexprs}, cfg.num_warps, cfg.num_stages, arch,
                        spec.aligned_args)
        for key, value in _cubin_facts(k.asm["cubin"]).items():
            setattr(row, key, value)
        row.shared_bytes = int(k.metadata.shared)
        row.ok = row.spill_bytes == 0 and row.stack_bytes == 0 and row.shared_bytes <= SHARED_LIMIT[arch]
        # fp16/bf16 variants, and fp32 ones compiled for TF32, must run their dots on tensor cores.
        if spec.uses_tensor_cores and ("fp32" not in variant or "tf32" in variant) and row.tensor_core_ops == 0:
            row.ok, row.error = False, "no tensor-core instruction"
    except Exception as e:  # reported in the table, fails the audit
        row.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    return row


def audit(names: list[str] | None = None, jobs: int | None = None, search_space: bool = False,
          tables: bool = True) -> list[AuditRow]:
    """Compile every registered kernel (or those in ``names``) for each of its variants, configs and
    targets; ``jobs`` worker processes compile in parallel (default: one per CPU core). ``search_space``
    adds the tuner's candidates of each variant (``KernelSpec.search_configs_for``); ``tables=False``
    leaves the launch tables' own configs out."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("audit: unset TRITON_INTERPRET; the interpreter replaces compiled kernels")
    import jepa_engine.kernels  # noqa: F401  (importing the ops registers their kernels)
    from ._registry import KERNELS

    unknown = set(names or ()) - set(KERNELS)
    if unknown:
        raise ValueError(f"audit: unknown kernels {sorted(unknown)}; registered: {sorted(KERNELS)}")
    tasks = [(spec.name, variant, i, arch, candidate)
             for spec in KERNELS.values() if not names or spec.name in names
             for variant in spec.variants
             for candidate, configs in ((False, spec.configs_for(variant) if tables else []),
                                        (True, spec.search_configs_for(variant) if search_space else []))
             for i in range(len(configs))
             for arch in spec.targets]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(tasks)))
    if jobs == 1:
        return [_audit_one(t) for t in tasks]
    # Compilation is CPU-bound Python + ptxas: separate processes (forked: the registry is inherited).
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        return list(pool.map(_audit_one, tasks, chunksize=4))


def format_table(rows: list[AuditRow]) -> str:
    head = ["kernel", "variant", "config", "target", "regs", "spill B", "stack B", "smem B", "TC ops", "ok"]
    body = [[r.kernel, r.variant, r.config + (" (candidate)" if r.candidate else ""), r.target, str(r.registers),
             str(r.spill_bytes), str(r.stack_bytes),
             str(r.shared_bytes), str(r.tensor_core_ops), "yes" if r.ok else f"NO {r.error}"] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(out + [line(b) for b in body])


def main(argv: list[str] | None = None) -> int:
    # Triton 3.9 warns that its fp-fusion default will change; keep today's default, quietly.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    ap = argparse.ArgumentParser(prog="python -m jepa_engine.kernels.audit", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    ap.add_argument("--kernel", action="append", help="audit only this kernel (repeatable)")
    ap.add_argument("--jobs", type=int, default=None, help="compile in this many processes (default: CPU cores)")
    ap.add_argument("--search-space", action="store_true",
                    help="also compile the tuner's candidates (each kernel's search space)")
    ap.add_argument("--search-space-only", action="store_true",
                    help="compile the tuner's candidates only, not the launch tables' configs")
    args = ap.parse_args(argv)
    rows = audit(args.kernel, args.jobs, search_space=args.search_space or args.search_space_only,
                 tables=not args.search_space_only)
    print(json.dumps([asdict(r) for r in rows], indent=1) if args.json else format_table(rows))
    bad = [r for r in rows if not r.ok]
    if not args.json:
        print(f"\n{len(rows)} compilations, {len(bad)} failing (spills, shared memory over the limit, or errors)")
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
