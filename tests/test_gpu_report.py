"""`make gpu-report`'s short rehearsal end to end, so the GPU command cannot rot between GPU runs.

One run of every default stage in the short mode (the tuner's interpreter rehearsal, kernels under the
interpreter without a GPU) with two injected stages after the facts: one that raises and one that runs
past its time limit. Every later stage must still run and write its part, the summary must flag the
two, and the folder must hold at most 7 files of at most 16 MiB named ``<device>-<yyyy-mm-dd>-<what>.<ext>``
(the caller's console log is the 8th). A full run's limits (one call of TOTAL_S) are checked with
injected stages.
"""
from __future__ import annotations

import json
import re
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from jepa_engine import gpu_report as gr
from jepa_engine import gpu_report_results as res
from jepa_engine import gpu_report_stages as gs
from jepa_engine.cli import build_parser

DATE = "2026-01-02"
NAME = re.compile(r"^[a-z0-9]+-2026-01-02-[a-z0-9-]+\.(md|json|xml|png)$")
SLEEP_LIMIT_S = 2.0


def _raises(ctx, limit_s):
    raise RuntimeError("injected failure")


def _sleeps(ctx, limit_s):
    r = gs.run_command([sys.executable, "-c", "import time; time.sleep(60)"], limit_s)
    return gs.Outcome("timeout" if r.timed_out else "ok", f"slept {r.seconds:.1f} s")


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-report")
    stages = gs.default_stages()
    at = [s.name for s in stages].index("facts") + 1
    def peeks(ctx, limit_s):   # what a run killed here would have left: the report of the stages so far
        saved = json.loads(next(out.glob("*-gpu-report-*.json")).read_text())
        return gs.Outcome("ok", "peeked", data={"saved": [s["name"] for s in saved["stages"]]})

    stages[at:at] = [gs.Stage("raises", _raises, 5.0), gs.Stage("sleeps", _sleeps, SLEEP_LIMIT_S),
                     gs.Stage("peeks", peeks, 5.0)]
    report = gr.run_report(out, short=True, stages=stages, date=DATE)
    return out, report, {s["name"]: s for s in report["stages"]}


def test_every_stage_ran_and_wrote_its_part(rehearsal):
    out, report, st = rehearsal
    assert list(st) == ["install", "facts", "raises", "sleeps", "peeks", "tune", "bench", "profile", "multiblock",
                        "tests"]
    assert st["install"]["status"] == "skipped" and "not requested" in st["install"]["summary"]
    assert st["facts"]["status"] == "ok", st["facts"]["log_tail"][-2000:]
    assert st["facts"]["data"]["torch"]["version"] == torch.__version__
    tag = report["device_tag"]
    # tune: the tuner's file (the interpreter rehearsal without CUDA), one the launchers accept
    assert st["tune"]["status"] == "ok", st["tune"]["log_tail"][-2000:]
    configs = json.loads((out / f"{tag}-{DATE}-kernel-configs-short.json").read_text())
    assert configs["format"] == 1 and configs["kernels"] and (configs["groups_measured"] or configs["groups_cut"])
    assert st["tune"]["data"]["commit_as"] == (f"kernels/configs/{configs['device_key']}.json"
                                               if torch.cuda.is_available() else None)
    assert "| kernel | key | chosen |" in st["tune"]["details"]
    # multiblock, then the tests: one JUnit XML with both stages' cases, per-file summaries that agree with it
    xml = out / f"{tag}-{DATE}-tests-short.xml"
    cases = list(ET.parse(xml).iter("testcase"))
    files = st["tests"]["data"]["files"]
    mb = st["multiblock"]["data"]["files"]
    assert st["tests"]["status"] in ("ok", "failed") and st["multiblock"]["status"] == "ok", st["multiblock"]["summary"]
    assert {f["file"] for f in files} == {"tests/test_masks.py", "tests/test_package.py"}
    assert [f["file"] for f in mb] == ["tests/kernels/test_multiblock.py"] and mb[0]["passed"] >= 1
    assert sum(f["passed"] + f["failed"] + f["errors"] + f["skipped"] for f in files + mb) == len(cases)
    # bench: both peers of one group, ours with its speed-up against the other
    assert st["bench"]["status"] == "ok", st["bench"]["log_tail"][-2000:]
    rows = json.loads((out / f"{tag}-{DATE}-bench-short.json").read_text())["benchmarks"]
    assert sorted(r["extra_info"]["impl"] for r in rows) == ["eager_loop", "jepa_engine"]
    ours = next(r["extra_info"] for r in rows if r["extra_info"]["impl"] == "jepa_engine")
    assert ours["speedup_vs"]["eager_loop"] > 0
    assert "| CEM plan N=300" in st["bench"]["details"]
    # profile: its JSON, markdown and plot, and a row per planner/decoder form in the details
    assert st["profile"]["status"] == "ok", st["profile"]["log_tail"][-2000:]
    prof = json.loads((out / f"{tag}-{DATE}-profile-short.json").read_text())
    assert prof["config"]["budgets"] == ["cem 4x1"] and len(prof["rows"]) >= 4
    table, _, own = st["profile"]["details"].partition(gs.PROFILE_MD_HEADING)
    assert table.count("\n| ") == len(prof["rows"]) and own.strip()   # its own markdown follows the table


