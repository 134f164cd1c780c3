"""The gpu-report's stages (see jepa_engine/gpu_report.py): each runs its work in a subprocess under its
own time limit and returns an ``Outcome`` (status, one summary line, markdown details, its output's tail).

Standard library only at import, like the driver.
"""
from __future__ import annotations

import collections
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from jepa_engine import gpu_report_results as results

ROOT = Path(__file__).resolve().parents[1]
MAX_FILES, MAX_BYTES = 8, 16 * 2**20
ORDER = ("install", "facts", "tests", "selfcheck", "bench", "profile")
# Seconds per stage: full (CUDA) and short (rehearsal). 18 minutes in all; each part 9.5 minutes (a
# 10-minute call). On an H100 (2026-11-25) install took 6 s, facts 11 s, selfcheck 18 s, profile 134 s.
LIMITS = {"install": (40, 120), "facts": (25, 60), "tests": (420, 180), "selfcheck": (85, 120),
          "bench": (325, 180), "profile": (180, 180)}
PARTS = {"all": ORDER, "tests": ("install", "facts", "tests", "selfcheck"),
         "measure": ("install", "facts", "bench", "profile")}
# benches/ files in the order they run (the kernel families first, the whole-step suites last), with
# their share in seconds of the bench stage (unused time carries on; they sum to its limit less
# TABLE_S). On an H100 under the report (2026-11-25): ema 18 s, masked attention 96 s, plan 55 s for
# its E=1 group, latent loss 25 s, planning 11 s (swm not yet run there); train and accelerate need minutes (a torch.compile
# peer per group), so they keep the groups that fit: a file cut off at its share gets SIGINT and
# writes the rows it finished.
BENCH_FILES = (("bench_ema.py", 22), ("bench_masked_attention.py", 105), ("bench_plan.py", 68),
               ("bench_latent_loss.py", 26), ("bench_planning.py", 14), ("bench_swm.py", 24),
               ("bench_train.py", 30), ("bench_accelerate.py", 28))
# benches/ files the report does not run, and why: the shares above fill the stage, and the stages fill
# the report's two 9.5-minute parts.
BENCH_LEFT_OUT = {"bench_export.py": "a CPU measurement (the exported package in the C++ runner against the "
                                     "Python planner) whose AOTInductor export alone takes about 40 s on 2 cores",
                  "bench_sampling.py": "the native C++ sampling and refit on the CPU; it skips itself on a CUDA "
                                       "machine (the Triton kernels' rows are in bench_planning.py)"}
# Under the report the benches time slow functions with fewer calls (benches/conftest.py).
BENCH_ENV = {"JEPA_BENCH_QUICK": "1"}
# A bench file's pytest: SIGINT this long before its share ends (its JSON is written in a second or
# two), and stopped this long after its last line ("3 passed, 1 failed in 9.81s") if still running
# (torch's compile-worker pool can hang the interpreter's exit for minutes).
BENCH_GRACE_S, BENCH_EXIT_S = 8.0, 5.0
PYTEST_SUMMARY = r"^=*\s*(no tests ran|\d+ \w+(, \d+ \w+)*) in [\d.]+s( \([\d:]+\))?\s*=*$"
SHORT_BENCH = ("bench_planning.py", "1-jepa_engine or 1-eager_loop")
SHORT_TESTS = ("tests/test_masks.py", "tests/test_package.py::test_import_is_light")
PROFILE_ARGS = ("--quick", "--budgets", "cem:300x30,cem:64x5,mppi:32x3", "--budget-minutes", "1")
SHORT_PROFILE_ARGS = ("--quick", "--budget-minutes", "0", "--decisions", "1", "--budgets", "cem:4x1",
                      "--reasoning-tokens", "0", "--sizes", "1x", "--no-energy", "--timing-seconds", "0.01")
OPTIONAL = {"hypothesis": "the property tests in three kernel test files cannot be collected",
            "tqdm": "the profile runs with a no-op progress bar put on its path"}
