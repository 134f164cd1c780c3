"""`make gpu-report` / `jepa-engine gpu-report --out DIR`: the project's GPU evidence in one command.

Stages, in this order, each in its own subprocess with its own time limit; a stage that fails, raises
or runs out of time is recorded with its reason and the next one runs:

    install     pip install -e . without a registry (--install), then hypothesis / tqdm from wheels/ if missing
    facts       GPU name, driver, power limit, clocks (nvidia-smi, NVML, idle power); Python/torch/triton/CUDA
    tune        `python -m jepa_engine.kernels.tuning` within its share: every kernel's launch-config search
                space timed at the benchmark shapes; its kernels/configs/<device>.json is one of the report's
                files (to commit), and the later stages run with it
    bench       the core benchmark groups (benches/ files with a -k selection each, a time share each, unused
                time passed on; never under xdist): EMA ViT-B/ViT-H, masked attention vs SDPA and FlexAttention
                at JEPA shapes fwd and fwd+bwd, the lewm plan at E=1 and E=64 vs the eager loop and
                torch.compile, the I-JEPA and ViT-B train steps; one merged JSON + table
    profile     `jepa-engine profile --quick` at the LeWorldModel CEM budget too (graphed planner vs decoder),
                with NVML energy (counter based, idle power measured before each window)
    multiblock  the kernel tests at multi-block shapes (`-m multiblock`), compiled
    tests       the rest of the test suite with the time left: JUnit XML and pass/fail per file (pytest-xdist
                when installed: all CPUs but two, at most 12 workers, one file per worker, slowest first)

(`selfcheck`, every kernel against its reference through `jepa-engine selfcheck`, runs when named.)
Each stage's share is printed before the first runs. A full run ends within ``TOTAL_S`` (9 minutes)
of its start: a stage's limit is its share cut to what is left, and the test suite takes what is left.
Then a summary table, printed and written as markdown. At most 7 files (the caller's console log makes
8), each at most 16 MiB, land in one folder named ``<device>-<yyyy-mm-dd>-<what>.<ext>``, ready to be
copied into benches/results/ (the tuned configs into kernels/configs/<device>.json). On a timeout the
stage gets SIGINT first (pytest still writes its JUnit XML and benchmark JSON for what finished),
SIGKILL 15 s later.

Without CUDA (or with --short) it is a rehearsal: the tuner's interpreter rehearsal, one small
benchmark file, a seconds-long untrained profile without energy, each kernel's small multi-block case
and a few tests under the Triton interpreter. Limits: ``LIMITS``; parts (``PARTS``: measure, tests) and
comma-separated stage lists select stages. Standard library only at import: this file also runs as a
script (``python3 jepa_engine/gpu_report.py``) before the package is installed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: import the package from its source folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from jepa_engine import gpu_report_results as results  # noqa: E402
from jepa_engine.gpu_report_stages import (FINISH_S, MAX_BYTES, ORDER, PARTS, STAGES, TAIL_CHARS,  # noqa: E402
                                           TOTAL_S, Context, Outcome, Stage, default_stages, plan_lines,
                                           run_command)

# A stage with less time than this left of the report's TOTAL_S is not started.
MIN_STAGE_S = 10.0


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------
def run_report(out: str | Path, *, short: Optional[bool] = None, stages: Optional[list[Stage]] = None,
               install: bool = False, test_workers: Optional[int] = None, date: Optional[str] = None) -> dict:
    """Run the stages (default: all of them), write the files into ``out`` and return the report.
    ``short=None``: the short rehearsal unless CUDA is found (by the facts stage, else a probe)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    date = date or time.strftime("%Y-%m-%d")
    with tempfile.TemporaryDirectory(prefix="gpu-report-") as work:
        # until CUDA is known: a machine without nvidia-smi gets the short limits
        guess = short if short is not None else shutil.which("nvidia-smi") is None
        ctx = Context(Path(work), short=guess, install=install, test_workers=test_workers, deadline=t0 + TOTAL_S)
        stages = stages if stages is not None else default_stages()
        planned, done, written = [s.name for s in stages], [], set()
        for line in plan_lines(stages, guess):
            print(f"== {line} ==", flush=True)
        for st in stages:
            if st.name not in ("install", "facts"):
                _settle_mode(ctx, short)
            done.append(_run_stage(st, ctx))
            # written after every stage: a run killed from outside still leaves the stages it finished
            report = _finish(out, ctx, planned, done, date, time.monotonic() - t0, written)
            if done[-1]["status"] == "interrupted":
                break
        _settle_mode(ctx, short)
        report = _finish(out, ctx, planned, done, date, time.monotonic() - t0, written)
        print("\n" + results.summary_table(done), flush=True)
        print(f"\nwrote {len(report['files'])} files to {out}: {', '.join(report['files'])}", flush=True)
        return report


def _settle_mode(ctx: Context, short: Optional[bool]) -> None:
    if ctx.cuda is None:   # no facts stage (or it failed): ask torch in a subprocess
        r = run_command([ctx.python, "-c", "import torch; print('cuda', torch.cuda.is_available())"], 60, ctx.env())
        ctx.cuda = "cuda True" in r.output
    ctx.short = short if short is not None else not ctx.cuda


