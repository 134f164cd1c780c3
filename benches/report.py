"""Turn a pytest-benchmark JSON file into a markdown table: ``python -m benches.report FILE.json``."""
from __future__ import annotations

import json
import sys


def _fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def to_markdown(report: dict) -> str:
    rows = report["benchmarks"]
    device = rows[0]["extra_info"].get("device", "?") if rows else "?"
    out = [f"Device: {device}; {report.get('datetime', '')}", "",
           "| group | impl | median ms | p20 ms | p80 ms | TFLOP/s | GB/s | images/s | roofline | speed-up vs peers |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (r["extra_info"].get("group", ""), r["extra_info"].get("impl", ""))):
        i = row["extra_info"]
        speed = ", ".join(f"{k} {v:.2f}x" for k, v in (i.get("speedup_vs") or {}).items())
        out.append(
            f"| {i.get('group', row['name'])} | {i.get('impl', '')} | {_fmt(i.get('median_s', 0) * 1e3, '.4f')} "
            f"| {_fmt(i.get('p20_s', 0) * 1e3, '.4f')} | {_fmt(i.get('p80_s', 0) * 1e3, '.4f')} "
            f"| {_fmt(i.get('tflops'), '.2f')} | {_fmt(i.get('gbps'), '.1f')} | {_fmt(i.get('images_per_s'), '.1f')} "
            f"| {_fmt(i.get('roofline_fraction'), '.1%')} | {speed} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benches.report FILE.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        print(to_markdown(json.load(f)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