TAIL_CHARS, ECHO_CHARS, GRACE_S = 64_000, 4_000_000, 15.0
TABLE_S = 8.0    # of the bench stage's limit, kept for the markdown table of the merged JSON
FILE_TAIL_CHARS = 3000   # of a bench file's output, kept in the report when it did not end well
# Environment a stage must not inherit from a pytest it runs under (the rehearsal in an xdist worker):
# with PYTEST_XDIST_WORKER set, pytest-benchmark disables itself and writes no JSON.
NOT_INHERITED = ("PYTEST_XDIST_", "PYTEST_CURRENT_TEST")


# ------------------------------------------------------------------------------------------------
# Running one command under a time limit
# ------------------------------------------------------------------------------------------------
@dataclass
class Ran:
    rc: Optional[int]
    timed_out: bool
    seconds: float
    output: str          # the last TAIL_CHARS characters of stdout + stderr
    done_line: str = ""  # the line that matched ``done``, if one did
    lingered: bool = False   # stopped ``exit_s`` after that line, still running (an exit hook hanging)


def run_command(cmd: list[str], limit_s: float, env: Optional[dict] = None, prefix: str = "",
                done: Optional[str] = None, exit_s: float = 5.0, grace_s: float = GRACE_S) -> Ran:
    """Run ``cmd`` in its own process group from the repository root, echoing its output; SIGINT at
    ``limit_s`` minus a grace period, SIGKILL to the group at ``limit_s``. With ``done`` (a regex), a
    command still running ``exit_s`` after printing a line it matches is stopped there (SIGKILL)."""
    t0 = time.monotonic()
    grace = min(grace_s, 0.25 * limit_s)
    # The stage gets SIGINT's default action whatever this process does with it (an ignored SIGINT is
    # inherited, and the stage's SIGINT before its limit would then do nothing).
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, text=True, errors="replace",
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    tail: collections.deque[str] = collections.deque()
    size = [0, 0]   # characters in the tail, characters echoed
    done_re, seen = (re.compile(done) if done else None), {}

    def pump() -> None:
        for line in proc.stdout:
            tail.append(line)
            size[0] += len(line)
            while size[0] > TAIL_CHARS and len(tail) > 1:
                size[0] -= len(tail.popleft())
            if size[1] < ECHO_CHARS:
                size[1] += len(line)
                sys.stdout.write(prefix + line)
                sys.stdout.flush()
            if done_re is not None and "at" not in seen and done_re.search(line.rstrip("\n")):
                seen.update(line=line.strip(), at=time.monotonic())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = lingered = False
    deadline = t0 + max(limit_s - grace, 0.1)
    try:
        while True:
            try:
                proc.wait(timeout=max(min(deadline - time.monotonic(), 0.2), 0.01))
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    timed_out = True
                    _stop(proc, grace)
                    break
                if "at" in seen and time.monotonic() >= seen["at"] + exit_s:
                    lingered = True
                    break
    except KeyboardInterrupt:
        _stop(proc, grace)
        raise
    finally:
        _signal(proc, signal.SIGKILL)   # what the command left behind in its group (compile workers)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        reader.join(timeout=5)
    return Ran(proc.returncode, timed_out, time.monotonic() - t0, "".join(tail), seen.get("line", ""), lingered)


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(proc: subprocess.Popen, grace: float) -> None:
    _signal(proc, signal.SIGINT)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _signal(proc, signal.SIGKILL)
        proc.wait()


# ------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------
@dataclass
class Context:
    work: Path                        # scratch folder for what stages write before it is named
    short: bool
    install: bool = False
    test_workers: Optional[int] = None   # None: default_test_workers()
    python: str = sys.executable
    cuda: Optional[bool] = None       # known after the facts stage
    facts: dict = field(default_factory=dict)
    artifacts: dict = field(default_factory=dict)   # "<what>.<ext>" -> path in `work`

    def env(self, interpret: bool = False, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith(NOT_INHERITED)}
        env.update(PYTHONUNBUFFERED="1", **extra)
        if self.short:   # on a busy 2-core machine torch's two threads mostly wait for each other
            env["OMP_NUM_THREADS"] = "1"
        if interpret:
            env["TRITON_INTERPRET"] = "1"
        return env


