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
import sys

from benchmarks.scenarios import run_scenarios

FILES = ["tests/test_hostile_swarm.py", "tests/test_local_input.py"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json-out", default="benchmarks/results/hostile.json")
    parser.add_argument("--rows", default=None, help="HOSTILE_ROWS for the records group (default: every row)")
    parser.add_argument("--timeout-s", type=float, default=2400.0)
    args = parser.parse_args(argv)
    return run_scenarios(FILES, args.json_out, args.timeout_s, {"HOSTILE_ROWS": args.rows} if args.rows else None)


if __name__ == "__main__":
    sys.exit(main())
