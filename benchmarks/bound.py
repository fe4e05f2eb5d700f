"""The analytic bound on a pipeline's step time, from what its stages measured (pure arithmetic).

Resources are each peer's compute and each directed peer pair's shaped link. Per step, a peer is busy
for its measured compute seconds and a pair for the bytes that crossed it over its rate. Two bounds:

- *busy*: the busiest resource (``max`` over peers' compute and pairs' bytes / rate): no schedule
  finishes a step sooner.
- *pipeline*: the busy time plus what a synchronous pipeline cannot overlap with it. A stage-``s``
  peer idles until the first micro-batch came through stages ``< s`` and, after its last backward,
  waits for that micro-batch's backward through stages ``< s`` or for its own all-reduce, whichever
  is longer; a link idles until its first micro-batch was computed by the stages before it (forward)
  or after it (gradients). The stages' per-micro-batch times used for this fill are the fastest
  replica's, so it is still a lower bound on the step time.

Samples per step over either bound is the throughput no run can beat on those measurements.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class PeerStats:
    """One peer's measurements per optimizer step."""

    stage: int
    compute_s: float
    micro_batches: float
    sent: dict[str, float] = field(default_factory=dict)     # bytes by receiving peer (all traffic)
    reduce: dict[str, float] = field(default_factory=dict)   # the all-reduce's part of ``sent``


@dataclass
class Bound:
    step_s: float         # pipeline bound on the step time
    busy_step_s: float    # busiest resource alone
    limit: str            # the resource that sets ``step_s``


def per_step(first: dict, last: dict) -> PeerStats:
    """A peer's measurements per step between two of its metrics rows (running counters)."""
    n = last["step"] - first["step"]
    if n <= 0:
        raise ValueError("two rows of different steps are needed")

    def delta(key: str) -> dict[str, float]:
        return {p: (b - first.get(key, {}).get(p, 0)) / n for p, b in last.get(key, {}).items()}

    return PeerStats(last["stage"], (last["compute_s"] - first["compute_s"]) / n,
                     (last["micro_batches"] - first["micro_batches"]) / n, delta("sent_to"), delta("reduce_to"))


def step_bound(peers: dict[str, PeerStats], rate_bps: Callable[[str, str], float],
               name: Callable[[str], str] = str) -> Bound:
    """Bounds on the step time of ``peers`` (peer id -> per-step stats); ``rate_bps(a, b)`` is the
    shaped rate from ``a`` to ``b``."""
    stages = sorted({p.stage for p in peers.values()})
    holders = {s: [q for q, p in peers.items() if p.stage == s] for s in stages}
    per_mb = {s: min((peers[q].compute_s / peers[q].micro_batches for q in holders[s] if peers[q].micro_batches),
                     default=0.0) for s in stages}

    def crossing(a_stage: int, b_stage: int) -> float:
        """Seconds one micro-batch's tensors take from stage ``a_stage`` to ``b_stage`` at the best pair's rate."""
        pairs = [(a, b) for a in holders[a_stage] for b in holders[b_stage]]
        data = sum(peers[a].sent.get(b, 0) - peers[a].reduce.get(b, 0) for a, b in pairs)
        count = sum(peers[q].micro_batches for q in holders[max(a_stage, b_stage)])
        return 8 * data / count / max(rate_bps(a, b) for a, b in pairs) if count else 0.0

    link_mb = [crossing(s, s + 1) + crossing(s + 1, s) for s in stages[:-1]]
    upfill = {s: sum(per_mb[t] for t in stages if t < s) + sum(link_mb[:s]) for s in stages}
    reduce_s = {s: max((8 * peers[a].reduce.get(b, 0) / rate_bps(a, b) for a in holders[s] for b in holders[s] if a != b),
                       default=0.0) for s in stages}

    busy, piped = {}, {}
    for q, p in peers.items():
        busy[f"compute {name(q)}"] = p.compute_s
        piped[f"compute {name(q)}"] = p.compute_s + max(upfill[p.stage], reduce_s[p.stage])
        for r, sent in p.sent.items():
            if r not in peers or r == q:
                continue
            key, t = f"link {name(q)}->{name(r)}", 8 * sent / rate_bps(q, r)
            busy[key] = t
            other = peers[r].stage
            before = [s for s in stages if (s <= p.stage if other > p.stage else s >= p.stage)] if other != p.stage else []
            piped[key] = t + sum(per_mb[s] for s in before)
    limit = max(piped, key=piped.get)
    return Bound(piped[limit], max(busy.values()), limit)