@dataclass
class Outcome:
    status: str                 # ok | failed | timeout | error | skipped | interrupted
    summary: str                # one line for the table
    details: str = ""           # markdown for the stage's section
    log: str = ""
    data: dict = field(default_factory=dict)


@dataclass
class Stage:
    name: str
    run: Callable[[Context, float], Outcome]
    limit_s: Optional[float] = None   # None: LIMITS[name], full or short as the run turns out
    needs_cuda: bool = False

    def limit(self, short: bool) -> float:
        return self.limit_s if self.limit_s is not None else LIMITS[self.name][1 if short else 0]


def _ran_status(r: Ran) -> str:
    return "timeout" if r.timed_out else ("ok" if r.rc == 0 else "failed")


def _ended(r: Ran, limit_s: float) -> str:
    return f"timed out after {limit_s:.0f} s" if r.timed_out else f"exit {r.rc}"


def stage_install(ctx: Context, limit_s: float) -> Outcome:
    if not ctx.install:
        return Outcome("skipped", "skipped: not requested (--install; `make gpu-report` installs on a GPU machine)")
    t_end = time.monotonic() + limit_s
    # Without setup.py's CMake build of the native library (CPU kernels; the device runs the Triton ones):
    # the stage's limit is for the install, not for compiling C++ against the device's torch.
    r = run_command([ctx.python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                     "-e", str(ROOT)], limit_s, ctx.env(JEPA_ENGINE_BUILD_NATIVE="0"), "[install] ")
    lines = [f"pip install -e . (no registry): {_ended(r, limit_s)} in {r.seconds:.0f} s"]
    importlib.invalidate_caches()
    missing = [m for m in OPTIONAL if importlib.util.find_spec(m) is None]
    wheels = sorted((ROOT / "wheels").glob("*.whl"))
    log = r.output
    if missing and wheels:
        w = run_command([ctx.python, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(ROOT / "wheels"),
                         *missing], max(t_end - time.monotonic(), 5), ctx.env(), "[install] ")
        lines.append(f"from wheels/ ({len(wheels)} wheels): {' '.join(missing)}: {_ended(w, 0)}")
        log += w.output
        importlib.invalidate_caches()
        missing = [m for m in OPTIONAL if importlib.util.find_spec(m) is None]
    for m in missing:
        lines.append(f"missing {m}: {OPTIONAL[m]} (bring wheels/: `make gpu-wheels` where a registry is reachable)")
    return Outcome(_ran_status(r), "; ".join(lines), log=log, data={"missing": missing})


def stage_facts(ctx: Context, limit_s: float) -> Outcome:
    code = "from jepa_engine.gpu_report_results import print_facts; print_facts()"
    r = run_command([ctx.python, "-c", code], limit_s, ctx.env(), "[facts] ")
    try:
        ctx.facts = results.parse_facts(r.output)
    except ValueError:
        last = r.output.strip().splitlines()[-1:] or [""]
        return Outcome("timeout" if r.timed_out else "failed", f"no facts ({_ended(r, limit_s)}): {last[0]}",
                       log=r.output)
    ctx.cuda = bool(ctx.facts.get("torch", {}).get("cuda_available"))
    missing = [m for m in OPTIONAL if not (ctx.facts.get("packages") or {}).get(m)]
    note = "".join(f"; missing {m}: {OPTIONAL[m]}" for m in missing)
    return Outcome(_ran_status(r), results.facts_line(ctx.facts) + note, results.facts_markdown(ctx.facts),
                   r.output, data=ctx.facts)


