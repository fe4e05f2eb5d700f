"""Planning instances for the scheduler benchmark and its tests: random workloads, peers at sites."""
from __future__ import annotations

import numpy as np

from swarm.scheduler import PeerSpec, Swarm, Workload


def random_workload(rng: np.random.Generator, n: int, param_scale: float = 4e6) -> Workload:
    return Workload.from_segments(
        flops=rng.uniform(0.5e9, 6e9, n), kernels=rng.integers(5, 60, n), param_bytes=rng.uniform(0.2, 1.0, n) * param_scale,
        act_bytes=rng.uniform(0.2e6, 2e6, n), cut_bytes=list(rng.uniform(0.05e6, 3e6, n - 1)) + [0])


def sites_swarm(rng: np.random.Generator, sizes: list[int], inside_bps=1e9, between_bps=20e6, weak: int = 0,
                memory_gb=(4, 16)) -> Swarm:
    """Peers at sites (fast inside, slow between); ids shuffled so that id order mixes sites; ``weak``
    peers get a tenth of the compute."""
    site = [s for s, k in enumerate(sizes) for _ in range(k)]
    ids = [f"peer{int(x):03d}" for x in rng.permutation(len(site))]
    peers = [PeerSpec(ids[i], float(rng.uniform(2, 10)) * (0.1 if i < weak else 1.0),
                      int(rng.uniform(*memory_gb) * 1e9)) for i in range(len(site))]
    noise = rng.uniform(0.8, 1.25, (len(site), len(site)))
    bw = np.array([[(inside_bps if site[a] == site[b] else between_bps) * noise[a, b] for b in range(len(site))]
                   for a in range(len(site))])
    return Swarm.build(peers, bw)
