"""The first stage's training loop (``Drive``), and one optimizer step as it drives it (``train_step``),
top to bottom (the order of a step in one place):

1. cut the batch into ``micro_batches`` micro-batches;
2. run each through the pipeline, at most ``in_flight`` at once (``StageServer.micro_batch``: this
   stage's forward, the rest of the pipeline, this stage's backward), again after a transient
   failure until ``deadline_s``;
3. close the step here (``StageServer.close_step``: all-reduce with the replicas, optimizer step,
   ``step`` passed downstream);
4. with ``settle``, wait until every stage has stepped.

The driver calls its own stage directly: no frame is built for itself.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from swarm.errors import ConfigError, SwarmError
from swarm.messages import Forward
from swarm.net.streams import with_backoff
from swarm.pipeline.service import LOCAL_REPLY, StageServer


async def train_step(first: StageServer, inputs: torch.Tensor, targets: torch.Tensor, micro_batches: int,
                     in_flight: int = 4, rank: int = 0, world: int = 1, deadline_s: float = 300.0,
                     done: dict[int, float] | None = None, settle: bool = True) -> float:
    """One optimizer step driven by a first-stage replica: its ``micro_batches`` go down the pipeline
    concurrently (at most ``in_flight``), their gradients come back, then every stage steps. Losses
    are scaled by ``1 / (micro_batches * world)``: the replicas' summed gradients are the global mean.
    ``done`` (micro-batch id -> loss) carries what already went through over calls for the same step,
    so a retried step never sends a finished micro-batch twice. With ``settle`` it returns once every
    stage has stepped, else once this stage has (the next step may follow the step message down the
    pipeline). Returns the mean loss of this replica's micro-batches."""
    step = first.worker.step_id
    done = {} if done is None else done
    gate = asyncio.Semaphore(in_flight)
    deadline = time.monotonic() + deadline_s
    scale = 1 / (micro_batches * world)

    async def one(m: int, x: torch.Tensor, y: torch.Tensor) -> float:
        mb = rank * micro_batches + m
        if mb in done:
            return done[mb]

        async def attempt() -> float:
            async with gate:
                await first.reach(step)   # (a re-plan may have moved the stage on)
                first.protocol.take_forward()
                grads = await first.own(first.micro_batch(Forward(step, mb, scale, [x], y)))
                first.protocol.remember(step, mb, LOCAL_REPLY)
                return float(grads.loss)
        done[mb] = await with_backoff(attempt, deadline)
        return done[mb]

    chunks = zip(inputs.chunk(micro_batches), targets.chunk(micro_batches))
    losses = await asyncio.gather(*(one(m, x, y) for m, (x, y) in enumerate(chunks)))
    await first.own(first.close_step(step))
    if settle:
        await first.settle()
    return sum(losses) / len(losses)


@dataclass
class Drive:
    """The first stage's loop: one optimizer step per iteration on this replica's shard (``batch(step)``
    gives its inputs and targets), ``record(step, seconds, loss)`` after each, until ``finished()``
    or the stage drains. A step that fails because of a peer (gone, busy, refusing) is tried again
    until a new plan replaces this one; a configuration error or a non-finite loss ends training
    (``failed`` says why, as long as the newest step has not succeeded)."""

    first: StageServer
    batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    micro_batches: int
    in_flight: int
    shard: tuple[int, int]          # (rank, world) among the first stage's replicas
    deadline_s: float               # per step attempt
    finished: Callable[[], bool]
    record: Callable[[int, float, float], None]
    log: logging.Logger | object = field(default_factory=lambda: logging.getLogger(__name__))
    failed: str | None = None

    async def run(self) -> None:
        first, (rank, world) = self.first, self.shard
        failures, done, started = 0, {}, time.perf_counter()
        while not self.finished() and not first.draining:
            step = first.worker.step_id
            x, y = self.batch(step)
            try:
                loss = await train_step(first, x, y, self.micro_batches, self.in_flight, rank, world,
                                        deadline_s=self.deadline_s, done=done, settle=False)
            except ConfigError as e:
                self.failed = str(e)
                self.log.error(f"training stopped: {e}")
                return
            except SwarmError as e:   # a peer died, fell behind or refused: retry until a new plan replaces us
                self.failed, failures = str(e), failures + 1
                if failures == 1:
                    self.log.warning(f"step {step} failed ({e}); retrying until the swarm re-plans")
                await asyncio.sleep(min(1.0 * failures, 5.0))   # back-off between attempts
                continue
            if not math.isfinite(loss):
                self.failed = f"loss became {loss} at step {step}"
                self.log.error(f"training stopped: {self.failed}")
                return
            failures, self.failed, done = 0, None, {}
            self.record(step, time.perf_counter() - started, loss)
            started = time.perf_counter()
        if self.finished():
            try:
                await first.settle()   # the last step reached every stage
            except SwarmError as e:
                self.log.warning(f"the last step did not reach every stage ({e})")
            self.log.info(f"training finished at step {first.worker.step_id} (max_steps)")
