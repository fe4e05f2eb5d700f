"""Planning instances for scheduler tests (``benchmarks.scheduler_cases``) and a brute-force optimum to check against."""
from __future__ import annotations

import itertools

from benchmarks.scheduler_cases import random_workload, sites_swarm
from swarm.scheduler import PlanSettings, Swarm, Workload, evaluate

__all__ = ["brute_force", "random_workload", "sites_swarm"]


def brute_force(w: Workload, swarm: Swarm, settings: PlanSettings):
    """Smallest predicted step over every stage count, op partition and assignment of peers to stages
    (or to the spare pool), under the same cost model (``evaluate``)."""
    n_peers, best = len(swarm.peers), None
    for n_stages in range(1, min(n_peers, w.n, settings.max_stages) + 1):
        for cuts in itertools.combinations(range(1, w.n), n_stages - 1):
            bounds = (0, *cuts, w.n)
            segs = list(zip(bounds, bounds[1:]))
            for labels in itertools.product(range(-1, n_stages), repeat=n_peers):
                groups = [[p for p in range(n_peers) if labels[p] == s] for s in range(n_stages)]
                if all(groups):
                    plan = evaluate(w, swarm, list(zip(segs, groups)), settings)
                    if best is None or plan.predicted_step_s < best.predicted_step_s:
                        best = plan
    return best
