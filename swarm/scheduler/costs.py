"""The planning cost model: what a pipeline of replicated stages costs per training step.

Pure and deterministic (numpy arithmetic over the OP-DAG's costs and the peers' advertised numbers),
so that every node computes the same prediction from the same inputs. Per micro-batch of the traced
size, for stage ``s`` holding ops ``[a, b)`` on replicas ``R_s`` (each replica holds the whole stage
and takes an equal share of the micro-batches, so the slowest replica sets the pace)::

    compute_s  = F_s / (|R_s| * min_{p in R_s} tflops_p * 1e12) + (K_s * kernel_overhead + calls_s * rpc_s) / |R_s|
    memory_s   = (2 + optimizer states + outer) * P_s + buffers_s + wire_s + (A_s + L_s) * in_flight + G_s
                                                                             <= min memory of R_s
    recomputed: memory_s = ... + (I_s + L_s) * in_flight + A_s + G_s,  compute_s += the stage's forward again
    link_s     = min(raw, raw / ratio_max + codec)     raw = 2 C_s / (bw_s * min(|R_s|, |R_s+1|))
    codec      = 2 C_s / (codec_bytes_per_s * min(|R_s|, |R_s+1|))
    allreduce_s = 2 (|R_s| - 1) / |R_s| * P_s / bw_within(R_s)                   once per step (H = 1)
    allreduce_s = 2 (|R_s| - 1) / |R_s| * P_s / (bw_within(R_s) * outer_ratio)  once per H steps (H > 1)

``calls_s`` is 2 for a middle stage (the request in from the previous stage, the one out to the
next), 1 for the first and last; ``rpc_s = rpc_cpu_s / min(1, CPU cores of the slowest replica)`` is
what one call costs an end in CPU (a new stream, the frames, the p2p daemon): per stage boundary and
micro-batch, so a pipeline pays for every extra stage even where the link is fast. ``C_s`` is the
activation cut after stage ``s`` (the gradient coming back has the same size; AdaTopK
reuses the forward mask, so one ratio serves both), ``bw_s`` the slowest pair between the two replica
sets, ``bw_within`` the slowest pair inside one. Each of the ``|R_0|`` first-stage replicas drives
``M`` micro-batches per step; the first ``k`` micro-batches cross the whole pipeline (fill and drain)
in ``trip``, the others follow at the bottleneck's pace, ``k`` at a time: ``k`` is the number of
replicas of the bottleneck stage (of parallel pairs, for a link bottleneck), at most ``M |R_0|``.
The plan's figure of merit is the step time per ``M`` micro-batches (comparable between plans with
different ``|R_0|``)::

    bottleneck = max(max_s compute_s, max_s link_s)
    trip = sum_s |R_s| compute_s + sum_s min(|R_s|, |R_s+1|) link_s
    step = ((M |R_0| - k) * bottleneck + trip) / |R_0| + sync                    sync: ``sync_cost``

``H`` (``sync_every``) is how often replicas synchronise: 1 sums the gradients every step (synchronous
data parallelism); ``H > 1`` exchanges the compressed pseudo-gradient once every ``H`` steps (outer
steps, ``swarm.runtime.outer``, docs/sync.md). Unless fixed, a plan takes the smallest power of two up
to ``max_sync_every`` whose amortised wait for the exchange is at most ``sync_overhead`` of the rest
of the step (``choose_sync_every``): synchronise as often as the links allow, since rarer sync costs
accuracy. With ``overlap`` (the runtime's default) an exchange runs during the next ``H`` steps, so
only what they do not hide is paid.
A plan's ``utilization`` is the model FLOPs it computes per second over the TFLOP/s of all members
(spares included).

Each link then gets the *smallest* ratio that keeps it within the bottleneck (compress no harder
than needed: fewer dropped values, better accuracy), and none if raw transfer already fits.

``outer`` is 5 (the anchor, the parameters after the last sync, the outer momentum and two
error-feedback residuals: ``swarm.runtime.outer``) for a replicated stage that syncs every ``H > 1``
steps, else 0; ``wire_s = 2 (I_s + C_s)``: one frame each way at both boundaries (``I_s`` the cut
entering the stage, ``C_s`` the one leaving it) while it is encoded or decoded. ``L_s`` is what a
micro-batch leaves at the stage: ``C_s``, or at the last stage twice the model's output (the logits
and the loss's log-probabilities); ``G_s`` the gradients of one backward pass, priced as the most
activations one segment saves. With ``recompute`` a stage keeps only its boundaries (``I_s + L_s``)
per micro-batch in flight and recomputes one micro-batch's activations ``A_s`` during its backward
pass: ``on`` everywhere, ``auto`` where a stage would not fit otherwise, ``off`` nowhere
(``recompute_flags``).

``in_flight`` is what the runtime keeps (``in_flight``): all ``M`` under GPipe; under 1F1B as many as
one micro-batch's ``trip`` lasts in bottleneck intervals, plus one, at least one per stage and at most
``M``. Every formula above is written once, here, over numpy arrays: the exact model (``plan.evaluate``)
calls it on one stage, the search (``opfence``) on every segment range at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from swarm.errors import SwarmError
from swarm.scheduler.workload import Workload
from swarm.sync import OuterSettings

# Optimizer state in parameter-sized fp32 tensors: Adam keeps two moments, SGD (momentum) one.
OPTIMIZER_STATES = {"adam": 2, "sgd": 1}
SCHEDULES = ("gpipe", "1f1b")   # micro-batch orders the runtime runs (swarm.runtime.schedule)
RECOMPUTE = ("off", "auto", "on")   # activation recomputation: never, where a stage does not fit without, always
OUTER_STATES = 5   # parameter-sized fp32 vectors of a replica's outer state (anchor, base, momentum, 2 residuals)


@dataclass(frozen=True)
class PeerSpec:
    """What planning needs of a peer (from its member record, or a what-if YAML)."""

    peer_id: str
    tflops: float
    memory_bytes: int
    cpu_cores: float | None = None      # the CPU time its runtime may use (a quota); None: a core or more
    relayed: bool = False               # behind NAT with some link through a relay (reachability ``relayed``)


@dataclass(frozen=True)
class PlanSettings:
    micro_batches: int = 8              # M: micro-batches per optimizer step and first-stage replica
    in_flight: int | None = None        # micro-batches whose activations a stage holds at once (None: what
                                        # the runtime keeps under ``schedule``, see ``in_flight``)
    schedule: str = "1f1b"              # the runtime's micro-batch order: gpipe | 1f1b
    optimizer: str = "adam"
    kernel_overhead_s: float = 10e-6    # per launched kernel (dominates small ops on CPU)
    max_ratio: float = 16.0             # AdaTopK's hardest compression
    codec_bytes_per_s: float = 2e8      # AdaTopK encode+decode throughput, raw bytes/s (benchmarks.codec, 2-core CPU)
    wire_fraction: float = 1.0          # uncompressed bytes on the wire per activation byte (0.5: bfloat16 wire)
    rpc_cpu_s: float = 2.5e-3           # CPU seconds per pipeline call at each end (stream, frames, daemon; benchmarks.rpc)
    max_stages: int = 16                # search bound; also bounds pipeline fill time
    stages: int = 0                     # exactly this many stages (0: the scheduler chooses)
    max_replicas: int = 0               # peers per stage at most (0: no limit; the rest become spares)
    sync_every: int = 0                 # H: replicas synchronise every H steps (1: every step; 0: chosen per plan)
    max_sync_every: int = 64            # the rarest sync the planner chooses
    sync_overhead: float = 0.05         # chosen H: amortised exchange at most this share of the rest of a step
    outer_ratio: float = OuterSettings().ratio()   # the outer exchange's compression (the default codec:
                                                   # topk8 at 1/16, 12.8x)
    overlap: bool = OuterSettings.overlap          # H > 1: the exchange runs during the next H steps
    recompute: str = "auto"             # activation recomputation per stage: off | auto | on (``RECOMPUTE``)

    def __post_init__(self) -> None:
        if self.micro_batches < 1 or (self.in_flight or 1) < 1 or self.max_stages < 1 or self.max_ratio < 1:
            raise SwarmError("plan settings: micro_batches, in_flight, max_stages and max_ratio must be >= 1")
        if self.stages < 0:
            raise SwarmError("plan settings: stages must be >= 0 (0: chosen by the scheduler)")
        if self.optimizer not in OPTIMIZER_STATES:
            raise SwarmError(f"plan settings: unknown optimizer '{self.optimizer}'")
        if self.sync_every < 0 or self.max_sync_every < 1 or self.outer_ratio < 1 or self.sync_overhead <= 0:
            raise SwarmError("plan settings: sync_every must be >= 0 (0: chosen per plan), max_sync_every and "
                             "outer_ratio >= 1, sync_overhead > 0")
        if self.schedule not in SCHEDULES:
            raise SwarmError(f"plan settings: unknown schedule '{self.schedule}' (choose {' or '.join(SCHEDULES)})")
        if self.recompute not in RECOMPUTE:
            raise SwarmError(f"plan settings: unknown recompute '{self.recompute}' (choose {', '.join(RECOMPUTE)})")

    def held(self, stages: int, trip_s: float, bottleneck_s: float, first_replicas: int = 1) -> int:
        """Micro-batches a stage holds at once in a plan of this shape (``in_flight`` unless fixed)."""
        return self.in_flight or in_flight(self.schedule, self.micro_batches, stages, trip_s, bottleneck_s,
                                           first_replicas)

    @property
    def fewest_held(self) -> int:
        """The fewest any plan holds: one stage whose round trip is its own compute (the search's
        memory filter, which cannot know the plan's round trip; ``evaluate`` checks the real count)."""
        return self.held(1, 1.0, 1.0)


def in_flight(schedule: str, micro_batches: int, stages: int, trip_s: float, bottleneck_s: float,
              first_replicas: int = 1) -> int:
    """Micro-batches a first-stage replica keeps in flight, so the most a stage holds at once: all
    ``micro_batches`` under GPipe; under 1F1B (Little's law) as many as one micro-batch's round trip
    ``trip_s`` through every stage and link lasts in bottleneck intervals, plus one for the RPC latency
    the model does not price, so the slowest resource never waits for work; at least one per stage, at
    most all of them. The planner prices memory with it and the runtime drives with it."""
    if schedule == "gpipe":
        return micro_batches
    need = math.ceil(trip_s / (bottleneck_s * first_replicas) - 1e-9) + 1 if bottleneck_s > 0 else stages
    return max(stages, min(micro_batches, need))


@dataclass(frozen=True)
class Swarm:
    """Peers sorted by id and their bandwidth matrix (bits/s, symmetric, diagonal = inf)."""

    peers: tuple[PeerSpec, ...]
    bandwidth: np.ndarray = field(repr=False)

    @classmethod
    def build(cls, peers: list[PeerSpec], bandwidth) -> Swarm:
        """``bandwidth``: a callable ``(a, b) -> bits/s`` or a square array in ``peers`` order.
        Peers are sorted by id, so the input order never matters; each edge is the slower direction."""
        order = sorted(range(len(peers)), key=lambda i: peers[i].peer_id)
        ids = [peers[i].peer_id for i in order]
        if len(set(ids)) != len(ids):
            raise SwarmError("duplicate peer id in the planning input")
        if callable(bandwidth):
            m = np.array([[np.inf if a == b else float(bandwidth(a, b)) for b in ids] for a in ids], dtype=np.float64)
        else:
            m = np.asarray(bandwidth, dtype=np.float64)[np.ix_(order, order)].copy()
        m = np.minimum(m, m.T)
        np.fill_diagonal(m, np.inf)
        if (m <= 0).any() or np.isnan(m).any():
            raise SwarmError("bandwidths must be positive numbers")
        return cls(tuple(peers[i] for i in order), m)

    @property
    def ids(self) -> list[str]:
        return [p.peer_id for p in self.peers]

    def min_bw(self, a: list[int], b: list[int]) -> float:
        return float(self.bandwidth[np.ix_(a, b)].min())


def rpc_s(cores: list[float | None], settings: PlanSettings) -> float:
    """Seconds of a replica's time one pipeline call costs at one end: its CPU work at the CPU share
    of the slowest replica (a saturated node under a quota of ``c < 1`` cores pays ``1 / c`` of it)."""
    return settings.rpc_cpu_s / min([1.0] + [c for c in cores if c])


def group_tflops(tflops: list[float]) -> float:
    """What replicas achieve together: equal shares of micro-batches, so each waits for the slowest."""
    return len(tflops) * min(tflops)


def calls(w: Workload, a, b):
    """Pipeline calls per micro-batch of segments ``[a, b)``: the request in from the previous stage,
    the one out to the next (arrays broadcast)."""
    return (np.asarray(a) > 0).astype(np.float64) + (np.asarray(b) < w.n)


def stage_memory(w: Workload, a, b, settings: PlanSettings, held: int, recompute=False, outer=False):
    """Bytes one replica of segments ``[a, b)`` needs holding ``held`` micro-batches, its activations
    recomputed or not (``recompute``), with a replica's outer state or not (``outer``); arrays broadcast."""
    a, b = np.asarray(a), np.asarray(b)
    params = w.param_bytes[b] - w.param_bytes[a]
    states = 2 + OPTIMIZER_STATES[settings.optimizer] + OUTER_STATES * np.asarray(outer)
    cut_in, cut_out = w.cuts_before[a], w.cuts_before[b]
    left = np.where(b == w.n, 2 * w.output_bytes, cut_out)   # what a micro-batch leaves here
    acts = w.act_bytes[b] - w.act_bytes[a]
    kept = np.where(recompute, (cut_in + left) * held + acts, (acts + left) * held)
    return (states * params + w.buffer_bytes[b] - w.buffer_bytes[a] + 2 * (cut_in + cut_out) + kept
            + w.largest_act[a, b])


def recompute_flags(memory: list[float], caps: list[float], flags: list[bool], settings: PlanSettings) -> list[bool]:
    """Which stages recompute their activations, given each stage's ``memory`` as priced with ``flags``
    and the memory of its smallest replica (``caps``): all (``on``), none (``off``), or (``auto``) those
    already recomputing and those that do not fit without."""
    if settings.recompute != "auto":
        return [settings.recompute == "on"] * len(memory)
    return [f or m > cap for m, cap, f in zip(memory, caps, flags)]


def compute_time(w: Workload, a, b, tflops: float, replicas: int, rpc: float, settings: PlanSettings,
                 recompute=False):
    """``compute_s`` of segments ``[a, b)`` on replicas achieving ``tflops`` together, with ``rpc``
    seconds per pipeline call, the forward pass run twice where ``recompute`` (arrays broadcast)."""
    again = np.asarray(recompute, dtype=np.float64)
    flops = w.flops[b] - w.flops[a] + again * (w.fwd_flops[b] - w.fwd_flops[a])
    kernels = w.kernels[b] - w.kernels[a] + again * (w.fwd_kernels[b] - w.fwd_kernels[a])
    return flops / (tflops * 1e12) + kernels * settings.kernel_overhead_s / replicas + calls(w, a, b) * rpc / replicas


def allreduce_time(param_bytes, replicas: int, inner_bw: float, ratio: float = 1.0):
    """Seconds of one ring all-reduce of ``param_bytes`` among ``replicas`` over ``inner_bw`` bits/s,
    compressed ``ratio`` times."""
    return 2 * (replicas - 1) / replicas * param_bytes * 8 / (inner_bw * ratio) if replicas > 1 else 0.0 * param_bytes


def sync_options(settings: PlanSettings) -> list[int]:
    """The sync periods a plan may take: the fixed one, or powers of two up to ``max_sync_every``."""
    if settings.sync_every:
        return [settings.sync_every]
    return [1 << k for k in range(settings.max_sync_every.bit_length()) if 1 << k <= settings.max_sync_every]


def sync_ratio(h: int, settings: PlanSettings) -> float:
    """Compression of a sync every ``h`` steps: gradients go raw (H = 1), pseudo-gradients compressed."""
    return 1.0 if h == 1 else settings.outer_ratio


def sync_cost(raw_allreduce_s: float, rest_s: float, h: int, settings: PlanSettings) -> float:
    """Seconds a step waits for its replicas' sync, amortised: every step (H = 1), or every H steps,
    compressed, and (``overlap``) only for what the next H steps of ``rest_s`` do not hide."""
    exchange = raw_allreduce_s / sync_ratio(h, settings)
    if h > 1 and settings.overlap:
        exchange = max(0.0, exchange - h * rest_s)
    return exchange / h


def choose_sync_every(raw_allreduce_s: float, rest_s: float, settings: PlanSettings) -> int:
    """H for a plan whose uncompressed all-reduce takes ``raw_allreduce_s`` and whose step takes
    ``rest_s`` without it: the smallest option whose sync cost stays within ``sync_overhead * rest_s``
    (else the cheapest)."""
    options = sync_options(settings)
    for h in options:
        if sync_cost(raw_allreduce_s, rest_s, h, settings) <= settings.sync_overhead * rest_s:
            return h
    return min(options, key=lambda h: (sync_cost(raw_allreduce_s, rest_s, h, settings), h))


def amortised_sync_factor(settings: PlanSettings) -> float:
    """What the search divides an uncompressed all-reduce by: the cheapest sync the plan may take."""
    return max(sync_ratio(h, settings) * h for h in sync_options(settings))


def stage_times(w: Workload, swarm: Swarm, segs: tuple[int, int], replicas: list[int],
                settings: PlanSettings, recompute: bool = False) -> tuple[float, float]:
    """(``compute_s``, ``allreduce_s``) of one stage: segments ``segs`` on peers ``replicas``."""
    (a, b), r = segs, len(replicas)
    compute = compute_time(w, a, b, group_tflops([swarm.peers[p].tflops for p in replicas]), r,
                           rpc_s([swarm.peers[p].cpu_cores for p in replicas], settings), settings, recompute)
    inner = swarm.min_bw(replicas, replicas) if r > 1 else 1.0
    return float(compute), float(allreduce_time(w.param_bytes[b] - w.param_bytes[a], r, inner))


def wire_fraction(half: bool) -> float:
    """``PlanSettings.wire_fraction`` of links that send uncompressed float32 as bfloat16 (``half``) or not."""
    return 0.5 if half else 1.0


def link_time(cut_bytes, bw_bps: float, flows: int, ratio: float, settings: PlanSettings):
    """Seconds per micro-batch for activation + gradient over ``flows`` parallel pairs at ``ratio``
    (``cut_bytes`` may be an array)."""
    raw = 2 * cut_bytes * 8 / (bw_bps * flows)
    if ratio <= 1.0:
        return raw * settings.wire_fraction   # uncompressed: as they are, or rounded to bfloat16
    return raw / ratio + 2 * cut_bytes / (settings.codec_bytes_per_s * flows)


def best_link_time(cut_bytes, bw_bps: float, flows: int, settings: PlanSettings):
    """The faster of raw transfer and the hardest compression (``cut_bytes`` may be an array)."""
    return np.minimum(link_time(cut_bytes, bw_bps, flows, 1.0, settings),
                      link_time(cut_bytes, bw_bps, flows, settings.max_ratio, settings))


def ratio_for(cut_bytes: float, bw_bps: float, flows: int, target_s: float, settings: PlanSettings) -> float:
    """The smallest compression ratio that keeps the link within ``target_s`` (1 = off)."""
    if link_time(cut_bytes, bw_bps, flows, 1.0, settings) <= target_s * (1 + 1e-9):
        return 1.0
    raw = 2 * cut_bytes * 8 / (bw_bps * flows)   # a ratio counts from the computed bytes
    codec = 2 * cut_bytes / (settings.codec_bytes_per_s * flows)
    if link_time(cut_bytes, bw_bps, flows, settings.max_ratio, settings) >= link_time(cut_bytes, bw_bps, flows, 1.0, settings):
        return 1.0   # compression does not pay on this link: uncompressed is the fastest it gets
    if target_s <= codec:
        return settings.max_ratio
    return float(min(settings.max_ratio, max(1.0, np.ceil(raw / (target_s - codec) * 100) / 100)))
