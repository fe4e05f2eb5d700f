"""OP-Fence: group peers into fences, chain the fences into a pipeline, partition the OP-DAG.

For every fence level and chain order (``fences``), peers are laid out in a line: fence by fence,
fastest first within a fence. Lines of more than ``MAX_UNITS`` peers are coarsened into units of
similar peers. A stage is then a contiguous run of ops (segments) on a contiguous run of units of
one fence (its data-parallel replicas); units left at the end of a fence, or whole fences, become
spares. A dynamic program over (stages so far, segments placed, next unit) finds, for every stage
count, the layout whose bottleneck (stage compute + amortised all-reduce, link transfer at the best
compression) is smallest, with memory as a hard constraint. Each of those layouts is priced by the
exact cost model (``plan.evaluate``, which adds pipeline fill and all-reduce) and the cheapest plan
over all levels, orders and stage counts wins. Everything is deterministic: peers are sorted by id
first and ties break on the plan hash.

Relayed members (behind NAT, a link through a relay: capped in bytes and time, reset by the relay,
slow) take roles that send little before mid-pipeline stages (``relay_exposure``): of the plans within
``RELAY_SLACK`` of the fastest, the one whose relayed peers sit on the fewest pipeline links wins (a
spare or a replica of a one-stage plan sits on none, an end stage on one, a mid stage on two), then
the one with fewer of them on the first stage (which sends every activation); in swarms of up to
``REFINE_PEERS``, moves of the relayed peers out of the fastest plan's pipeline join the candidates.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from swarm.scheduler.costs import (
    PlanSettings,
    Swarm,
    Workload,
    allreduce_time,
    amortised_sync_factor,
    best_link_time,
    compute_time,
    group_tflops,
    rpc_s,
    stage_memory,
    sync_options,
)
from swarm.scheduler.fences import chain_orders, fence_bandwidth, fence_levels
from swarm.scheduler.plan import Plan, evaluate

MAX_UNITS = 32        # peer line coarsened to at most this many units
REFINE_PEERS = 16     # local search (peer moves) only for swarms up to this size
REFINE_STARTS = 4     # ... from this many of the best distinct DP layouts
RELAY_SLACK = 0.10    # a plan that keeps relayed peers off pipeline links may be this much slower

# Orders of peers inside a fence: stages take contiguous runs of this line, so the order decides which
# peers can be replicas together and which stage (early: more activations in flight) gets more memory.
LINE_ORDERS = (lambda p: (-p.tflops,), lambda p: (-p.memory_bytes,), lambda p: (p.tflops,))

Layout = list[tuple[tuple[int, int], list[int]]]   # ((first seg, stop seg), peer indices) per stage


class _Units:
    """The peer line of one (level, order): units with their slowest member's speed, size, min memory, fence id."""

    def __init__(self, swarm: Swarm, fences: list[list[int]], max_units: int, key=None):
        total = sum(len(f) for f in fences)
        self.members: list[list[int]] = []
        self.fence_of: list[int] = []
        for k, fence in enumerate(fences):
            line = sorted(fence, key=lambda p: (*key(swarm.peers[p]), swarm.peers[p].peer_id))
            n_units = len(line) if total <= max_units else max(1, round(max_units * len(line) / total))
            for chunk in np.array_split(np.array(line), min(n_units, len(line))):
                self.members.append(chunk.tolist())
                self.fence_of.append(k)
        u = len(self.members)
        self.tflops = np.array([min(swarm.peers[p].tflops for p in m) for m in self.members])
        self.cores = [[swarm.peers[p].cpu_cores for p in m] for m in self.members]
        self.count = np.array([len(m) for m in self.members])
        self.memory = np.array([min(swarm.peers[p].memory_bytes for p in m) for m in self.members], dtype=np.float64)
        self.bw = np.array([[swarm.min_bw(a, b) for b in self.members] for a in self.members])  # diag: inside a unit
        self.fence_end = [max(v for v in range(u) if self.fence_of[v] == self.fence_of[j]) + 1 for j in range(u)]
        self.fence_starts = sorted({min(v for v in range(u) if self.fence_of[v] == f) for f in set(self.fence_of)})

    def __len__(self) -> int:
        return len(self.members)


