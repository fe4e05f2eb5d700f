"""OP-Fence scheduler benchmark: planning time and predicted speed-up over the naive plan, from a
handful of peers to 1,000 peers x 200 ops. Prints a table and writes JSON.

    python -m benchmarks.scheduler [--json-out benchmarks/results/scheduler.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.scheduler_cases import random_workload, sites_swarm
from swarm.scheduler import baseline, schedule

CASES = [  # (peers per site, ops, weak peers)
    ([3, 3, 3], 24, 1),
    ([10, 10, 10], 50, 3),
    ([34, 33, 33], 100, 10),
    ([100] * 10, 200, 30),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json-out", default="benchmarks/results/scheduler.json")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'peers':>6}{'sites':>6}{'ops':>5}{'plan s':>8}{'stages':>7}{'spares':>7}{'step s':>9}{'naive s':>10}{'speed-up':>9}")
    for sizes, n_ops, weak in CASES:
        rng = np.random.default_rng(0)
        w = random_workload(rng, n_ops, param_scale=20e6)
        swarm = sites_swarm(rng, sizes, inside_bps=1e9, between_bps=20e6, weak=weak, memory_gb=(1, 8))
        start = time.perf_counter()
        plan = schedule(w, swarm)
        elapsed = time.perf_counter() - start
        naive = baseline(w, swarm)
        row = {"peers": len(swarm.peers), "sites": len(sizes), "ops": n_ops, "plan_s": elapsed,
               "stages": len(plan.stages), "spares": len(plan.spares), "predicted_step_s": plan.predicted_step_s,
               "baseline_step_s": naive.predicted_step_s, "speedup": naive.predicted_step_s / plan.predicted_step_s}
        rows.append(row)
        print(f"{row['peers']:>6}{row['sites']:>6}{n_ops:>5}{elapsed:>8.2f}{row['stages']:>7}{row['spares']:>7}"
              f"{plan.predicted_step_s:>9.3f}{naive.predicted_step_s:>10.2f}{row['speedup']:>8.1f}x")
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