def test_a_stage_that_raises_or_times_out_does_not_stop_the_next(rehearsal):
    out, report, st = rehearsal
    assert st["raises"]["status"] == "error" and "RuntimeError: injected failure" in st["raises"]["summary"]
    assert st["sleeps"]["status"] == "timeout"
    assert SLEEP_LIMIT_S * 0.7 <= st["sleeps"]["seconds"] <= SLEEP_LIMIT_S + 3
    assert st["peeks"]["data"]["saved"] == ["install", "facts", "raises", "sleeps"]
    for name in ("tune", "bench", "profile", "multiblock", "tests"):   # ran after them, each with its own result
        assert st[name]["seconds"] > 0.5 and st[name]["summary"]
    md = (out / f"{report['device_tag']}-{DATE}-gpu-report-{'-'.join(st)}-short.md").read_text()
    assert re.search(r"^\| raises \| \*\*ERROR\*\* \|.*injected failure", md, re.M), md[:3000]
    assert re.search(r"^\| sleeps \| \*\*TIMEOUT\*\* \|", md, re.M)
    assert re.search(r"^\| bench \| ok \|", md, re.M)
    flagged = re.search(r"^\d+ stage\(s\) did not pass: (.*)$", md, re.M)
    assert flagged and "raises (error)" in flagged.group(1) and "sleeps (timeout)" in flagged.group(1)


def test_file_names_count_and_size(rehearsal):
    out, report, _ = rehearsal
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(report["files"])
    assert 6 <= len(names) <= gs.MAX_FILES - 1   # the caller's console log is the 8th
    assert not any("profile-short.md" in n for n in names)   # the profile's markdown is in the report's
    for p in out.iterdir():
        assert NAME.match(p.name), p.name
        assert p.is_file() and 0 < p.stat().st_size <= 16 * 2**20
    saved = json.loads(next(out.glob("*-gpu-report-*.json")).read_text())
    assert [s["name"] for s in saved["stages"]] == [s["name"] for s in report["stages"]]


