"""Reading what the gpu-report stages produce: machine facts, JUnit XML, benchmark JSON; the markdown.

Standard library only at import: the report's driver must run where torch is broken or the package is
not installed yet. ``print_facts`` runs in the facts stage's own subprocess and imports torch there.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

FACTS_BEGIN, FACTS_END = "--- gpu-report facts ---", "--- end facts ---"
# Distribution -> module; the optional ones say what is lost without them.
PACKAGES = ("torch", "triton", "numpy", "nvidia-ml-py", "safetensors", "matplotlib", "tqdm", "pytest",
            "pytest-benchmark", "pytest-xdist", "hypothesis", "timm", "jepa-engine")
NVIDIA_SMI_FIELDS = ("name", "driver_version", "pstate", "power.draw", "power.limit", "power.default_limit",
                     "power.max_limit", "enforced.power.limit", "clocks.sm", "clocks.mem", "clocks.max.sm",
                     "clocks.max.mem", "clocks.applications.graphics", "temperature.gpu", "memory.total",
                     "persistence_mode", "compute_mode")


# ------------------------------------------------------------------------------------------------
# Facts (run inside the facts stage's subprocess)
# ------------------------------------------------------------------------------------------------
def _guard(fn):
    try:
        return fn()
    except Exception as e:  # a fact that cannot be read says why, the others are still collected
        return {"error": f"{type(e).__name__}: {e}"}


def _nvidia_smi(fields: tuple = NVIDIA_SMI_FIELDS) -> dict:
    try:
        proc = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"nvidia-smi: {e}"}
    if proc.returncode != 0:
        if len(fields) > 5:   # a field this driver does not know fails the whole query: the essentials
            return _nvidia_smi(("name", "driver_version", "power.limit", "clocks.sm", "clocks.max.sm"))
        return {"error": f"nvidia-smi exited {proc.returncode}: {(proc.stdout + proc.stderr).strip()[:300]}"}
    first = proc.stdout.strip().splitlines()[0]
    return dict(zip(fields, (v.strip() for v in first.split(","))))


def _nvml() -> dict:
    import time

    import pynvml

    pynvml.nvmlInit()
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        clk = pynvml.NVML_CLOCK_SM, pynvml.NVML_CLOCK_MEM
        out = {"name": _str(pynvml.nvmlDeviceGetName(h)), "driver": _str(pynvml.nvmlSystemGetDriverVersion()),
               "cuda_driver": pynvml.nvmlSystemGetCudaDriverVersion(),
               "power_limit_w": pynvml.nvmlDeviceGetPowerManagementLimit(h) / 1000,
               "enforced_power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000,
               "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, clk[0]),
               "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, clk[1]),
               "max_sm_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, clk[0]),
               "max_mem_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, clk[1]),
               "temperature_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)}
        # The energy counter the profile reads, and idle power over one second (nothing else running).
        e0, t0 = pynvml.nvmlDeviceGetTotalEnergyConsumption(h), time.perf_counter()
        watts = []
        while time.perf_counter() - t0 < 1.0:
            watts.append(pynvml.nvmlDeviceGetPowerUsage(h) / 1000)
            time.sleep(0.05)
        e1, t1 = pynvml.nvmlDeviceGetTotalEnergyConsumption(h), time.perf_counter()
        out.update(energy_counter_mj=e1, idle_watts_counter=(e1 - e0) / 1000 / (t1 - t0),
                   idle_watts_sampled=sum(watts) / len(watts))
        return out
    finally:
        pynvml.nvmlShutdown()


def _str(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _torch() -> dict:
    import torch

    out = {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "threads": torch.get_num_threads()}
    out["cudnn"] = _guard(lambda: torch.backends.cudnn.version())
    if out["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        out.update(device_count=torch.cuda.device_count(), device=p.name, capability=f"{p.major}.{p.minor}",
                   sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return out


def collect_facts() -> dict:
    def versions():
        out = {}
        for dist in PACKAGES:
            try:
                out[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                out[dist] = None
        return out

    facts = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
             "cpus": os.cpu_count(), "packages": _guard(versions), "torch": _guard(_torch)}
    try:
        from jepa_engine.profiling.hardware import device_name, device_tag

        facts["device_tag"], facts["device_name"] = device_tag(), device_name()
    except Exception as e:
        facts["device_tag_error"] = f"{type(e).__name__}: {e}"
    if facts["torch"].get("cuda_available"):
        facts["nvidia_smi"] = _nvidia_smi()
        facts["nvml"] = _guard(_nvml)
    else:
        facts["gpu"] = "skipped: no CUDA (nvidia-smi and NVML facts need a GPU)"
    return facts


def print_facts() -> None:
    print(FACTS_BEGIN)
    print(json.dumps(collect_facts(), indent=1, default=str))
    print(FACTS_END, flush=True)


def parse_facts(output: str) -> dict:
    """The JSON between the markers of ``print_facts`` in a stage's output."""
    m = re.search(re.escape(FACTS_BEGIN) + r"\n(.*?)\n" + re.escape(FACTS_END), output, re.S)
    if not m:
        raise ValueError("facts: no facts block in the stage's output")
    return json.loads(m.group(1))


