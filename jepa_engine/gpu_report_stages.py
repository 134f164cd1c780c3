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
import shutil
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
# The default order: measurements and tuning first, the long test suite last (what a cut-off run loses
# should be what matters least). "selfcheck" (every kernel against its reference, compiled) runs when
# named; the multi-block kernel tests cover it.
ORDER = ("install", "facts", "tune", "bench", "profile", "multiblock", "tests")
# Seconds per stage: (full share on CUDA, short rehearsal limit). A full run fits one 10-minute call:
# TOTAL_S from the report's start, FINISH_S of it kept for writing the files; each stage's limit is its
# share, cut to what is left of TOTAL_S, and a share of None takes all that is left (the test suite
# gets the time the others did not use). On an H100 (2026-11-25) install took 6 s, facts 11 s,
# selfcheck 18 s, the profile 134 s with 60 s of training (--budget-minutes 1; 12 s here).
LIMITS = {"install": (30, 120), "facts": (20, 60), "tune": (60, 60), "bench": (215, 180), "profile": (90, 180),
          "multiblock": (55, 120), "tests": (None, 180), "selfcheck": (60, 120)}
TOTAL_S, FINISH_S = 540.0, 10.0
PARTS = {"all": ORDER, "tests": ("install", "facts", "multiblock", "tests"),
         "measure": ("install", "facts", "tune", "bench", "profile")}


@dataclass(frozen=True)
class BenchGroup:
    """Benchmarks of one benches/ file selected with ``-k`` (None: the whole file), run with ``env``
    added, under a share of the bench stage's limit in seconds."""

    name: str
    file: str
    k: Optional[str]
    share: float
    env: tuple = ()


# The core benchmark groups in the order they run, each with its share of the bench stage (unused time
# carries on to the next; they sum to its limit less TABLE_S). A group cut off at its share gets SIGINT
# and keeps the benchmark groups it finished (every suite puts its peers side by side). On an H100
# under the report (2026-11-25): the whole EMA file 11 s; the lewm plan's E=1 group 55 s (its E=64
# group does 64x the work: the eager loop and torch.compile there take seconds a plan, and may be cut);
# a train-step group about 25 s before its torch.compile peer.
BENCH_GROUPS = (
    BenchGroup("EMA ViT-B, ViT-H", "bench_ema.py", "vit_base or vit_huge", 12),
    BenchGroup("masked attention vs SDPA, FlexAttention (JEPA shapes, fwd and fwd+bwd)", "bench_masked_attention.py",
               "(test_context_attention and vit_b-64 and (0.25 or 0.85) and not reference) or "
               "test_frame_causal_attention", 60),
    BenchGroup("lewm plan E=1, E=64 vs eager loop, torch.compile", "bench_plan.py", "test_plan_lewm", 85,
               (("JEPA_BENCH_PLAN_ENVS", "1,64"),)),
    BenchGroup("I-JEPA train step", "bench_train.py", "small", 25),
    BenchGroup("ViT-B train step (timm, accelerate)", "bench_accelerate.py", "vit_b16-B64 and ijepa", 25),
)
# benches/ files (or their other groups) the report does not run, and why.
BENCH_LEFT_OUT = {"bench_export.py": "a CPU measurement (the exported package in the C++ runner against the "
                                     "Python planner) whose AOTInductor export alone takes about 40 s on 2 cores",
                  "bench_sampling.py": "the native C++ sampling and refit on the CPU; it skips itself on a CUDA "
                                       "machine (the Triton kernels' rows are in bench_planning.py)",
                  "bench_latent_loss.py": "the latent loss runs PyTorch's ops on CUDA by default (they measured "
                                          "faster); its kernels are timed by the tune stage at the same shapes",
                  "bench_planning.py": "the planner's own overhead at an analytic cost; the lewm plan group "
                                       "measures the planner with its world model",
                  "bench_swm.py": "needs stable-worldmodel and its environments, which the GPU machine lacks"}
