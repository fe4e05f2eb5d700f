"""Every minutes-long end-to-end scenario of the test suite (marker ``scenario``: real ``node.py run``
swarms; the default suite keeps an in-process version of each), run with pytest, printed as a table
and written as JSON with what each scenario printed (lines starting with ``[``).

    python -m benchmarks.scenarios [--files tests/test_x.py ...] [--json-out benchmarks/results/scenarios.json]

``python -m benchmarks.hostile`` runs the hostile-swarm ones (issue 22).
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


def run_scenarios(files: list[str], json_out: str, timeout_s: float, env: dict[str, str] | None = None) -> int:
    """Run the ``scenario`` tests of ``files`` (all of tests/ when empty); 0 when none failed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        started = time.time()
        # "-m" again on the command line replaces the default "not scenario" of pyproject's addopts
        run = subprocess.run([sys.executable, "-m", "pytest", *(files or ["tests"]), "-m", "scenario",
                              "-p", "no:cacheprovider", f"--junitxml={report}", "-o", "junit_logging=system-out"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        elapsed = time.time() - started
        if not report.exists():
            print(run.stdout[-3000:] + run.stderr[-2000:])
            print("error: pytest wrote no report")
            return 2
        rows = [_row(case) for case in ET.parse(report).getroot().iter("testcase")]
    print(f"{'scenario':<82}{'outcome':>9}{'seconds':>9}")
    for r in rows:
        print(f"{r['scenario'][:81]:<82}{r['outcome']:>9}{r['seconds']:>9.1f}")
        for line in r["notes"]:
            print(f"    {line[:160]}")
    Path(json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(json_out).write_text(json.dumps({"elapsed_s": elapsed, "scenarios": rows}, indent=2))
    print(f"{sum(r['outcome'] == 'passed' for r in rows)} passed, {sum(r['outcome'] == 'failed' for r in rows)} failed "
          f"in {elapsed:.0f} s; written to {json_out}")
    return 0 if all(r["outcome"] != "failed" for r in rows) else 1


def _row(case) -> dict:
    failure = case.find("failure") if case.find("failure") is not None else case.find("error")
    out = case.find("system-out")
    lines = [line for line in (out.text or "").splitlines() if line.startswith("[")] if out is not None else []
    return {"scenario": case.get("name"), "seconds": float(case.get("time", 0)),
            "outcome": "failed" if failure is not None else "skipped" if case.find("skipped") is not None else "passed",
            "failure": (failure.get("message") or "")[:2000] if failure is not None else None, "notes": lines}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="*", default=[], help="test files (default: all of tests/)")
    parser.add_argument("--json-out", default="benchmarks/results/scenarios.json")
    parser.add_argument("--timeout-s", type=float, default=3600.0)
    args = parser.parse_args(argv)
    return run_scenarios(args.files, args.json_out, args.timeout_s)


if __name__ == "__main__":
    sys.exit(main())