def facts_line(f: dict) -> str:
    t, smi, nvml = f.get("torch", {}), f.get("nvidia_smi", {}), f.get("nvml", {})
    pk = f.get("packages", {})
    parts = [f.get("device_name") or f.get("device_tag_error", "?")]
    if smi and "error" not in smi:
        parts.append(f"driver {smi.get('driver_version')}, power limit {smi.get('power.limit')}, "
                     f"SM clock {smi.get('clocks.sm')} (max {smi.get('clocks.max.sm')})")
    elif nvml and "error" not in nvml:
        parts.append(f"driver {nvml.get('driver')}, power limit {nvml.get('power_limit_w')} W")
    torch = f"torch {t['error']}" if "error" in t else f"torch {t.get('version')} (CUDA {t.get('cuda')})"
    parts.append(f"Python {f.get('python')}, {torch}, triton {pk.get('triton')}")
    return "; ".join(parts)


def facts_markdown(f: dict) -> str:
    rows = [("device", f.get("device_name")), ("device tag", f.get("device_tag")), ("Python", f.get("python")),
            ("platform", f.get("platform")), ("CPUs", f.get("cpus"))]
    rows += [(f"torch {k}", v) for k, v in (f.get("torch") or {}).items()]
    rows += [(f"nvidia-smi {k}", v) for k, v in (f.get("nvidia_smi") or {}).items()]
    rows += [(f"NVML {k}", v) for k, v in (f.get("nvml") or {}).items()]
    rows += [(f"package {k}", v if v else "**missing**") for k, v in (f.get("packages") or {}).items()]
    if f.get("gpu"):
        rows.append(("GPU facts", f["gpu"]))
    return "\n".join(["| fact | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


# ------------------------------------------------------------------------------------------------
# JUnit XML -> pass/fail per file
# ------------------------------------------------------------------------------------------------
def _file_of(case: ET.Element, root: Path) -> str:
    if case.get("file"):
        return case.get("file")
    # a collection error has no classname; a test cut short by the time limit may have no name either
    dotted = case.get("classname") or case.get("name") or "(unnamed: interrupted)"
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        candidate = "/".join(parts[:n]) + ".py"
        if (root / candidate).is_file():
            return candidate
    return dotted


def junit_summary(path: Path, root: Path) -> dict:
    """Totals, per-file counts and the failures (node id, first line of the message) of a JUnit XML."""
    tree = ET.parse(path)
    files: dict[str, dict] = {}
    failures = []
    for case in tree.iter("testcase"):
        f = _file_of(case, root)
        row = files.setdefault(f, {"file": f, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "seconds": 0.0})
        row["seconds"] += float(case.get("time") or 0)
        bad = case.find("failure")
        bad = bad if bad is not None else case.find("error")
        if bad is not None:
            row["failed" if bad.tag == "failure" else "errors"] += 1
            text = (bad.get("message") or bad.text or "").strip()
            failures.append({"test": f"{f}::{case.get('name')}" if case.get("classname") else f,
                             "kind": bad.tag, "message": text.splitlines()[0][:300] if text else "",
                             "missing_module": _missing_module(bad)})
        elif case.find("skipped") is not None:
            row["skipped"] += 1
        else:
            row["passed"] += 1
    totals = {k: sum(r[k] for r in files.values()) for k in ("passed", "failed", "errors", "skipped")}
    missing = sorted({f["missing_module"] for f in failures if f["missing_module"]})
    return {"totals": totals, "files": sorted(files.values(), key=lambda r: r["file"]), "failures": failures,
            "missing_modules": missing}


def _missing_module(el: ET.Element) -> str:
    m = re.search(r"No module named '([\w.]+)'", (el.get("message") or "") + (el.text or ""))
    return m.group(1).split(".")[0] if m else ""


def junit_markdown(s: dict, max_failures: int = 60) -> str:
    out = ["| file | passed | failed | errors | skipped | seconds |", "|---|---|---|---|---|---|"]
    for r in sorted(s["files"], key=lambda r: (-(r["failed"] + r["errors"]), r["file"])):
        flag = " **FAIL**" if r["failed"] + r["errors"] else ""
        out.append(f"| {r['file']}{flag} | {r['passed']} | {r['failed']} | {r['errors']} | {r['skipped']} "
                   f"| {r['seconds']:.1f} |")
    if s["missing_modules"]:
        out += ["", f"Missing Python packages behind errors: {', '.join(s['missing_modules'])} (bring them as wheels "
                    "in `wheels/`: `make gpu-wheels` on a machine with a registry)."]
    if s["failures"]:
        out += ["", "Failures and errors:", ""]
        out += [f"- `{f['test']}` ({f['kind']}): {f['message']}" for f in s["failures"][:max_failures]]
        if len(s["failures"]) > max_failures:
            out.append(f"- ... and {len(s['failures']) - max_failures} more (see the JUnit XML)")
    return "\n".join(out)


def merge_junit(paths: list, out: Path) -> int:
    """One JUnit XML holding the test suites of every file in ``paths`` (in order); returns the number of
    test cases. A file that cannot be parsed raises (the caller keeps the files apart then)."""
    merged = ET.Element("testsuites")
    for path in paths:
        root = ET.parse(path).getroot()
        merged.extend(list(root) if root.tag == "testsuites" else [root])
    ET.ElementTree(merged).write(out, encoding="utf-8", xml_declaration=True)
    return sum(1 for _ in merged.iter("testcase"))


# ------------------------------------------------------------------------------------------------
# Tuned launch configs (kernels/tuning.py's file)
# ------------------------------------------------------------------------------------------------
def tuning_markdown(data: dict) -> tuple[str, int]:
    """A table of a tuned configs file (one row per kernel and table key: the chosen config, its
    speed-up over the table's, whether every candidate was measured at every shape) and how many keys
    chose another config than the table's."""
    out = ["| kernel | key | chosen | speed-up vs table | complete | shapes |", "|---|---|---|---|---|---|"]
    changed = 0
    for kernel, entries in sorted((data.get("kernels") or {}).items()):
        for key, e in sorted(entries.items()):
            if not isinstance(e, dict):
                continue
            same = e.get("chosen") == e.get("fixed")
            changed += not same
            chosen = "table's" if same else f"`{e.get('chosen')}`"
            out.append(f"| {kernel} | {key} | {chosen} | {e.get('speedup_vs_fixed', '-')} | "
                       f"{'yes' if e.get('complete') else 'no'} | {len(e.get('shapes') or {})} |")
    for what in ("groups_cut", "groups_not_run"):
        if data.get(what):
            out += ["", f"{what.replace('_', ' ').capitalize()}: {', '.join(data[what])}."]
    return "\n".join(out), changed


# ------------------------------------------------------------------------------------------------
# Benchmark JSON files -> one
# ------------------------------------------------------------------------------------------------
def read_bench_json(path: Path) -> tuple[dict | None, str]:
    """A pytest-benchmark JSON file and ``""``, or ``None`` and what is wrong with it: missing (pytest
    ended before writing it), empty (pytest-benchmark before 5.3 creates the file at start and writes it
    only at the end of the session, and only when a benchmark finished), cut off or not that JSON."""
    if not path.is_file():
        return None, "no JSON written"
    text = path.read_text(errors="replace")
    if not text.strip():
        return None, "empty JSON (no benchmark finished)"
    try:
        data = json.loads(text)
    except ValueError as e:
        return None, f"unreadable JSON ({len(text)} bytes, cut off?): {e}"
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        return None, "not a pytest-benchmark JSON (no list of benchmarks)"
    return data, ""


def merge_bench_json(parts: list, out: Path) -> int:
    """One pytest-benchmark JSON holding the rows of every part (a path or what ``read_bench_json``
    returned; machine and commit info of the first); a part that cannot be read is left out. Returns
    the number of rows (0: nothing written)."""
    merged: dict | None = None
    for part in parts:
        data = read_bench_json(Path(part))[0] if isinstance(part, (str, Path)) else part
        if not data:
            continue
        if merged is None:
            merged = dict(data, benchmarks=list(data["benchmarks"]))
        else:
            merged["benchmarks"].extend(data["benchmarks"])
    if merged is None:
        return 0
    out.write_text(json.dumps(merged, indent=1))
    return len(merged["benchmarks"])


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------
FLAGS = {"ok": "ok", "skipped": "skipped", "failed": "**FAILED**", "timeout": "**TIMEOUT**", "error": "**ERROR**",
         "interrupted": "**INTERRUPTED**"}


def summary_table(stages: list[dict]) -> str:
    out = ["| stage | status | seconds | limit s | result |", "|---|---|---|---|---|"]
    for s in stages:
        result = s["summary"].replace("|", "/").replace("\n", " ")
        out.append(f"| {s['name']} | {FLAGS.get(s['status'], s['status'])} | {s['seconds']:.0f} | {s['limit_s']:.0f} "
                   f"| {result} |")
    return "\n".join(out)


def report_markdown(report: dict) -> str:
    bad = [s for s in report["stages"] if s["status"] not in ("ok", "skipped")]
    head = [f"# GPU report: {report['device']} ({report['date']})", "",
            f"Mode: {report['mode']}. Stages: {', '.join(s['name'] for s in report['stages'])}. "
            f"Total {report['seconds']:.0f} s (stage limits sum to {report['limits_s']:.0f} s).", "",
            summary_table(report["stages"]), "",
            (f"{len(bad)} stage(s) did not pass: " + "; ".join(f"{s['name']} ({s['status']})" for s in bad))
            if bad else "Every stage passed or was skipped with its reason.", ""]
    missing = report.get("planned", [])[len(report["stages"]):]
    if missing:
        head += [f"Not run (yet): {', '.join(missing)}.", ""]
    head += ["Files: " + ", ".join(f"`{f}`" for f in report["files"]), ""]
    for s in report["stages"]:
        head += [f"## {s['name']}: {s['status']}", "", s["summary"], ""]
        if s.get("details"):
            head += [s["details"], ""]
        if s["status"] not in ("ok", "skipped") and s.get("log_tail"):
            head += ["Last lines of its output:", "", "```", _last_lines(s["log_tail"], 40), "```", ""]
    return "\n".join(head)


def _last_lines(text: str, n: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])