def _run_stage(st: Stage, ctx: Context) -> dict:
    limit = st.limit(ctx.short)
    left = None
    if not ctx.short and ctx.deadline is not None:   # a full run: the stage ends within TOTAL_S
        left = ctx.deadline - FINISH_S - time.monotonic()
        limit = left if limit is None else min(limit, left)
    elif limit is None:
        limit = TOTAL_S
    print(f"== {st.name} (limit {max(limit, 0):.0f} s) ==", flush=True)
    t = time.monotonic()
    if left is not None and left < MIN_STAGE_S:
        o = Outcome("timeout", f"not run: {max(left, 0):.0f} s left of the report's {TOTAL_S:.0f} s")
    elif st.needs_cuda and not ctx.cuda:
        o = Outcome("skipped", "skipped: no CUDA (compiled kernels need a GPU; `make test` runs the same checks "
                               "under the Triton interpreter)")
    else:
        try:
            o = st.run(ctx, limit)
        except KeyboardInterrupt:
            o = Outcome("interrupted", "interrupted (Ctrl-C): the later stages did not run")
        except Exception as e:  # the next stage runs all the same
            o = Outcome("error", f"the stage raised {type(e).__name__}: {e}")
    rec = {"name": st.name, "status": o.status, "seconds": time.monotonic() - t, "limit_s": limit,
           "summary": o.summary, "details": o.details, "log_tail": o.log[-TAIL_CHARS:], "data": o.data}
    print(f"== {st.name}: {o.status} in {rec['seconds']:.0f} s: {o.summary}", flush=True)
    return rec


def _finish(out: Path, ctx: Context, planned: list[str], stages: list[dict], date: str, seconds: float,
            written: set) -> dict:
    """Write the report of the stages done so far (and their files) into ``out``; ``written``: the names
    written before, of which those no longer planned (the mode changed) are removed."""
    tag = ctx.facts.get("device_tag") or ("gpu" if shutil.which("nvidia-smi") else "cpu")
    part = next((p for p, members in PARTS.items() if tuple(planned) == members), "-".join(planned))
    suffix = ("" if part == "all" else f"-{part}") + ("-short" if ctx.short else "")
    name = lambda what: f"{tag}-{date}-{what}"  # noqa: E731
    plan = {name(f"gpu-report{suffix}.md"): None, name(f"gpu-report{suffix}.json"): None}
    for what, path in ctx.artifacts.items():
        stem, ext = what.rsplit(".", 1)
        plan[name(f"{stem}{'-short' if ctx.short else ''}.{ext}")] = path
    report = {"device": ctx.facts.get("device_name", tag), "device_tag": tag, "date": date, "seconds": seconds,
              "mode": ("short rehearsal (" + ("--short" if ctx.cuda else "no CUDA") + ")") if ctx.short else
              "full (CUDA)", "limits_s": sum(s["limit_s"] for s in stages), "stages": stages,
              "planned": planned, "facts": ctx.facts, "files": sorted(plan)}
    for stale in written - set(plan):
        (out / stale).unlink(missing_ok=True)
    written.clear()
    written.update(plan)
    for fname, path in plan.items():
        if path is not None:
            _copy_limited(path, out / fname, report)
    md, js = report_markdown_and_json(report)
    (out / name(f"gpu-report{suffix}.json")).write_text(js)
    (out / name(f"gpu-report{suffix}.md")).write_text(md)
    return report


def report_markdown_and_json(report: dict) -> tuple[str, str]:
    try:
        md = results.report_markdown(report)
    except Exception as e:  # the JSON and the plain table still get written
        md = f"(markdown failed: {type(e).__name__}: {e})\n\n" + results.summary_table(report["stages"])
    js = json.dumps(report, indent=1, default=str)
    if len(js.encode()) > MAX_BYTES:   # the log tails are what can grow
        for s in report["stages"]:
            s["log_tail"] = s["log_tail"][-4000:]
        js = json.dumps(report, indent=1, default=str)
    return md.encode()[:MAX_BYTES].decode(errors="ignore"), js


def _copy_limited(src: Path, dst: Path, report: dict) -> None:
    size = src.stat().st_size
    if size <= MAX_BYTES:
        shutil.copyfile(src, dst)
        return
    report["files"].remove(dst.name)
    report.setdefault("notes", []).append(f"{dst.name} not written: {size / 2**20:.1f} MiB > 16 MiB")


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", default=os.path.join("runs", "gpu-report"), help="folder for the report's files")
    ap.add_argument("--short", action="store_true", help="the short rehearsal even on CUDA")
    ap.add_argument("--install", action="store_true",
                    help="first pip install -e . without a registry (plus missing hypothesis/tqdm from wheels/)")
    ap.add_argument("--stages", default="all", help=f"a part ({', '.join(PARTS)}) or comma-separated stages "
                    f"from {','.join(STAGES)} (default all, in the order {','.join(ORDER)}: one call of at most "
                    f"{TOTAL_S / 60:.0f} minutes on a GPU)")
    ap.add_argument("--test-workers", type=int, default=None,
                    help="pytest-xdist workers for the tests on CUDA (0: none; default: CPUs - 2, at most 12)")


def run_from_args(args: argparse.Namespace) -> int:
    names = PARTS.get(args.stages) or tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = [n for n in names if n not in STAGES]
    if unknown or not names:
        print(f"gpu-report: --stages must be one of {', '.join(PARTS)} or a comma-separated list of "
              f"{','.join(STAGES)}, got {args.stages!r}", file=sys.stderr)
        return 2
    if args.test_workers is not None and args.test_workers < 0:
        print(f"gpu-report: --test-workers must be >= 0, got {args.test_workers}", file=sys.stderr)
        return 2
    report = run_report(args.out, short=True if args.short else None, stages=default_stages(names),
                        install=args.install, test_workers=args.test_workers)
    bad = [s for s in report["stages"] if s["status"] not in ("ok", "skipped")]
    return 130 if any(s["status"] == "interrupted" for s in bad) else (1 if bad else 0)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu-report", description=__doc__.splitlines()[0])
    add_arguments(ap)
    return run_from_args(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