def test_junit_summary_names_files_and_missing_modules(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text(
        '<testsuites><testsuite>'
        '<testcase classname="tests.test_masks" name="test_a" time="0.5"/>'
        '<testcase classname="tests.test_masks" name="test_b" time="0.25"><failure message="assert 1 == 2">'
        'trace</failure></testcase>'
        '<testcase classname="tests.test_masks" name="test_c"><skipped message="no"/></testcase>'
        '<testcase classname="" name="tests.kernels.test_latent_loss" time="0">'
        '<error message="collection failure">ModuleNotFoundError: No module named \'hypothesis\'</error></testcase>'
        '</testsuite></testsuites>')
    s = res.junit_summary(xml, gs.ROOT)
    by_file = {f["file"]: f for f in s["files"]}
    assert by_file["tests/test_masks.py"] == {"file": "tests/test_masks.py", "passed": 1, "failed": 1, "errors": 0,
                                              "skipped": 1, "seconds": 0.75}
    assert by_file["tests/kernels/test_latent_loss.py"]["errors"] == 1
    assert s["totals"] == {"passed": 1, "failed": 1, "errors": 1, "skipped": 1}
    assert s["missing_modules"] == ["hypothesis"]
    md = res.junit_markdown(s)
    assert "tests/kernels/test_latent_loss.py **FAIL**" in md and "hypothesis" in md and "assert 1 == 2" in md


def test_bench_files_merge_into_one(tmp_path):
    for i in range(2):
        (tmp_path / f"{i}.json").write_text(json.dumps({"machine_info": {"i": i}, "benchmarks": [{"n": i}, {"n": 9}]}))
    n = res.merge_bench_json([tmp_path / "0.json", tmp_path / "1.json"], tmp_path / "m.json")
    merged = json.loads((tmp_path / "m.json").read_text())
    assert n == 4 and [b["n"] for b in merged["benchmarks"]] == [0, 9, 1, 9] and merged["machine_info"] == {"i": 0}


def test_bench_json_problems_are_named(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"machine_info": {}, "benchmarks": [{"n": 1}]}))
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "cut.json").write_text(good.read_text()[:-7])
    (tmp_path / "list.json").write_text("[1, 2]")
    assert res.read_bench_json(good) == ({"machine_info": {}, "benchmarks": [{"n": 1}]}, "")
    problems = {name: res.read_bench_json(tmp_path / f"{name}.json") for name in ("missing", "empty", "cut", "list")}
    assert all(data is None for data, _ in problems.values())
    assert problems["missing"][1] == "no JSON written"
    assert problems["empty"][1].startswith("empty JSON")
    assert problems["cut"][1].startswith("unreadable JSON (") and "cut off" in problems["cut"][1]
    assert problems["list"][1].startswith("not a pytest-benchmark JSON")
    # the merge leaves an unreadable file out instead of raising
    n = res.merge_bench_json([tmp_path / "empty.json", good, tmp_path / "cut.json", good], tmp_path / "m.json")
    assert n == 2 and len(json.loads((tmp_path / "m.json").read_text())["benchmarks"]) == 2


def test_bench_stage_reports_broken_files_and_keeps_the_others(tmp_path, monkeypatch):
    """Files whose pytest wrote rows, an empty JSON (pytest-benchmark < 5.3 cut off before a row), a
    cut-off JSON, none at all: the stage names each, merges the rows it has, and never raises."""
    row = lambda i: {"name": f"t{i}", "extra_info": {"impl": "jepa_engine", "group": f"g{i}"}}  # noqa: E731
    plan = {"a": ("ok", json.dumps({"machine_info": {}, "benchmarks": [row(1), row(2)]})),
            "b": ("timeout", ""), "c": ("failed", '{"benchmarks": [{"na'), "d": ("failed", None),
            "e": ("timeout", json.dumps({"machine_info": {}, "benchmarks": [row(3)]}))}
    seen = []

    def fake_run(cmd, limit_s, env=None, prefix="", **kw):
        if "benches.report" in cmd:
            return gs.Ran(0, False, 0.1, "| the table |")
        name = Path(cmd[3]).stem
        seen.append((cmd, limit_s, env))
        status, text = plan[name]
        if text is not None:
            Path(next(a for a in cmd if a.startswith("--benchmark-json=")).split("=", 1)[1]).write_text(text)
        out = f"[{name}] first line\n" + "".join(f"{name} line {i}\n" for i in range(30)) + f"{name} LAST\n"
        return gs.Ran(None if status == "timeout" else int(status != "ok"), status == "timeout", 2.0, out)

    monkeypatch.setattr(gs, "run_command", fake_run)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    ctx = gs.Context(tmp_path, short=False)
    o = gs.stage_bench(ctx, 200.0, files=tuple((f"{n}.py", 30) for n in plan))
    assert [Path(c[3]).name for c, _, _ in seen] == [f"{n}.py" for n in plan]   # every file ran
    for cmd, limit_s, env in seen:
        assert cmd[cmd.index("no:xdist") - 1] == "-p" and env["JEPA_BENCH_QUICK"] == "1"
        assert not any(k.startswith("PYTEST_XDIST") for k in env)
    assert [round(b) for _, b, _ in seen] == [30, 58, 86, 114, 142]   # unused time carries on
    by_file = {r["file"]: r for r in o.data["files"]}
    assert [by_file[f"{n}.py"]["rows"] for n in plan] == [2, 0, 0, 0, 1]
    assert by_file["b.py"]["json"].startswith("empty JSON") and by_file["c.py"]["json"].startswith("unreadable")
    assert by_file["d.py"]["json"] == "no JSON written" and "json" not in by_file["a.py"]
    assert "b LAST" in by_file["b.py"]["log_tail"] and "log_tail" not in by_file["a.py"]
    assert o.status == "failed"
    assert o.summary.startswith("3 rows from 2 of 5 files; b.py cut off (empty JSON")
    assert "c.py failed (unreadable JSON" in o.summary and "d.py failed (no JSON written)" in o.summary
    assert "e.py cut off (1 rows kept)" in o.summary
    merged = json.loads(ctx.artifacts["bench.json"].read_text())["benchmarks"]
    assert [r["name"] for r in merged] == ["t1", "t2", "t3"]
    assert "Last lines of b.py:" in o.details and "d LAST" in o.details and "| the table |" in o.details
    assert "| a.py | ok | 2 |" in o.details and "| b.py | **CUT OFF** | 0 |" in o.details