# Under the report the benches time slow functions with fewer calls (benches/conftest.py).
BENCH_ENV = {"JEPA_BENCH_QUICK": "1"}
# A bench file's pytest: SIGINT this long before its share ends (its JSON is written in a second or
# two), and stopped this long after its last line ("3 passed, 1 failed in 9.81s") if still running
# (torch's compile-worker pool can hang the interpreter's exit for minutes).
BENCH_GRACE_S, BENCH_EXIT_S = 8.0, 5.0
PYTEST_SUMMARY = r"^=*\s*(no tests ran|\d+ \w+(, \d+ \w+)*) in [\d.]+s( \([\d:]+\))?\s*=*$"
SHORT_BENCH = ("bench_planning.py", "1-jepa_engine or 1-eager_loop")
SHORT_TESTS = ("tests/test_masks.py", "tests/test_package.py::test_import_is_light")
MULTIBLOCK_TESTS = "tests/kernels/test_multiblock.py"
SHORT_MULTIBLOCK_K = "test_latent_cost and small"   # the rehearsal's one case (make test runs them all)
PROFILE_ARGS = ("--quick", "--budgets", "cem:300x30,cem:64x5,mppi:32x3", "--budget-minutes", "0.2")
# Of the tune stage's limit, kept for the tuner's start (imports) and its exit; the kernels of the
# interpreter rehearsal (no CUDA).
TUNE_MARGIN_S = 12.0
SHORT_TUNE_KERNELS = ("latent_cost_fwd", "elite_refit")
PROFILE_MD_HEADING = "The profile's own report (profile.md):"
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
    deadline: Optional[float] = None  # time.monotonic() by which a full run's stages end (TOTAL_S)
    stage_env: dict = field(default_factory=dict)   # set by a stage for the later ones (the tuned configs)
    junit: list = field(default_factory=list)       # JUnit XML files of the test stages, merged as tests.xml

    def env(self, interpret: bool = False, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith(NOT_INHERITED)}
        env.update(PYTHONUNBUFFERED="1", **self.stage_env, **extra)
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

    def limit(self, short: bool) -> Optional[float]:
        """The stage's share in seconds (None: what is left of the report's TOTAL_S)."""
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


def stage_tune(ctx: Context, limit_s: float) -> Outcome:
    """``python -m jepa_engine.kernels.tuning`` into the work folder, starting from the package's file for
    this device (kernels/configs): its ``<device>.json`` becomes the report's kernel-configs file, and the
    later stages run with it (JEPA_ENGINE_KERNEL_CONFIGS). Without CUDA the tuner's interpreter
    rehearsal runs (tiny CPU shapes, meaningless times)."""
    out = ctx.work / "configs"
    out.mkdir(parents=True, exist_ok=True)
    for f in (ROOT / "kernels" / "configs").glob("*.json"):
        shutil.copyfile(f, out / f.name)
    before = {f.name: f.stat().st_mtime_ns for f in out.glob("*.json")}
    interpret = not ctx.cuda
    budget = max(limit_s - TUNE_MARGIN_S, 5.0)
    cmd = [ctx.python, "-m", "jepa_engine.kernels.tuning", "--out", str(out), "--budget-s", f"{budget:.0f}"]
    if interpret:
        cmd += ["--interpret", *(a for k in SHORT_TUNE_KERNELS for a in ("--kernel", k))]
    r = run_command(cmd, limit_s, ctx.env(interpret=interpret), "[tune] ")
    written = [f for f in out.glob("*.json") if before.get(f.name) != f.stat().st_mtime_ns]
    if not written:
        return Outcome("timeout" if r.timed_out else "failed", f"no configs file written ({_ended(r, limit_s)})",
                       log=r.output)
    path = written[0]
    ctx.artifacts["kernel-configs.json"] = path
    if not interpret:
        ctx.stage_env["JEPA_ENGINE_KERNEL_CONFIGS"] = str(out)
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        return Outcome("failed", f"{path.name} is not JSON: {e}", log=r.output)
    details, changed = results.tuning_markdown(data)
    target = None if interpret else f"kernels/configs/{path.name}"
    line = (f"{len(data.get('groups_measured', []))} groups measured, {len(data.get('groups_cut', []))} cut, "
            f"{len(data.get('groups_not_run', []))} not run in {data.get('seconds', 0):.0f} s; {changed} keys "
            f"chose another config than the table's ({_ended(r, limit_s)})")
    details = ((f"Commit it as `{target}` (the launchers read it on this device); the later stages ran with "
                f"it (JEPA_ENGINE_KERNEL_CONFIGS).") if target else
               "The tuner's interpreter rehearsal (tiny CPU shapes, meaningless times): not a file to commit.") \
        + "\n\n" + details
    return Outcome(_ran_status(r), line, details, r.output, data={"file": path.name, "commit_as": target})


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