class _Ranges:
    """Proxy costs of every segment range ``[i, i')`` (an ``n x n+1`` matrix, inf where it does not
    fit) and of every cut, for a replica group: the DP's and the re-cut's common arithmetic, with the
    cost model's own formulas (``costs``) over all ranges at once. Memory is filtered at the fewest
    micro-batches any plan keeps in flight; ``evaluate`` prices the plan's real count."""

    def __init__(self, w: Workload, settings: PlanSettings):
        self.w, self.settings, n = w, settings, w.n
        self.lo, self.hi = np.triu_indices(n + 1, 1)
        self.params = w.param_bytes[self.hi] - w.param_bytes[self.lo]
        held, options = settings.fewest_held, sync_options(settings)
        # with an outer state (replicas that sync every H > 1 steps) or not -> (memory as it is, recomputed)
        self.memory = {o: (stage_memory(w, self.lo, self.hi, settings, held, False, o),
                           stage_memory(w, self.lo, self.hi, settings, held, True, o)) for o in (False, True)}
        self.syncs = [(True, amortised_sync_factor(settings))] * (max(options) > 1) + [(False, 1.0)] * (1 in options)

    def _fitted(self, tflops: float, replicas: int, rpc: float, memory: float, outer: bool) -> np.ndarray:
        """Compute per range (the forward pass again where it fits only recomputed and ``recompute``
        allows, or always under ``on``), inf where it does not fit ``memory``."""
        plain, recomputed = self.memory[outer]
        fits, fits_recomputed = plain <= memory, recomputed <= memory
        if self.settings.recompute == "on":
            fits = np.zeros_like(fits)
        elif self.settings.recompute == "off":
            fits_recomputed = np.zeros_like(fits)
        comp = compute_time(self.w, self.lo, self.hi, tflops, replicas, rpc, self.settings, recompute=~fits)
        return np.where(fits | fits_recomputed, comp, np.inf)

    def stage(self, tflops: float, replicas: int, inner_bw: float, memory: float, rpc: float) -> np.ndarray:
        """Compute (``_fitted``, with ``rpc`` seconds per pipeline call) plus, for replicas, the
        all-reduce amortised over the step's micro-batches: at the rarest, most compressed sync the plan
        may take where the outer state fits too, else every step, whichever is cheaper, per range."""
        if replicas == 1:
            comp = self._fitted(tflops, 1, rpc, memory, False)
        else:
            reduce = allreduce_time(self.params, replicas, inner_bw) / self.settings.micro_batches
            comp = np.min([self._fitted(tflops, replicas, rpc, memory, outer) + reduce / factor
                           for outer, factor in self.syncs], axis=0)
        cost = np.full((self.w.n, self.w.n + 1), np.inf)
        cost[self.lo, self.hi] = comp
        return cost

    def link(self, bw: float, flows: int) -> np.ndarray:
        """Best link time (raw or at the hardest ratio) after each segment."""
        return best_link_time(self.w.cut_bytes, bw, flows, self.settings)


def _layouts(w: Workload, swarm: Swarm, units: _Units, settings: PlanSettings) -> dict[int, Layout]:
    """The best layout (by DP bottleneck) for every reachable stage count."""
    n, u = w.n, len(units)
    s_max = min(settings.max_stages, n, u)
    inf = np.inf
    dp = np.full((s_max + 1, n + 1, u + 1), inf)
    back = np.full((s_max + 1, n + 1, u + 1, 3), -1, dtype=np.int64)
    for j in units.fence_starts:
        dp[0, 0, j] = 0.0
    final: dict[int, tuple[float, tuple[int, int, int]]] = {}
    ranges = _Ranges(w, settings)
    for j in range(u):
        prev = dp[:s_max, :n, j]
        rows = np.flatnonzero(np.isfinite(prev).any(axis=1))
        if not len(rows):
            continue
        inner = units.bw[j, j]
        for jn in range(j + 1, units.fence_end[j] + 1):
            inner = min(inner, units.bw[jn - 1, jn - 1], units.bw[j:jn - 1, jn - 1].min() if jn - 1 > j else inf)
            r = int(units.count[j:jn].sum())
            if settings.max_replicas and r > settings.max_replicas:
                break
            cost = ranges.stage(r * units.tflops[j:jn].min(), r, inner, units.memory[j:jn].min(),
                                rpc_s([c for v in range(j, jn) for c in units.cores[v]], settings))
            cand = np.maximum(prev[rows][:, :, None], cost[None, :, :])     # (stages, i, i')
            arg = cand.argmin(axis=1)
            best = np.take_along_axis(cand, arg[:, None, :], axis=1)[:, 0, :]   # (stages, i')
            for row, s in enumerate(rows):
                if np.isfinite(best[row, n]) and (s + 1 not in final or best[row, n] < final[s + 1][0]):
                    final[s + 1] = (best[row, n], (int(arg[row, n]), j, jn))
            if s_max < 2:
                continue
            for jj in [jn] + [f for f in units.fence_starts if f > jn]:
                if jj >= u:
                    continue
                link = ranges.link(units.bw[j:jn, jj].min(), min(r, int(units.count[jj])))  # index: i' - 1
                value = np.maximum(best[:, 1:n], link[None, : n - 1])     # i' = 1..n-1
                for row, s in enumerate(rows):
                    if s + 1 > s_max:
                        continue
                    target = dp[s + 1, 1:n, jj]
                    better = value[row] < target
                    if better.any():
                        idx = np.flatnonzero(better)
                        target[idx] = value[row][idx]
                        back[s + 1, idx + 1, jj] = np.stack([arg[row, idx + 1], np.full(len(idx), j),
                                                             np.full(len(idx), jn)], axis=1)
    layouts = {}
    for stages, (_, (i, j, jn)) in final.items():
        if settings.stages and stages != settings.stages:
            continue
        layout, stop = [], n
        for s in range(stages, 0, -1):
            layout.append(((i, stop), [p for v in range(j, jn) for p in units.members[v]]))
            if s > 1:
                stop = i
                i, j, jn = (int(x) for x in back[s - 1, i, j])
        layouts[stages] = layout[::-1]
    return layouts