def test_pytest_summary_line_is_recognised():
    done = re.compile(gs.PYTEST_SUMMARY)
    for line in ("60 passed in 11.15s", "3 passed, 16 warnings in 58.69s", "1 warning in 11.36s",
                 "1 failed, 2 passed, 17 warnings in 90.23s (0:01:30)", "no tests ran in 0.01s",
                 "========= 79 passed, 15 skipped, 15 warnings in 89.87s (0:01:29) =========="):
        assert done.search(line), line
    for line in (".....s.....s [ 61%]", "Wrote benchmark data in: /tmp/x.json", "test_a[1] 3.1 (1.0) 2.2",
                 "(to show a full traceback on KeyboardInterrupt use --full-trace)"):
        assert not done.search(line), line


# Appended to the probes' copy of benches/conftest.py: the SIGINT of a share's end arriving while
# pytest-benchmark collects its machine info for the JSON (where it landed on an H100). DONE's exit
# hangs after its last line (as torch's compile-worker pool's can).
PROBE_CONFTEST = """

def pytest_benchmark_generate_machine_info(config):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.3)
    return {"probe": True}
"""
DONE = """
import atexit
import time

atexit.register(time.sleep, 60)


def test_one(benchmark, run_bench):
    run_bench(benchmark, lambda: sum(range(100)), impl="jepa_engine", group="done")
"""
PROBE = """
import time
import pytest

CALLS = {"n": 0}


@pytest.mark.parametrize("impl", ["jepa_engine", "eager_loop"])
def test_fast(benchmark, run_bench, impl):
    run_bench(benchmark, lambda: sum(range(100)), impl=impl, group="fast")


def test_slow(benchmark, run_bench):
    def fn():   # quick for the warm-up and calibration calls, then stuck inside the timed rounds
        CALLS["n"] += 1
        time.sleep(0 if CALLS["n"] <= 4 else 60)
    run_bench(benchmark, fn, impl="jepa_engine", group="slow")
"""


def test_bench_files_cut_off_or_hanging_at_exit_keep_their_rows(tmp_path, monkeypatch):
    """Real pytest runs under benches/conftest.py, with the report itself in an xdist worker (whose
    environment would make pytest-benchmark disable itself). One is cut off inside a benchmark's
    rounds: SIGINT, and its JSON holds the finished group, not the partial row. One finishes and then
    hangs in its exit: stopped soon after its last line, reported ok. In both a second SIGINT while
    the JSON is written is ignored."""
    (tmp_path / "conftest.py").write_text((gs.ROOT / "benches" / "conftest.py").read_text() + PROBE_CONFTEST)
    (tmp_path / "bench_probe.py").write_text(PROBE)
    (tmp_path / "bench_done.py").write_text(DONE)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    monkeypatch.setattr(gs, "BENCH_EXIT_S", 1.0)
    ctx = gs.Context(tmp_path / "work", short=False)
    ctx.work.mkdir()
    # SIGINT at 16 s (the share less the 8 s grace): a loaded 2-core machine imports torch and finishes
    # the fast group first, and pytest-benchmark has the grace to write its JSON (at a 14 s share the
    # SIGINT came before the group; with a 4 s grace the kill came before the JSON)
    share = 24.0
    files = ((str(tmp_path / "bench_probe.py"), share), (str(tmp_path / "bench_done.py"), 30.0))
    o = gs.stage_bench(ctx, share + 30 + gs.TABLE_S, files=files)
    cut, done = o.data["files"]
    assert cut["status"] == "timeout" and cut["rows"] == 2 and cut["seconds"] < share + 1, cut
    assert "KeyboardInterrupt" in o.log
    assert done["status"] == "ok" and done["rows"] == 1 and done["seconds"] < 25, done
    assert done["how"].startswith("1 passed in ") and "its exit hung" in done["how"]
    rows = json.loads(ctx.artifacts["bench.json"].read_text())["benchmarks"]
    assert sorted(r["extra_info"]["impl"] for r in rows) == ["eager_loop", "jepa_engine", "jepa_engine"]
    assert [r["extra_info"]["group"] for r in rows] == ["fast", "fast", "done"]
    assert all(r["extra_info"]["quick"] for r in rows)
    ours = next(r["extra_info"] for r in rows if r["extra_info"]["impl"] == "jepa_engine")
    assert ours["speedup_vs"]["eager_loop"] > 0
    assert o.status == "timeout"
    assert o.summary == f"3 rows from 2 of 2 files; {files[0][0]} cut off (2 rows kept)"


