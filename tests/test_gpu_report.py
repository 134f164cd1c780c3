"""`make gpu-report`'s short rehearsal end to end, so the GPU command cannot rot between lent GPUs.

One run of every stage in the short mode (CUDA stages skipped without a GPU) with two injected stages
after the facts: one that raises and one that runs past its time limit. Every later stage must still
run and write its part (or its "skipped" reason), the summary must flag the two, and the folder must
hold at most 8 files of at most 16 MiB named ``<device>-<yyyy-mm-dd>-<what>.<ext>``.
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
    assert list(st) == ["install", "facts", "raises", "sleeps", "peeks", "tests", "selfcheck", "bench", "profile"]
    assert st["install"]["status"] == "skipped" and "not requested" in st["install"]["summary"]
    assert st["facts"]["status"] == "ok", st["facts"]["log_tail"][-2000:]
    assert st["facts"]["data"]["torch"]["version"] == torch.__version__
    if torch.cuda.is_available():
        assert st["selfcheck"]["status"] == "ok" and " 0 mismatched" in st["selfcheck"]["summary"]
    else:
        assert st["selfcheck"]["status"] == "skipped" and st["selfcheck"]["summary"].startswith("skipped: no CUDA")
    tag = report["device_tag"]
    # tests: the JUnit XML and a per-file summary that agrees with it (they may fail: others' tests)
    xml = out / f"{tag}-{DATE}-tests-short.xml"
    cases = list(ET.parse(xml).iter("testcase"))
    files = st["tests"]["data"]["files"]
    assert st["tests"]["status"] in ("ok", "failed") and cases
    assert {f["file"] for f in files} == {"tests/test_masks.py", "tests/test_package.py"}
    assert sum(f["passed"] + f["failed"] + f["errors"] + f["skipped"] for f in files) == len(cases)
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
    assert st["profile"]["details"].count("\n| ") == len(prof["rows"])


def test_a_stage_that_raises_or_times_out_does_not_stop_the_next(rehearsal):
    out, report, st = rehearsal
    assert st["raises"]["status"] == "error" and "RuntimeError: injected failure" in st["raises"]["summary"]
    assert st["sleeps"]["status"] == "timeout"
    assert SLEEP_LIMIT_S * 0.7 <= st["sleeps"]["seconds"] <= SLEEP_LIMIT_S + 3
    assert st["peeks"]["data"]["saved"] == ["install", "facts", "raises", "sleeps"]
    for name in ("tests", "bench", "profile"):   # ran after them, each with its own result
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
    assert sum(gs.LIMITS[n][0] for n in gs.ORDER) <= 20 * 60
    assert all(sum(gs.LIMITS[n][0] for n in part) <= 9.5 * 60 for part in (gs.PARTS["tests"], gs.PARTS["measure"]))