def _key(plan: Plan) -> tuple:
    """Plans compare by predicted step, then fewer stages, then hash: a total, deterministic order."""
    return (round(plan.predicted_step_s, 12), len(plan.stages), plan.hash)


def _recut(ranges: _Ranges, swarm: Swarm, groups: list[list[int]]) -> Layout | None:
    """The best cuts (by DP bottleneck) for fixed, ordered replica groups; None if nothing fits."""
    n, fixed = ranges.w.n, ranges.settings.stages
    if len(groups) > min(n, ranges.settings.max_stages) or (fixed and len(groups) != fixed):
        return None
    if ranges.settings.max_replicas and max(map(len, groups)) > ranges.settings.max_replicas:
        return None
    best, back = np.full(n + 1, np.inf), []
    best[0] = 0.0
    for k, group in enumerate(groups):
        cost = ranges.stage(group_tflops([swarm.peers[p].tflops for p in group]), len(group), swarm.min_bw(group, group),
                            min(swarm.peers[p].memory_bytes for p in group),
                            rpc_s([swarm.peers[p].cpu_cores for p in group], ranges.settings))
        start = best[:n].copy()
        if k:
            prev = groups[k - 1]
            start = np.maximum(start, np.concatenate([[np.inf], ranges.link(swarm.min_bw(prev, group),
                                                                            min(len(prev), len(group)))[: n - 1]]))
        cand = np.maximum(start[:, None], cost)
        back.append(cand.argmin(axis=0))
        best = cand.min(axis=0)
    if not np.isfinite(best[n]):
        return None
    layout, stop = [], n
    for k in range(len(groups) - 1, -1, -1):
        start = int(back[k][stop])
        layout.append(((start, stop), groups[k]))
        stop = start
    return layout[::-1]


def _regroupings(groups: list[list[int]], n_peers: int):
    """Groupings one move away: a peer (staged or spare) joins another stage, opens a new stage at
    any position, or becomes spare; or two peers of different stages (or a spare) swap."""
    stage_of = {p: s for s, g in enumerate(groups) for p in g}
    for p in range(n_peers):
        here = stage_of.get(p)
        rest = [[q for q in g if q != p] for g in groups]
        for t in range(len(groups)):
            if t != here:
                yield [g + [p] if k == t else g for k, g in enumerate(rest) if g or k == t]
        for k in range(len(groups) + 1):
            yield [g for g in rest[:k] + [[p]] + rest[k:] if g]
        if here is not None and (len(groups) > 1 or len(groups[here]) > 1):
            yield [g for g in rest if g]
        for q in range(p + 1, n_peers):
            if stage_of.get(q) != here:
                swap = {p: q, q: p}
                yield [[swap.get(x, x) for x in g] for g in groups]


def _refine(w: Workload, swarm: Swarm, layout: Layout, settings: PlanSettings, rounds: int = 30) -> tuple[Plan, Layout]:
    """Local search from a DP layout: regroup one peer at a time, re-cut the ops for the new groups,
    keep the first move the exact cost model prefers; stop at a local optimum or after ``rounds``."""
    ranges = _Ranges(w, settings)
    plan = evaluate(w, swarm, layout, settings)
    for _ in range(rounds):
        for trial, candidate in _moves(ranges, swarm, layout):
            if trial.predicted_step_s < plan.predicted_step_s * (1 - 1e-9):
                plan, layout = trial, candidate
                break
        else:
            break
    return plan, layout


def _moves(ranges: _Ranges, swarm: Swarm, layout: Layout, keep=lambda groups: True):
    """(plan, layout) of every regrouping one move from ``layout`` that ``keep`` takes and that fits,
    re-cut and priced."""
    for groups in _regroupings([peers for _, peers in layout], len(swarm.peers)):
        candidate = _recut(ranges, swarm, groups) if keep(groups) else None
        if candidate is not None:
            yield evaluate(ranges.w, swarm, candidate, ranges.settings), candidate