def test_worker_count_and_test_order(tmp_path, monkeypatch):
    assert [gs.default_test_workers(n) for n in (1, 2, 4, 8, 16, 64)] == [1, 1, 2, 6, 12, 12]
    root = tmp_path
    for f in ("tests/test_a.py", "tests/test_b.py", "tests/kernels/test_c.py", "tests/test_d.py", "tests/helpers.py"):
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text("")
    (root / "benches" / "results").mkdir(parents=True)
    xml = ('<testsuites><testsuite><testcase classname="tests.test_b" name="x" time="{}"/>'
           '<testcase classname="tests.kernels.test_c" name="y" time="{}"/></testsuite></testsuites>')
    (root / "benches" / "results" / "h100-2026-01-01-tests.xml").write_text(xml.format(5, 9))
    (root / "benches" / "results" / "h100-2025-12-01-tests.xml").write_text(xml.format(50, 1))   # older
    (root / "benches" / "results" / "cpu-2026-02-01-tests-short.xml").write_text(xml.format(99, 1))  # rehearsal
    assert gs.test_files(root) == ["tests/kernels/test_c.py", "tests/test_b.py", "tests/test_a.py", "tests/test_d.py"]
    ctx = gs.Context(tmp_path, short=False)
    monkeypatch.setattr(gs, "_xdist_version", lambda: (3, 8))
    cmd = gs.tests_command(ctx, tmp_path / "t.xml", 12)
    assert cmd[cmd.index("-n") + 1] == "12" and cmd[cmd.index("--dist") + 1] == "loadfile"
    assert "--no-loadscope-reorder" in cmd and "--durations=15" in cmd
    assert cmd.index("tests/test_gpu_report.py") < cmd.index("-q")   # the files, named one by one
    monkeypatch.setattr(gs, "_xdist_version", lambda: (3, 6))
    assert "--no-loadscope-reorder" not in gs.tests_command(ctx, tmp_path / "t.xml", 12)
    assert "-n" not in gs.tests_command(ctx, tmp_path / "t.xml", 0)
    monkeypatch.setenv("PYTEST_XDIST_TESTRUNUID", "abc")
    assert "PYTEST_XDIST_TESTRUNUID" not in ctx.env() and ctx.env(A="1")["A"] == "1"


def test_run_command_stops_the_whole_process_group():
    t0 = time.monotonic()
    code = ("import subprocess, time; p = subprocess.Popen(['sleep', '30']); print('child', p.pid, flush=True); "
            "time.sleep(30)")
    r = gs.run_command([sys.executable, "-c", code], 1.5)
    assert r.timed_out and time.monotonic() - t0 < 6
    pid = re.search(r"child (\d+)", r.output).group(1)
    deadline = time.monotonic() + 3
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), "the command's own child outlived the time limit"


