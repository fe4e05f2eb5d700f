"""Where a stage's passes run and what it counts: one compute thread per stage (``PriorityRunner``),
the stage's counters (``Counters``, read into the metrics rows) and the timeline of its step
(``Timeline``: pipeline fill and drain)."""
from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from dataclasses import dataclass, field


class PriorityRunner:
    """One compute thread: passes run one at a time, lower priority value first, then in arrival order
    (1F1B: backward before forward; GPipe: arrival order)."""

    def __init__(self, name: str = "stage", backward_first: bool = True):
        self.backward_first = backward_first
        self.queue: list = []
        self.seq = itertools.count()
        self.ready = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._loop, daemon=True, name=name)
        self.thread.start()

    async def run(self, priority: int, fn, *args):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self.ready:
            heapq.heappush(self.queue, (priority, next(self.seq), fn, args, loop, future))
            self.ready.notify()
        return await future

    async def work(self, backward: bool, fn, *args):
        """``fn(*args)`` on the compute thread: a backward pass (or the step's work) first under 1F1B."""
        return await self.run(0 if backward and self.backward_first else 1, fn, *args)

    def _loop(self) -> None:
        while True:
            with self.ready:
                while not self.queue and not self.closed:
                    self.ready.wait()
                if self.closed:
                    return
                _, _, fn, args, loop, future = heapq.heappop(self.queue)
            try:
                outcome = (fn(*args), None)
            except BaseException as e:  # handed to the awaiting coroutine
                outcome = (None, e)
            loop.call_soon_threadsafe(_settle, future, *outcome)
            del fn, args, loop, future, outcome   # hold nothing of this pass (its tensors, its error) until the next

    def close(self) -> None:
        """Run no further pass (the one running finishes: ``thread.join`` waits for it)."""
        with self.ready:
            self.closed = True
            self.ready.notify()


def _settle(future: asyncio.Future, result, error) -> None:
    if not future.done():
        future.set_exception(error) if error is not None else future.set_result(result)


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