def relay_exposure(plan: Plan, swarm: Swarm) -> tuple[int, int]:
    """(pipeline links the relayed peers sit on, relayed peers on the first of several stages)."""
    relayed = {p.peer_id for p in swarm.peers if p.relayed}
    last = len(plan.stages) - 1
    links = sum(((s.index > 0) + (s.index < last)) * len(relayed.intersection(s.peers)) for s in plan.stages)
    return links, (len(relayed.intersection(plan.stages[0].peers)) if last > 0 else 0)


def _relay_moves(w: Workload, swarm: Swarm, layout: Layout, settings: PlanSettings) -> list[tuple[Plan, Layout]]:
    """The plans one move of a relayed peer away from ``layout`` (to spare, another stage, a swap)."""
    relayed = {i for i, p in enumerate(swarm.peers) if p.relayed}
    before = {p: k for k, (_, g) in enumerate(layout) for p in g}

    def moves_relayed(groups) -> bool:
        now = {p: k for k, g in enumerate(groups) for p in g}
        return any(now.get(p) != before.get(p) for p in relayed)
    return list(_moves(_Ranges(w, settings), swarm, layout, moves_relayed))


def _prefer_unrelayed(candidates: list[tuple[Plan, Layout]], swarm: Swarm) -> Plan:
    """Of the plans within ``RELAY_SLACK`` of the fastest, the least relay-exposed (then the fastest)."""
    fastest = min(candidates, key=lambda c: _key(c[0]))[0]
    if not any(p.relayed for p in swarm.peers) or not fastest.feasible:
        return fastest
    near = [plan for plan, _ in candidates if plan.predicted_step_s <= fastest.predicted_step_s * (1 + RELAY_SLACK)]
    return min(near, key=lambda plan: (relay_exposure(plan, swarm), _key(plan)))


def schedule(w: Workload, swarm: Swarm, settings: PlanSettings = PlanSettings(), max_units: int = MAX_UNITS,
             refine_peers: int = REFINE_PEERS) -> Plan:
    """The OP-Fence plan for ``w`` on ``swarm`` (see the module docstring)."""
    candidates: list[tuple[Plan, Layout]] = []
    for fences in fence_levels(swarm.bandwidth):
        fbw = fence_bandwidth(swarm.bandwidth, fences)
        for order in chain_orders(fbw):
            for key in LINE_ORDERS:
                units = _Units(swarm, [fences[k] for k in order], max_units, key)
                for layout in _layouts(w, swarm, units, settings).values():
                    candidates.append((evaluate(w, swarm, layout, settings), layout))
    if not candidates:  # nothing fits (or a fixed stage count cannot be met): the strongest peer alone, infeasible
        strongest = max(range(len(swarm.peers)), key=lambda p: (swarm.peers[p].memory_bytes, swarm.peers[p].peer_id))
        return replace(evaluate(w, swarm, [((0, w.n), [strongest])], settings), predicted_step_s=math.inf)
    candidates.sort(key=lambda c: _key(c[0]))
    if len(swarm.peers) <= refine_peers:
        seen, refined = set(), []
        for plan, layout in candidates:
            if plan.hash not in seen and len(seen) < REFINE_STARTS:
                seen.add(plan.hash)
                refined.append(_refine(w, swarm, layout, settings))
        candidates = sorted(refined + candidates[:1], key=lambda c: _key(c[0]))
        if relay_exposure(candidates[0][0], swarm) != (0, 0):   # a local optimum: moves help only an exposed one
            candidates += _relay_moves(w, swarm, candidates[0][1], settings)
    return _prefer_unrelayed(candidates, swarm)


def baseline(w: Workload, swarm: Swarm, settings: PlanSettings = PlanSettings(), compress: bool = False) -> Plan:
    """The naive plan: one stage per peer in id order, equal op counts per stage, no compression
    (``compress``: the same layout with AdaTopK ratios on its links)."""
    n_stages = min(len(swarm.peers), w.n)
    n_ops, bounds = w.seg_stop[-1], [0]
    for k in range(1, n_stages):
        choices = range(bounds[-1] + 1, w.n - (n_stages - k) + 1)
        bounds.append(min(choices, key=lambda b: (abs(w.seg_stop[b - 1] - k * n_ops / n_stages), b)))
    bounds.append(w.n)
    return evaluate(w, swarm, [((a, b), [k]) for k, (a, b) in enumerate(zip(bounds, bounds[1:]))], settings,
                    compress=compress)


def best_alone(w: Workload, swarm: Swarm, settings: PlanSettings = PlanSettings()) -> Plan | None:
    """The fastest plan of one peer holding the whole model (None: the model fits no single peer)."""
    alone = [evaluate(w, swarm, [((0, w.n), [p])], settings) for p in range(len(swarm.peers))]
    fits = [plan for plan in alone if plan.feasible]
    return min(fits, key=_key) if fits else None