def _alive(pid: str) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_cli_parses_gpu_report_and_rejects_bad_stages(capsys):
    args = build_parser().parse_args(["gpu-report", "--out", "x", "--stages", "measure", "--test-workers", "0"])
    assert (args.out, args.stages, args.test_workers, args.install, args.short) == ("x", "measure", 0, False, False)
    bad = build_parser().parse_args(["gpu-report", "--stages", "facts,nope"])
    assert bad.func(bad) == 2
    assert "--stages must be one of all, tests, measure" in capsys.readouterr().err
    # one call of at most 9 minutes: the shares leave the test suite (share None) a minute at least
    assert gs.TOTAL_S <= 9 * 60 and [n for n in gs.ORDER if gs.LIMITS[n][0] is None] == ["tests"]
    assert sum(gs.LIMITS[n][0] or 0 for n in gs.ORDER) <= gs.TOTAL_S - gs.FINISH_S - 10
    assert gs.ORDER.index("tune") < gs.ORDER.index("bench") < gs.ORDER.index("profile") < gs.ORDER.index("multiblock")
    # every benches/ file has a group or a reason to be left out, and the shares fit the stage less the table's time
    grouped = {g.file for g in gs.BENCH_GROUPS}
    assert sorted(grouped | set(gs.BENCH_LEFT_OUT)) == sorted(p.name for p in (gs.ROOT / "benches").glob("bench_*.py"))
    assert not set(gs.BENCH_LEFT_OUT) & grouped and all(g.k for g in gs.BENCH_GROUPS)
    assert sum(g.share for g in gs.BENCH_GROUPS) <= gs.LIMITS["bench"][0] - gs.TABLE_S


def test_install_builds_no_native_library_on_the_device(tmp_path, monkeypatch):
    """The install stage's pip install -e . runs setup.py without its CMake build (JEPA_ENGINE_BUILD_NATIVE=0):
    the stage's limit is for the install, and the device runs the Triton kernels."""
    calls = []

    def fake_run(cmd, limit_s, env=None, prefix="", **kw):
        calls.append((cmd, env))
        return gs.Ran(0, False, 0.1, "")

    monkeypatch.setattr(gs, "run_command", fake_run)
    ctx = gs.Context(tmp_path, short=False, install=True)
    o = gs.stage_install(ctx, 40)
    cmd, env = calls[0]
    assert cmd[1:4] == ["-m", "pip", "install"] and "--no-build-isolation" in cmd and cmd[-2:] == ["-e", str(gs.ROOT)]
    assert env["JEPA_ENGINE_BUILD_NATIVE"] == "0"
    assert o.status == "ok", o.summary


def test_a_full_run_fits_its_total_and_the_tests_take_the_rest(tmp_path, monkeypatch, capsys):
    """Full mode (no rehearsal) with injected stages and a 4-second total: each stage's share is printed
    first; a share is cut to what is left, the test suite (share None) gets all that is left, and a
    stage with less than MIN_STAGE_S left is not started."""
    monkeypatch.setattr(gr, "TOTAL_S", 4.0)
    monkeypatch.setattr(gs, "TOTAL_S", 4.0)
    monkeypatch.setattr(gr, "FINISH_S", 0.0)
    monkeypatch.setattr(gs, "FINISH_S", 0.0)
    monkeypatch.setattr(gr, "MIN_STAGE_S", 1.5)
    limits = {}

    def stage(name, sleep=0.0, cuda=None):
        def run(ctx, limit_s):
            limits[name] = limit_s
            if cuda is not None:
                ctx.cuda = cuda
            time.sleep(sleep)
            return gs.Outcome("ok", name)
        return run

    stages = [gs.Stage("facts", stage("facts", cuda=False), 20.0), gs.Stage("a", stage("a"), 100.0),
              gs.Stage("tests", stage("tests")), gs.Stage("b", stage("b", sleep=3.0), 2.0),
              gs.Stage("c", stage("c"), 50.0)]
    report = gr.run_report(tmp_path, short=False, stages=stages, date=DATE)
    printed = capsys.readouterr().out
    assert ("== plan (4 s in all, 0 s of it for the files): facts 20 s, a 100 s, tests the rest, b 2 s, c 50 s"
            in printed)
    assert limits["facts"] <= 4.0 and limits["a"] <= 4.0 and 3.0 < limits["tests"] <= 4.0 and limits["b"] == 2.0
    st = {s["name"]: s for s in report["stages"]}
    assert "c" not in limits and st["c"]["status"] == "timeout" and st["c"]["summary"].startswith("not run: ")
    assert report["seconds"] < 4.0 + 2
