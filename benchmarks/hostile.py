"""The hostile-swarm scenarios (issue 22, docs/hostile.md): real `node.py run` swarms attacked by an
extra peer with its own identity — insane records, a hijack ballot, ghosts, decompression bombs, fetch
and half-frame floods, a NaN-poisoning member — and a demo whose node is SIGKILLed. They take from
half a minute to minutes each, so the default test suite leaves them out (marker ``scenario``; the
suite keeps the in-process versions of each defence); this runs them (`pytest -m scenario`), prints a
table and writes JSON, with what each scenario printed (the refusal lines it saw, RSS before and at
peak under each flood).

    python -m benchmarks.hostile [--rows epoch,hijack,...] [--json-out benchmarks/results/hostile.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json-out", default="benchmarks/results/hostile.json")
    parser.add_argument("--rows", default=None, help="HOSTILE_ROWS for the records group (default: every row)")
    parser.add_argument("--timeout-s", type=float, default=2400.0)
    args = parser.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if args.rows:
        env["HOSTILE_ROWS"] = args.rows
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        started = time.time()
        # "-m" again on the command line replaces the default "not scenario" of pyproject's addopts
        run = subprocess.run([sys.executable, "-m", "pytest", "tests/test_hostile_swarm.py", "tests/test_local_input.py", "-m", "scenario",
                              "-p", "no:cacheprovider", f"--junitxml={report}", "-o", "junit_logging=system-out"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout_s)
        elapsed = time.time() - started
        if not report.exists():
            print(run.stdout[-3000:] + run.stderr[-2000:])
            print("error: pytest wrote no report")
            return 2
        cases = ET.parse(report).getroot().iter("testcase")
        rows = []
        for case in cases:
            failure = case.find("failure") if case.find("failure") is not None else case.find("error")
            out = case.find("system-out")
            lines = [line for line in (out.text or "").splitlines() if line.startswith("[")] if out is not None else []
            rows.append({"scenario": case.get("name"), "seconds": float(case.get("time", 0)),
                         "outcome": "failed" if failure is not None else "skipped" if case.find("skipped") is not None else "passed",
                         "failure": (failure.get("message") or "")[:2000] if failure is not None else None,
                         "notes": lines})
    print(f"{'scenario':<82}{'outcome':>9}{'seconds':>9}")
    for r in rows:
        print(f"{r['scenario'][:81]:<82}{r['outcome']:>9}{r['seconds']:>9.1f}")
        for line in r["notes"]:
            print(f"    {line[:160]}")
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps({"elapsed_s": elapsed, "scenarios": rows}, indent=2))
    print(f"{sum(r['outcome'] == 'passed' for r in rows)} passed, {sum(r['outcome'] == 'failed' for r in rows)} failed "
          f"in {elapsed:.0f} s; written to {args.json_out}")
    return 0 if all(r["outcome"] != "failed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
