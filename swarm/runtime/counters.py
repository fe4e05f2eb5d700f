"""What a stage counts: ``Counters`` (read into the metrics rows), ``Timeline`` (pipeline fill and
drain) and ``Warnings`` (each at most once a minute). Bookkeeping only: no step logic."""
from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Counters:
    bytes_sent: int = 0         # every frame this stage sent (requests and replies)
    act_raw: int = 0            # activations sent and their gradients received, uncompressed ...
    act_wire: int = 0           # ... and as they crossed the wire (AdaTopK's achieved ratio: raw / wire)
    errors: int = 0
    retries: int = 0
    refused: int = 0            # requests and replies refused as hostile or broken (RemoteProtocolError), of which ...
    poisoned: int = 0           # ... carried NaN or Inf (their senders banned)
    skipped_steps: int = 0      # optimizer steps not applied: the update was not finite
    syncs: int = 0              # outer steps taken with the other replicas (sync_every > 1)
    compute_s: float = 0.0      # forward + backward seconds, over ...
    micro_batches: int = 0      # ... this many micro-batches
    compute_cpu_s: float = 0.0  # CPU seconds of the compute thread in those passes
    fill_s: float = 0.0         # per step: from the previous optimizer step to the first pass ...
    drain_s: float = 0.0        # ... and from the last pass to this step's optimizer step (summed), of which
    reduce_s: float = 0.0       # ... summing gradients with the replicas and applying them
    ratios: dict[str, float] = field(default_factory=dict)   # last ratio used, by next-stage peer
    delivered: dict[str, float] = field(default_factory=dict)   # TFLOP/s each next-stage peer delivered (smoothed)
    sent_to: dict[str, int] = field(default_factory=dict)    # bytes_sent by receiving peer ...
    reduce_to: dict[str, int] = field(default_factory=dict)  # ... and the all-reduce's share of them

    def sent(self, peer: str, n: int, reduce: bool = False) -> None:
        self.bytes_sent += n
        self.sent_to[peer] = self.sent_to.get(peer, 0) + n
        if reduce:
            self.reduce_to[peer] = self.reduce_to.get(peer, 0) + n


class Timeline:
    """This step's passes: when the step began, its first pass started and its last pass ended
    (``Counters.fill_s`` / ``drain_s``)."""

    def __init__(self) -> None:
        self.step_began = time.perf_counter()
        self.first_pass: float | None = None
        self.last_pass = 0.0

    def passed(self, started: float, ended: float) -> None:
        self.last_pass = ended
        if self.first_pass is None:
            self.first_pass = started

    def stepped(self, counters: Counters) -> None:
        now = time.perf_counter()
        if self.first_pass is not None:
            counters.fill_s += self.first_pass - self.step_began
            counters.drain_s += now - self.last_pass
        self.step_began, self.first_pass = now, None


class Warnings:
    """A stage's own warnings to ``log`` (a logger), each ``key`` at most once per ``interval_s``."""

    def __init__(self, log, interval_s: float = 60.0):
        self.log = log
        self.interval_s = interval_s
        self.said: dict[str, float] = {}

    def once(self, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self.said.get(key, -self.interval_s) >= self.interval_s:
            self.said[key] = now
            self.log.warning(message)