def tests_command(ctx: Context, xml: Path, workers: int, multiblock: bool = False) -> list[str]:
    """The test suite's pytest (``multiblock``: the multi-block kernel tests alone, else everything else)."""
    if multiblock:
        files = [MULTIBLOCK_TESTS, "-m", "multiblock"] + (["-k", SHORT_MULTIBLOCK_K] if ctx.short else [])
    else:
        files = [*(SHORT_TESTS if ctx.short else test_files()), "-m", "not multiblock"]
    cmd = [ctx.python, "-m", "pytest", *files, "-q", "-rfE",
           f"--junitxml={xml}", "-o", "junit_family=xunit1", "--continue-on-collection-errors",
           "-p", "no:cacheprovider", "--durations=15"]
    if workers > 0 and multiblock:
        cmd += ["-n", str(workers), "--dist", "load"]   # many short tests, compiles spread over the workers
    elif workers > 0:
        # loadfile: a file's module fixtures (the profile run, the rehearsal) are built once, on one
        # worker. pytest-xdist 3.8 reorders files by test count unless told not to, which put the
        # slowest file (5 tests, 4 minutes) last and ran the stage out of time.
        cmd += ["-n", str(workers), "--dist", "loadfile"]
        if _xdist_version() >= (3, 8):
            cmd.append("--no-loadscope-reorder")
    return cmd


def stage_tests(ctx: Context, limit_s: float) -> Outcome:
    """The test suite but the multi-block kernel tests (run before it by stage_multiblock)."""
    return _run_tests(ctx, limit_s, multiblock=False)


def stage_multiblock(ctx: Context, limit_s: float) -> Outcome:
    """``-m multiblock``: every kernel at multi-block shapes against its reference, compiled on CUDA (the
    rehearsal: each kernel's small case under the interpreter)."""
    return _run_tests(ctx, limit_s, multiblock=True)


