"""The backup pool (FusionAI): snapshots of every stage that has a single holder, kept by other peers,
so a SIGKILLed sole holder costs at most ``K = training.backup_every_steps`` steps of its ops' learning.

Who keeps them (``backups``): ``training.backup_copies`` peers per single-holder stage, the plan's spares
first (in turn), then the peers of the nearest other stages. How (``SnapshotPusher``, on the holder):
every ``K // 2`` steps the holder captures its ops' state between two steps and pushes it to its
backups; before applying a step it checks that some backup has acknowledged a snapshot less than ``K``
steps older than the state the step produces, and waits for the push in flight if not (the rest of
the swarm may be one step ahead of the holder when it dies: ``K`` in all). So the bound holds whatever
the transfer time: a slow transfer slows the holder rather than weakening the bound.
A backup that fails is not waited for again until a push succeeds (a dead backup must not stall
training; the election replaces it).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from swarm.refusals import CallableLogger
from swarm.runtime.state import OpState
from swarm.scheduler import Plan

logger = logging.getLogger(__name__)


def backups(plan: Plan, copies: int = 1) -> dict[int, list[str]]:
    """Who keeps snapshots of each single-holder stage: ``copies`` peers, the spares in turn first, then
    the peers of the nearest other stages (the next one before the previous one)."""
    out, spares = {}, list(plan.spares)
    singles = [s for s in plan.stages if len(s.peers) == 1]
    for k, stage in enumerate(singles):
        turn = k % len(spares) if spares else 0
        others = sorted((s for s in plan.stages if s.index != stage.index), key=lambda s: (abs(s.index - stage.index), -s.index))
        pool = spares[turn:] + spares[:turn] + [p for s in others for p in sorted(s.peers)]
        picked = [p for p in dict.fromkeys(pool) if p != stage.peers[0]][:copies]
        if picked:
            out[stage.index] = picked
    return out


class SnapshotPusher:
    """A sole holder's side of the backup pool (see the module docstring); ``before_apply`` is the
    stage server's hook before every optimizer step (``TrainingSession(before_apply=...)``)."""

    def __init__(self, capture: Callable[[], Awaitable[dict[str, OpState]]],
                 send: Callable[[str, dict[str, OpState]], Awaitable[None]], peers: list[str], every: int,
                 log: Callable[[str], None] | None = None):
        self.capture, self.send, self.peers, self.every = capture, send, peers, every
        self.log = CallableLogger(log) if log is not None else logger
        self.acked = -1                  # newest step a backup acknowledged
        self.pushed: int | None = None   # step of the newest push started
        self.pushing: asyncio.Task | None = None
        self.answered: asyncio.Future | None = None   # the push in flight: one backup took it, or none could
        self.failing = False             # the last push reached no backup

    async def before_apply(self, step: int) -> None:
        """Before the stage applies ``step`` (its state then becomes ``step + 1``)."""
        need = step + 2 - self.every   # the oldest acknowledged snapshot the bound allows after this step
        while True:
            idle = self.pushing is None or self.pushing.done()
            due = self.pushed is None or step - self.pushed >= max(1, self.every // 2) or need > self.acked
            if idle and due and self.pushed != step:
                self.pushed = step
                states = await self.capture()   # between two steps: consistent
                self.answered = asyncio.get_running_loop().create_future()
                self.pushing = asyncio.ensure_future(self._push(step, states, self.answered))
            if need <= self.acked or self.failing or self.answered is None:
                return
            # the bound: wait for the snapshot in flight (or, if it was too old, for the next one)
            await asyncio.shield(self.answered if not self.answered.done() else self.pushing)

    async def _push(self, step: int, states: dict[str, OpState], answered: asyncio.Future) -> None:
        """Send ``states`` to every backup; ``answered`` once one of them has it (or all failed)."""
        errors = []
        for done in asyncio.as_completed([self.send(peer, states) for peer in self.peers]):
            try:
                await done
            except Exception as e:   # any failure of one backup: the others may still take it
                errors.append(f"{type(e).__name__}: {str(e)[:80]}")
                continue
            self.acked, self.failing = max(self.acked, step), False
            if not answered.done():
                answered.set_result(True)
        if len(errors) == len(self.peers):
            if not self.failing:
                self.log.warning(f"no backup took the snapshot of step {step} ({errors[0]}); "
                                 "its ops are unprotected until one does")
            self.failing = True
        if not answered.done():
            answered.set_result(False)

    def close(self) -> None:
        if self.pushing is not None:
            self.pushing.cancel()
        if self.answered is not None and not self.answered.done():
            self.answered.set_result(False)   # a step waiting at the gate goes on (its session is stopping)
