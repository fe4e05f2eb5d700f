"""A Plan: ordered stages (op ranges + replica peers), pipeline links with target compression ratios,
spare peers and the predicted step time. Plain data: printable, JSON, hashable."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace

from swarm.scheduler.costs import (
    PlanSettings,
    Swarm,
    Workload,
    best_link_time,
    choose_sync_every,
    in_flight,
    link_time,
    ratio_for,
    recompute_flags,
    stage_memory,
    stage_times,
    sync_cost,
    sync_ratio,
)


def _round(x: float) -> float | None:
    """Floats as they enter JSON and the hash: 6 significant digits (bit-level noise never matters)."""
    return None if not math.isfinite(x) else float(f"{x:.6g}")


@dataclass(frozen=True)
class StagePlan:
    index: int
    first_op: int
    stop_op: int
    ops: tuple[str, ...]
    peers: tuple[str, ...]
    compute_s: float
    memory_bytes: float
    allreduce_s: float      # one sync of the replicas (at the plan's ``sync_every``: compressed when > 1)
    recompute: bool = False  # the stage recomputes its activations in backward (``costs.recompute_flags``)


@dataclass(frozen=True)
class LinkPlan:
    src: int            # stage indices
    dst: int
    bandwidth_bps: float
    bytes: float        # activation bytes per micro-batch before compression (gradient: same)
    ratio: float        # AdaTopK target: raw bytes / wire bytes (1 = uncompressed)
    time_s: float


@dataclass(frozen=True)
class Plan:
    model: str
    stages: tuple[StagePlan, ...]
    links: tuple[LinkPlan, ...]
    spares: tuple[str, ...]
    bottleneck_s: float
    predicted_step_s: float     # inf when some stage does not fit in its replicas' memory
    micro_batches: int
    sync_every: int = 1         # H: replicas sum gradients every step (1) or exchange pseudo-gradients every H
    utilization: float = 0.0    # model FLOP/s computed over all members' TFLOP/s (spares included)
    predicted_samples_per_s: float = 0.0

    @property
    def feasible(self) -> bool:
        return math.isfinite(self.predicted_step_s)

    def role(self, peer_id: str) -> dict:
        """A peer's part in the plan: its stage (or spare) and its pipeline neighbours."""
        for s in self.stages:
            if peer_id in s.peers:
                prev = self.stages[s.index - 1].peers if s.index else ()
                nxt = self.stages[s.index + 1].peers if s.index + 1 < len(self.stages) else ()
                return {"stage": s.index, "replicas": [p for p in s.peers if p != peer_id],
                        "previous": list(prev), "next": list(nxt)}
        return {"stage": None, "spare": peer_id in self.spares}

    def summary(self) -> str:
        """One line: each stage's peers (id tails) and predicted compute, each link's bandwidth and ratio."""
        parts = []
        for s in self.stages:
            parts.append(f"[{' '.join(p[-6:] for p in s.peers)}] {s.compute_s:.3g} s{' recompute' if s.recompute else ''}")
            if s.index < len(self.links):
                link = self.links[s.index]
                parts.append(f"{link.bandwidth_bps / 1e6:.3g} Mbit/s x{link.ratio:.3g}")
        sync = f", sync every {self.sync_every}" if self.sync_every > 1 else ""
        return " | ".join(parts) + f"; {self.micro_batches} micro-batches{sync}, predicted step {self.predicted_step_s:.3g} s"

    def to_dict(self) -> dict:
        def clean(d: dict) -> dict:
            return {k: (_round(v) if isinstance(v, float) else list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
        return {"model": self.model, "stages": [clean(asdict(s)) for s in self.stages],
                "links": [clean(asdict(link)) for link in self.links], "spares": list(self.spares),
                "bottleneck_s": _round(self.bottleneck_s), "predicted_step_s": _round(self.predicted_step_s),
                "micro_batches": self.micro_batches, "sync_every": self.sync_every,
                "utilization": _round(self.utilization), "predicted_samples_per_s": _round(self.predicted_samples_per_s),
                "feasible": self.feasible}

    def compact(self) -> dict:
        """``to_dict`` without op names (peers rebuild them from their own OP-DAG): small enough for the DHT."""
        d = self.to_dict()
        d["stages"] = [{k: v for k, v in s.items() if k != "ops"} for s in d["stages"]]
        return d

    @classmethod
    def from_compact(cls, d: dict, names: tuple[str, ...]) -> Plan:
        """Inverse of ``compact`` given the OP-DAG's op names; ValueError if malformed."""
        try:
            stages = tuple(StagePlan(int(s["index"]), int(s["first_op"]), int(s["stop_op"]),
                                     tuple(names[int(s["first_op"]):int(s["stop_op"])]), tuple(map(str, s["peers"])),
                                     float(s["compute_s"]), float(s["memory_bytes"]), float(s["allreduce_s"]),
                                     bool(s.get("recompute", False)))
                           for s in d["stages"])
            links = tuple(LinkPlan(int(x["src"]), int(x["dst"]), float(x["bandwidth_bps"]), float(x["bytes"]),
                                   float(x["ratio"]), float(x["time_s"])) for x in d["links"])
            step = math.inf if d["predicted_step_s"] is None else float(d["predicted_step_s"])
            return cls(str(d["model"]), stages, links, tuple(map(str, d["spares"])), float(d["bottleneck_s"]), step,
                       int(d["micro_batches"]), int(d.get("sync_every", 1)), float(d.get("utilization") or 0.0),
                       float(d.get("predicted_samples_per_s") or 0.0))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"malformed plan: {e!r}") from None

    def in_flight(self, schedule: str = "1f1b") -> int:
        """Micro-batches a first-stage replica keeps in flight under ``schedule`` (``costs.in_flight``):
        what the runtime drives with, and what ``evaluate`` priced each stage's memory at."""
        trip = round_trip([st.compute_s for st in self.stages], [len(st.peers) for st in self.stages],
                          [link.time_s for link in self.links])
        return in_flight(schedule, self.micro_batches, len(self.stages), trip, self.bottleneck_s,
                         len(self.stages[0].peers))

    @property
    def members(self) -> tuple[str, ...]:
        return tuple(sorted([p for s in self.stages for p in s.peers] + list(self.spares)))

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> str:
        lines = [f"{'stage':>5}  {'ops':<34}{'peers':<28}{'compute ms':>11}{'mem MB':>9}{'allreduce ms':>13}  recompute"]
        for s in self.stages:
            ops = f"{s.ops[0]}..{s.ops[-1]} ({len(s.ops)})"
            peers = s.peers[0][-20:] + (f" (+{len(s.peers) - 1})" if len(s.peers) > 1 else "")
            lines.append(f"{s.index:>5}  {ops[:33]:<34}{peers[:27]:<28}{s.compute_s * 1e3:>11.2f}"
                         f"{s.memory_bytes / 1e6:>9.1f}{s.allreduce_s * 1e3:>13.2f}  {'yes' if s.recompute else 'no'}")
        for link in self.links:
            lines.append(f"link {link.src}->{link.dst}: {link.bytes / 1e6:.3f} MB at {link.bandwidth_bps / 1e6:.1f} Mbit/s, "
                         f"ratio {link.ratio:g}, {link.time_s * 1e3:.2f} ms")
        lines.append(f"spares: {len(self.spares)}; bottleneck {self.bottleneck_s * 1e3:.2f} ms per micro-batch; "
                     f"predicted step {self.predicted_step_s:.3f} s ({self.micro_batches} micro-batches)")
        lines.append(f"replicas sync every {self.sync_every} step{'s' if self.sync_every > 1 else ''}"
                     f"{' (compressed pseudo-gradients)' if self.sync_every > 1 else ' (gradients)'}; "
                     f"{self.predicted_samples_per_s:.1f} samples/s predicted, utilization {self.utilization:.2f}")
        return "\n".join(lines)


def round_trip(compute_s: list[float], replicas: list[int], link_s: list[float]) -> float:
    """Seconds one micro-batch takes through every stage and link, forward and back: each stage's and
    link's per-micro-batch time at full replication (``costs``) times the replicas that share it."""
    flows = [min(a, b) for a, b in zip(replicas, replicas[1:])]
    return sum(c * r for c, r in zip(compute_s, replicas)) + sum(t * f for t, f in zip(link_s, flows))


def evaluate(w: Workload, swarm: Swarm, stages: list[tuple[tuple[int, int], list[int]]], settings: PlanSettings,
             compress: bool = True) -> Plan:
    """The exact cost model (see ``costs``) of stages given as ((first seg, stop seg), peer indices);
    each stage's memory is priced at the micro-batches the runtime will keep in flight in this plan,
    its activations recomputed where ``settings.recompute`` says (``auto``: where they do not fit
    otherwise). A plan whose replicas' outer state (``sync_every`` > 1) does not fit, while summing
    gradients every step would, syncs every step."""
    caps = [min(swarm.peers[p].memory_bytes for p in peers) for _, peers in stages]
    flags = [settings.recompute == "on"] * len(stages)
    while True:
        plan = _priced(w, swarm, stages, settings, compress, flags)
        want = recompute_flags([s.memory_bytes for s in plan.stages], caps, flags, settings)
        if want == flags:
            break
        flags = want
    fits = all(s.memory_bytes <= cap for s, cap in zip(plan.stages, caps))
    if not fits and plan.sync_every > 1 and not settings.sync_every:
        return evaluate(w, swarm, stages, replace(settings, sync_every=1), compress)
    return plan if fits else replace(plan, predicted_step_s=math.inf, utilization=0.0, predicted_samples_per_s=0.0)


def _priced(w: Workload, swarm: Swarm, stages: list[tuple[tuple[int, int], list[int]]], settings: PlanSettings,
            compress: bool, recompute: list[bool]) -> Plan:
    """``evaluate`` with each stage's recomputation given (``recompute``), whether or not it fits."""
    times = [stage_times(w, swarm, segs, peers, settings, rc) for (segs, peers), rc in zip(stages, recompute)]
    compute, allreduce = [c for c, _ in times], [a for _, a in times]
    raw_links = []
    for s in range(len(stages) - 1):
        (_, cut_seg), peers = stages[s]
        nxt = stages[s + 1][1]
        raw_links.append((float(w.cut_bytes[cut_seg - 1]), swarm.min_bw(peers, nxt), min(len(peers), len(nxt))))
    best = [best_link_time(c, bw, f, settings) if compress else link_time(c, bw, f, 1.0, settings)
            for c, bw, f in raw_links]
    bottleneck = float(max(compute + best))
    ratios = [ratio_for(c, bw, f, bottleneck, settings) if compress else 1.0 for c, bw, f in raw_links]
    links = tuple(LinkPlan(s, s + 1, bw, c, r, link_time(c, bw, f, r, settings))
                  for s, ((c, bw, f), r) in enumerate(zip(raw_links, ratios)))
    r0 = len(stages[0][1])
    trip = round_trip(compute, [len(peers) for _, peers in stages], [link.time_s for link in links])
    # the bottleneck serves as many micro-batches at once as it has replicas (a link: parallel pairs)
    flows = [min(len(a), len(b)) for (_, a), (_, b) in zip(stages, stages[1:])]
    resources = list(zip(compute, [len(peers) for _, peers in stages])) + list(zip(best, flows))
    parallel = min(settings.micro_batches * r0, max(resources, key=lambda t: (t[0], -t[1]))[1])
    rest = ((settings.micro_batches * r0 - parallel) * bottleneck + trip) / r0
    h = choose_sync_every(max(allreduce), rest * r0, settings)   # (in seconds of a whole step)
    step = rest + sync_cost(max(allreduce), rest * r0, h, settings) / r0
    allreduce = [a / sync_ratio(h, settings) for a in allreduce]
    held = settings.held(len(stages), trip, bottleneck, r0)
    memory = [float(stage_memory(w, a, b, settings, held, rc, outer=len(peers) > 1 and h > 1))
              for ((a, b), peers), rc in zip(stages, recompute)]
    used = {p for _, peers in stages for p in peers}
    plan_stages = []
    for s, ((a, b), peers) in enumerate(stages):
        first, stop = w.op_range(a, b)
        plan_stages.append(StagePlan(s, first, stop, w.names[first:stop], tuple(sorted(swarm.peers[p].peer_id for p in peers)),
                                     compute[s], memory[s], allreduce[s], recompute[s]))
    pooled = sum(p.tflops for p in swarm.peers) * 1e12
    rate = settings.micro_batches / step     # micro-batches per second
    return Plan(w.model, tuple(plan_stages), links, tuple(p.peer_id for i, p in enumerate(swarm.peers) if i not in used),
                bottleneck, step, settings.micro_batches, h, float(rate * w.flops[-1] / pooled), float(rate * w.samples))