def _run_tests(ctx: Context, limit_s: float, multiblock: bool) -> Outcome:
    xml = ctx.work / ("multiblock.xml" if multiblock else "tests.xml")
    workers = 0 if ctx.short or importlib.util.find_spec("xdist") is None else (
        default_test_workers() if ctx.test_workers is None else ctx.test_workers)
    extra = {}
    if workers > 0 and "OMP_NUM_THREADS" not in os.environ:   # workers x all CPUs' threads oversubscribe
        extra["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    prefix = "[multiblock] " if multiblock else "[tests] "
    r = run_command(tests_command(ctx, xml, workers, multiblock), limit_s, ctx.env(interpret=not ctx.cuda, **extra),
                    prefix)
    how = (f"{'compiled kernels on CUDA' if ctx.cuda else 'Triton interpreter'}, "
           + (f"{workers} xdist workers ({'load' if multiblock else 'loadfile, slowest files first'})" if workers
              else "no xdist workers"))
    if not xml.is_file():
        return Outcome("failed" if not r.timed_out else "timeout", f"no JUnit XML written ({_ended(r, limit_s)}; "
                       f"{how})", log=r.output)
    ctx.junit.append(xml)
    merged = ctx.work / "tests-merged.xml"
    try:
        results.merge_junit(ctx.junit, merged)
        ctx.artifacts["tests.xml"] = merged
    except Exception:   # an unreadable XML of an earlier stage: this one's stands alone
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


def bench_command(ctx: Context, path: str, out: Path, k: Optional[str] = None) -> list[str]:
    """pytest on one benches/ file (``k``: its ``-k`` selection) writing its JSON to ``out``. Never under
    pytest-xdist: with it, pytest-benchmark disables itself and writes nothing."""
    k = SHORT_BENCH[1] if ctx.short else k
    return ([ctx.python, "-m", "pytest", path, "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-rs",
             f"--benchmark-json={out}"] + (["-k", k] if k else []))


def _as_group(item) -> BenchGroup:
    """A BenchGroup, or a ``(file, share)`` pair: the whole file."""
    return item if isinstance(item, BenchGroup) else BenchGroup(item[0], item[0], None, item[1])


def stage_bench(ctx: Context, limit_s: float, files: Optional[tuple] = None) -> Outcome:
    """The benchmark groups one by one, each under its share (``files``: BenchGroups or ``(path under
    benches/ or absolute, share in seconds)``; default BENCH_GROUPS, one small file when short). A group
    that fails, is cut off or leaves no readable JSON is recorded with its output's tail; the other
    groups' rows are merged."""
    groups = [_as_group(f) for f in (files or (((SHORT_BENCH[0], limit_s),) if ctx.short else BENCH_GROUPS))]
    t_stop = time.monotonic() + limit_s
    t_end, carry, parts, runs, log = t_stop - TABLE_S, 0.0, [], [], ""
    for i, group in enumerate(groups):
        left = t_end - time.monotonic()
        if left < 5:
            runs.append({"file": group.name, "status": "not run", "rows": 0,
                         "how": f"the stage's {limit_s:.0f} s were used up"})
            continue
        budget = min(group.share + carry, left)
        try:
            rec, data, output = _bench_file(ctx, group, budget, i)
        except Exception as e:   # one group's trouble is that group's row; the others still run
            rec, data, output = {"file": group.name, "status": "error", "rows": 0, "seconds": 0.0,
                                 "how": f"{type(e).__name__}: {e}"}, None, ""
        carry = max(budget - rec["seconds"], 0.0)
        log += output[-TAIL_CHARS // len(groups):]
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
    noun = "groups" if any(g.k for g in groups) and not ctx.short else "files"
    summary = f"{n_rows} rows from {len(parts)} of {len(groups)} {noun}"
    if bad:
        summary += "; " + ", ".join(f"{r['file']} {_bench_problem(r)}" for r in bad)
    return Outcome(status, summary, details, log, data={"files": runs})


def _bench_file(ctx: Context, group: BenchGroup, budget: float, index: int = 0) -> tuple[dict, Optional[dict], str]:
    out = ctx.work / f"bench-{index}-{Path(group.file).stem}.json"
    out.unlink(missing_ok=True)
    path = group.file if Path(group.file).is_absolute() else f"benches/{group.file}"
    r = run_command(bench_command(ctx, path, out, group.k), budget, ctx.env(**BENCH_ENV, **dict(group.env)),
                    f"[bench {Path(group.file).stem}] ", done=PYTEST_SUMMARY, exit_s=BENCH_EXIT_S,
                    grace_s=BENCH_GRACE_S)
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
    rec = {"file": group.name, "status": status, "rows": rows, "seconds": r.seconds, "budget_s": budget, "how": how}
    if group.k and not ctx.short:
        rec["selection"] = f"{group.file} -k {group.k!r}"
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
    out = ["| group | status | rows | how | JSON |", "|---|---|---|---|---|"]
    for r in runs:
        flag = "ok" if r["status"] == "ok" and r["rows"] else f"**{_bench_problem(r).split(' (')[0].upper()}**"
        out.append(f"| {r['file']} | {flag} | {r['rows']} | {r['how']} | {r.get('json', '') or '-'} |")
    selections = [f"- {r['file']}: `{r['selection']}`" for r in runs if r.get("selection")]
    if selections:
        out += ["", "Selections (benches/ file and its `-k`):", "", *selections]
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
    for ext in ("json", "png"):   # its markdown goes into the report's (the files stay at MAX_FILES)
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
    if (out / "profile.md").is_file():
        table += ["", PROFILE_MD_HEADING, "", (out / "profile.md").read_text(errors="replace")[:MAX_BYTES // 4]]
    return Outcome(_ran_status(r), f"{len(rep['rows'])} rows in {rep['seconds']:.0f} s; energy: {energy}{note}",
                   "\n".join(table), r.output, data={"energy": rep["energy"], "rows": len(rep["rows"])})


STAGES = {"install": stage_install, "facts": stage_facts, "tune": stage_tune, "bench": stage_bench,
          "profile": stage_profile, "multiblock": stage_multiblock, "tests": stage_tests, "selfcheck": stage_selfcheck}


def default_stages(names=ORDER) -> list[Stage]:
    return [Stage(n, STAGES[n], needs_cuda=n == "selfcheck") for n in names]


def plan_lines(stages: list[Stage], short: bool) -> list[str]:
    """Each stage's share, as printed before the first one runs."""
    parts, fixed = [], 0.0
    for st in stages:
        limit = st.limit(short)
        parts.append(f"{st.name} {limit:.0f} s" if limit is not None else f"{st.name} the rest")
        fixed += limit or 0.0
    if short:
        return [f"plan (short rehearsal, each stage's limit): {', '.join(parts)}"]
    rest = [st.name for st in stages if st.limit(short) is None]
    tail = (f"; {', '.join(rest)}: the {max(TOTAL_S - FINISH_S - fixed, 0):.0f} s left plus what the others leave"
            if rest else "")
    return [f"plan ({TOTAL_S:.0f} s in all, {FINISH_S:.0f} s of it for the files): {', '.join(parts)}{tail}"]
