"""The first stage's training loop (``Drive``), and one optimizer step as it drives it (``train_step``),
top to bottom (the order of a step in one place):

1. cut the batch into ``micro_batches`` micro-batches;
2. run each through the pipeline, at most ``in_flight`` at once (``StageServer.micro_batch``: this
   stage's forward, the rest of the pipeline, this stage's backward), again after a transient
   failure until ``deadline_s``;
3. close the step here (``StageServer.close_step``: all-reduce with the replicas, optimizer step,
   ``step`` passed downstream);
4. with ``settle``, wait until every stage has stepped.

The driver calls its own stage directly: no frame is built for itself. Between steps it may measure
the model on validation data (``evaluate``): forward only, through the live pipeline.
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
from swarm.messages import Evaluate, Forward
from swarm.net.streams import with_backoff
from swarm.pipeline.calls import LOCAL_REPLY
from swarm.pipeline.service import StageServer


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
    scale, loss_scale = 1 / (micro_batches * world), first.worker.step_scale.stamp()

    async def one(m: int, x: torch.Tensor, y: torch.Tensor) -> float:
        mb = rank * micro_batches + m
        if mb in done:
            return done[mb]

        async def attempt() -> float:
            async with gate:
                await first.reach(step)   # (a re-plan may have moved the stage on)
                first.protocol.take_forward()
                grads = await first.own(first.micro_batch(Forward(step, mb, scale, [x], y, loss_scale=loss_scale)))
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


@dataclass(frozen=True)
class Validation:
    """What one evaluation measured on this replica's share of the validation samples."""

    loss: float                  # mean over samples
    samples: int
    accuracy: float | None       # classifiers: top-1
    seconds: float


async def evaluate(first: StageServer, batches: list[tuple[torch.Tensor, torch.Tensor]], in_flight: int = 4,
                   deadline_s: float = 300.0) -> Validation:
    """Run ``batches`` (inputs, targets) forward through the pipeline at the current step (each again
    after a transient failure until ``deadline_s``): no gradient, no optimizer state, no step."""
    step, started = first.worker.step_id, time.perf_counter()
    gate, deadline = asyncio.Semaphore(in_flight), time.monotonic() + deadline_s

    async def one(i: int, x: torch.Tensor, y: torch.Tensor):
        async def attempt():
            async with gate:
                await first.reach(step)
                return await first.own(first.evaluate(Evaluate(step, i, 1.0, [x], y)))
        return await with_backoff(attempt, deadline)

    results = await asyncio.gather(*(one(i, x, y) for i, (x, y) in enumerate(batches)))
    samples = sum(r.count for r in results)
    loss = sum(r.loss * r.count for r in results) / max(samples, 1)
    hits = [r.correct for r in results]
    accuracy = sum(hits) / max(samples, 1) if hits and all(h is not None for h in hits) else None
    return Validation(loss, samples, accuracy, time.perf_counter() - started)


@dataclass
class Drive:
    """The first stage's loop: one optimizer step per iteration on this replica's shard (``batch(step)``
    gives its inputs and targets), ``record(step, seconds, loss)`` after each, until ``finished()``
    or the stage drains; with ``validation`` (this replica's validation batches), after step 0, every
    ``eval_every`` steps and after the last one it measures the model (``evaluate``) and hands the
    ``Validation`` to ``record``. A step that fails because of a peer (gone, busy, refusing) is tried again
    until a new plan replaces this one; a configuration error or a non-finite loss ends training
    (``failed`` says why, as long as the newest step has not succeeded)."""

    first: StageServer
    batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    micro_batches: int
    in_flight: int
    shard: tuple[int, int]          # (rank, world) among the first stage's replicas
    deadline_s: float               # per step attempt
    finished: Callable[[], bool]
    record: Callable[[int, float, float, Validation | None], None]
    log: logging.Logger | object = field(default_factory=lambda: logging.getLogger(__name__))
    failed: str | None = None
    validation: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    eval_every: int = 0
    last_step: int | None = None     # max_steps - 1: evaluated too
    validated: Validation | None = None   # the newest evaluation
    task: asyncio.Task | None = None      # ``run`` as it runs (its owner cancels it)

    def due(self, step: int) -> bool:
        """Is the model measured after ``step``?"""
        if not self.validation or not self.eval_every:
            return False
        return step == 0 or (step + 1) % self.eval_every == 0 or step == self.last_step

    async def validate(self, step: int) -> Validation | None:
        """The evaluation after ``step`` (once every stage has applied it); None if it failed (said once)."""
        try:
            await self.first.settle()
            self.validated = await evaluate(self.first, self.validation, self.in_flight, self.deadline_s)
            return self.validated
        except SwarmError as e:   # measuring is not training: the next evaluation tries again
            self.log.warning(f"validation after step {step} failed ({e})")
            return None

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
            seconds = time.perf_counter() - started
            self.record(step, seconds, loss, await self.validate(step) if self.due(step) else None)
            started = time.perf_counter()
        if self.finished():
            try:
                await first.settle()   # the last step reached every stage
            except SwarmError as e:
                self.log.warning(f"the last step did not reach every stage ({e})")
            self.log.info(f"training finished at step {first.worker.step_id} (max_steps)")
