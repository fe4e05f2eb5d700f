"""Fences: groups of peers whose mutual bandwidth is high, and the orders to chain them in.

A *fence level* is a bandwidth threshold: peers joined by links at least that fast (transitively)
share a fence. Thresholds sit in the widest gaps of the sorted log-bandwidths (a gap must be at
least x2): that is where "inside a site" ends and "between sites" begins. The scheduler tries the
two widest gaps and the single all-peers fence, and keeps the best plan; replicas of a stage always
share a fence, so data-parallel averaging never crosses a slow link.
"""
from __future__ import annotations

import itertools

import numpy as np

MIN_GAP = np.log(2.0)   # bandwidths within x2 of each other are "similar"


def components(adjacent: np.ndarray) -> list[list[int]]:
    """Connected components of a boolean adjacency matrix, each sorted, ordered by first member."""
    n, seen, out = len(adjacent), np.zeros(len(adjacent), dtype=bool), []
    for start in range(n):
        if seen[start]:
            continue
        frontier, members = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        frontier[start] = members[start] = True
        while frontier.any():
            reach = adjacent[frontier].any(axis=0) & ~members
            members |= reach
            frontier = reach
        seen |= members
        out.append(np.flatnonzero(members).tolist())
    return out


def fence_levels(bandwidth: np.ndarray, max_levels: int = 2) -> list[list[list[int]]]:
    """Candidate fence partitions: one fence of all peers, then one per wide bandwidth gap."""
    n = len(bandwidth)
    levels = [[list(range(n))]]
    if n < 2:
        return levels
    values = np.unique(np.log(bandwidth[np.triu_indices(n, 1)]))
    gaps = np.diff(values)
    for k in np.argsort(-gaps, kind="stable")[:max_levels]:
        if gaps[k] < MIN_GAP:
            break
        threshold = np.exp((values[k] + values[k + 1]) / 2)
        fences = components(bandwidth >= threshold)
        if len(fences) > 1 and fences not in levels:
            levels.append(fences)
    return levels


def fence_bandwidth(bandwidth: np.ndarray, fences: list[list[int]]) -> np.ndarray:
    """Slowest link between every two fences (inf on the diagonal)."""
    f = len(fences)
    out = np.full((f, f), np.inf)
    for a, b in itertools.combinations(range(f), 2):
        out[a, b] = out[b, a] = bandwidth[np.ix_(fences[a], fences[b])].min()
    return out


def chain_orders(fence_bw: np.ndarray, limit: int = 6) -> list[tuple[int, ...]]:
    """Orders to visit fences in: all of them for up to 4 fences, else greedy widest-next-link paths
    from every start (and their reverses), best first by (slowest link, total log-bandwidth)."""
    f = len(fence_bw)
    if f <= 4:
        return list(itertools.permutations(range(f)))
    paths = set()
    for start in range(f):
        path, left = [start], set(range(f)) - {start}
        while left:
            nxt = max(sorted(left), key=lambda b: fence_bw[path[-1], b])
            path.append(nxt)
            left.remove(nxt)
        paths.add(tuple(path))
        paths.add(tuple(reversed(path)))

    def score(path):
        links = [fence_bw[a, b] for a, b in zip(path, path[1:])]
        return (-min(links), -float(np.sum(np.log(links))), path)
    return sorted(paths, key=score)[:limit]