def default_test_workers(cpus: Optional[int] = None) -> int:
    """pytest-xdist workers for the tests on CUDA: all CPUs but two, at most 12 (one CUDA context each)."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, min(12, cpus - 2))


def test_files(root: Path = ROOT) -> list[str]:
    """The suite's files, slowest first by the newest full run's JUnit XML in benches/results/ (files it
    does not name after them, in name order): with ``--dist loadfile`` each file goes to one worker in
    this order, so the long ones start first instead of last."""
    files = sorted(str(f.relative_to(root)) for pattern in ("test_*.py", "bench_*.py")
                   for f in (root / "tests").rglob(pattern)
                   if not any(part.startswith((".", "__")) for part in f.relative_to(root).parts[:-1]))
    seconds: dict[str, float] = {}
    xmls = [x for x in (root / "benches" / "results").glob("*-tests*.xml") if "-short" not in x.name]
    dated = [(m.group(0), x.name, x) for x in xmls if (m := re.search(r"\d{4}-\d{2}-\d{2}", x.name))]
    if dated:
        try:
            seconds = {f["file"]: f["seconds"] for f in results.junit_summary(max(dated)[2], root)["files"]}
        except Exception:   # an unreadable XML only costs the order
            seconds = {}
    return sorted(files, key=lambda f: -seconds.get(f, 0.0))


def _xdist_version() -> tuple:
    try:
        import importlib.metadata

        return tuple(int(x) for x in re.findall(r"\d+", importlib.metadata.version("pytest-xdist"))[:2])
    except Exception:
        return ()


def tests_command(ctx: Context, xml: Path, workers: int) -> list[str]:
    cmd = [ctx.python, "-m", "pytest", *(SHORT_TESTS if ctx.short else test_files()), "-q", "-rfE",
           f"--junitxml={xml}", "-o", "junit_family=xunit1", "--continue-on-collection-errors",
           "-p", "no:cacheprovider", "--durations=15"]
    if workers > 0:
        # loadfile: a file's module fixtures (the profile run, the rehearsal) are built once, on one
        # worker. pytest-xdist 3.8 reorders files by test count unless told not to, which put the
        # slowest file (5 tests, 4 minutes) last and ran the stage out of time.
        cmd += ["-n", str(workers), "--dist", "loadfile"]
        if _xdist_version() >= (3, 8):
            cmd.append("--no-loadscope-reorder")
    return cmd


def stage_tests(ctx: Context, limit_s: float) -> Outcome:
    xml = ctx.work / "tests.xml"
    workers = 0 if ctx.short or importlib.util.find_spec("xdist") is None else (
        default_test_workers() if ctx.test_workers is None else ctx.test_workers)
    extra = {}
    if workers > 0 and "OMP_NUM_THREADS" not in os.environ:   # workers x all CPUs' threads oversubscribe
        extra["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    r = run_command(tests_command(ctx, xml, workers), limit_s, ctx.env(interpret=not ctx.cuda, **extra), "[tests] ")
    how = (f"{'compiled kernels on CUDA' if ctx.cuda else 'Triton interpreter'}, "
           + (f"{workers} xdist workers (loadfile, slowest files first)" if workers else "no xdist workers"))
    if not xml.is_file():
        return Outcome("failed" if not r.timed_out else "timeout", f"no JUnit XML written ({_ended(r, limit_s)}; "
                       f"{how})", log=r.output)
    ctx.artifacts["tests.xml"] = xml
    s = results.junit_summary(xml, ROOT)
    t = s["totals"]
    bad_files = sum(1 for f in s["files"] if f["failed"] + f["errors"])
    line = (f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped in "
            f"{len(s['files'])} files ({bad_files} with failures; {how}; {_ended(r, limit_s)})")
    if s["missing_modules"]:
        line += f"; missing modules: {', '.join(s['missing_modules'])}"
    return Outcome(_ran_status(r), line, results.junit_markdown(s), r.output, data=s)


def stage_selfcheck(ctx: Context, limit_s: float) -> Outcome:
    r = run_command([ctx.python, "-m", "jepa_engine", "selfcheck"], limit_s, ctx.env(), "[selfcheck] ")
    ok, bad = len(re.findall(r"\sok$", r.output, re.M)), len(re.findall(r"MISMATCH$", r.output, re.M))
    lines = [ln for ln in r.output.splitlines() if ln.startswith(("Kernel vs", "  "))]
    return Outcome(_ran_status(r), f"{ok} ok, {bad} mismatched ({_ended(r, limit_s)})",
                   "```\n" + "\n".join(lines) + "\n```", r.output)


def bench_command(ctx: Context, path: str, out: Path) -> list[str]:
    """pytest on one benches/ file writing its JSON to ``out``. Never under pytest-xdist: with it,
    pytest-benchmark disables itself and writes nothing."""
    return ([ctx.python, "-m", "pytest", path, "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-rs",
             f"--benchmark-json={out}"] + (["-k", SHORT_BENCH[1]] if ctx.short else []))


def stage_bench(ctx: Context, limit_s: float, files: Optional[tuple] = None) -> Outcome:
    """benches/ file by file, each under its share (``files``: (path under benches/ or absolute, share
    in seconds); default BENCH_FILES, one small file when short). A file that fails, is cut off or
    leaves no readable JSON is recorded with its output's tail; the other files' rows are merged."""
    files = files or (((SHORT_BENCH[0], limit_s),) if ctx.short else BENCH_FILES)
    t_stop = time.monotonic() + limit_s
    t_end, carry, parts, runs, log = t_stop - TABLE_S, 0.0, [], [], ""
    for name, share in files:
        left = t_end - time.monotonic()
        if left < 5:
            runs.append({"file": name, "status": "not run", "rows": 0,
                         "how": f"the stage's {limit_s:.0f} s were used up"})
            continue
        budget = min(share + carry, left)
        try:
            rec, data, output = _bench_file(ctx, name, budget)
        except Exception as e:   # one file's trouble is that file's row; the others still run
            rec, data, output = {"file": name, "status": "error", "rows": 0, "seconds": 0.0,
                                 "how": f"{type(e).__name__}: {e}"}, None, ""
        carry = max(budget - rec["seconds"], 0.0)
        log += output[-TAIL_CHARS // len(files):]
        if data:
            parts.append(data)
        runs.append(rec)
    merged, n_rows, details = ctx.work / "bench.json", 0, _bench_files_markdown(runs)
    try:
        n_rows = results.merge_bench_json(parts, merged)
    except Exception as e:
        details += f"\n\n(merging the files' JSON failed: {type(e).__name__}: {e})"
    if n_rows:
        ctx.artifacts["bench.json"] = merged
        t = run_command([ctx.python, "-m", "benches.report", str(merged)], max(t_stop - time.monotonic(), 5), ctx.env())
        details += "\n\n" + (t.output if t.rc == 0 else f"(table failed: {t.output[-500:]})")
    bad = [r for r in runs if r["status"] != "ok" or not r["rows"]]
    status = "ok" if not bad else ("timeout" if all(r["status"] in ("timeout", "not run") for r in bad) else "failed")
    summary = f"{n_rows} rows from {len(parts)} of {len(files)} files"
    if bad:
        summary += "; " + ", ".join(f"{r['file']} {_bench_problem(r)}" for r in bad)
    return Outcome(status, summary, details, log, data={"files": runs})


def _bench_file(ctx: Context, name: str, budget: float) -> tuple[dict, Optional[dict], str]:
    out = ctx.work / f"bench-{Path(name).stem}.json"
    out.unlink(missing_ok=True)
    path = name if Path(name).is_absolute() else f"benches/{name}"
    r = run_command(bench_command(ctx, path, out), budget, ctx.env(**BENCH_ENV), f"[bench {Path(name).stem}] ",
                    done=PYTEST_SUMMARY, exit_s=BENCH_EXIT_S, grace_s=BENCH_GRACE_S)
    data, problem = results.read_bench_json(out)
    rows = len(data["benchmarks"]) if data else 0
    if r.lingered:   # every test ran; the interpreter's exit did not end
        status = "failed" if re.search(r"\d+ (failed|errors?)\b", r.done_line) else "ok"
        how = (f"{r.done_line} ({r.seconds:.0f} of {budget:.0f} s; its exit hung and was stopped "
               f"{BENCH_EXIT_S:.0f} s after)")
    else:
        status = _ran_status(r)
        how = (f"cut off (SIGINT) after {r.seconds:.0f} s of its {budget:.0f} s" if r.timed_out else
               f"exit {r.rc} in {r.seconds:.0f} of {budget:.0f} s")
    rec = {"file": name, "status": status, "rows": rows, "seconds": r.seconds, "budget_s": budget, "how": how}
    if problem:
        rec["json"] = problem
    if rec["status"] != "ok" or not rows:
        rec["log_tail"] = r.output[-FILE_TAIL_CHARS:]
    return rec, (data if rows else None), r.output


def _bench_problem(r: dict) -> str:
    what = {"timeout": "cut off", "ok": "no rows"}.get(r["status"], r["status"])
    if r["rows"]:
        return f"{what} ({r['rows']} rows kept)"
    return f"{what} ({r.get('json') or r['how']})" if r["status"] != "not run" else what


def _bench_files_markdown(runs: list[dict]) -> str:
    out = ["| file | status | rows | how | JSON |", "|---|---|---|---|---|"]
    for r in runs:
        flag = "ok" if r["status"] == "ok" and r["rows"] else f"**{_bench_problem(r).split(' (')[0].upper()}**"
        out.append(f"| {r['file']} | {flag} | {r['rows']} | {r['how']} | {r.get('json', '') or '-'} |")
    for r in runs:
        if r.get("log_tail"):
            tail = "\n".join(r["log_tail"].rstrip().splitlines()[-15:])
            out += ["", f"Last lines of {r['file']}:", "", "```", tail, "```"]
    return "\n".join(out)


_TQDM_STANDIN = '''class tqdm:
    """No-op progress bar: tqdm is not installed here."""
    def __init__(self, *a, total=None, **k): self.total, self.n = total or 0, 0
    def __enter__(self): return self
    def __exit__(self, *exc): return False
    def update(self, n=1): self.n += n
    def set_postfix_str(self, *a, **k): pass
    def close(self): pass
'''


def stage_profile(ctx: Context, limit_s: float) -> Outcome:
    out = ctx.work / "profile"
    cmd = [ctx.python, "-m", "jepa_engine", "profile", *(SHORT_PROFILE_ARGS if ctx.short else PROFILE_ARGS),
           "--no-progress", "--out", str(out)]
    extra, note = {}, ""
    if importlib.util.find_spec("tqdm") is None:
        shim = ctx.work / "tqdm-standin" / "tqdm"
        shim.mkdir(parents=True, exist_ok=True)
        (shim / "__init__.py").write_text(_TQDM_STANDIN)
        (shim / "auto.py").write_text("from tqdm import tqdm  # noqa: F401\n")
        extra["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim.parent), os.environ.get("PYTHONPATH")]))
        note = "; tqdm missing: a no-op progress bar stood in"
    r = run_command(cmd, limit_s, ctx.env(**extra), "[profile] ")
    for ext in ("json", "md", "png"):
        if (out / f"profile.{ext}").is_file():
            ctx.artifacts[f"profile.{ext}"] = out / f"profile.{ext}"
    if not (out / "profile.json").is_file():
        return Outcome("timeout" if r.timed_out else "failed", f"no profile.json ({_ended(r, limit_s)}){note}",
                       log=r.output)
    rep = json.loads((out / "profile.json").read_text())
    table = ["| row | latency ms | J / decision | J above idle | idle W | success |", "|---|---|---|---|---|---|"]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for row in rep["rows"]:
        sweep = {"reasoning_tokens": f" [sweep L={row.get('reasoning_tokens')}]",
                 "size": f" [sweep size {row.get('size')}]"}.get(row.get("sweep"), "")
        table.append(f"| {row['name']}{sweep} | {row['latency_s'] * 1e3:.3g} "
                     f"| {fmt(row.get('joules_per_decision'), '.3g')} "
                     f"| {fmt(row.get('above_idle_joules_per_decision'), '.3g')} | {fmt(row.get('idle_watts'), '.0f')} "
                     f"| {fmt(row.get('success_rate'), '.0%')} |")
    energy = rep["energy"]["status"]
    return Outcome(_ran_status(r), f"{len(rep['rows'])} rows in {rep['seconds']:.0f} s; energy: {energy}{note}",
                   "\n".join(table), r.output, data={"energy": rep["energy"], "rows": len(rep["rows"])})


STAGES = {"install": stage_install, "facts": stage_facts, "tests": stage_tests, "selfcheck": stage_selfcheck,
          "bench": stage_bench, "profile": stage_profile}


def default_stages(names=ORDER) -> list[Stage]:
    return [Stage(n, STAGES[n], needs_cuda=n == "selfcheck") for n in names]
