"""The node's side of plan adoption: runs ``PlanAdoption``'s commands (stop and start sessions, fetch
state over ``StateService``), backs up single-holder stages (``swarm.churn.backup``) and says what the
node holds (``HoldingAdvert``). The rules are in ``swarm.churn.adoption``; the protocol in
``swarm.churn.state_service``; docs/churn.md has the whole story.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from swarm.churn.adoption import (
    ADOPT_WAIT_TTLS,
    Adopted,
    Fetch,
    PlanAdoption,
    StartSession,
    StopSession,
    Wait,
    Warn,
    donor_order,
    syncs_rarely,
)
from swarm.churn.backup import SnapshotPusher, backups
from swarm.churn.state_service import (
    BUSY_WAIT_S,
    CONCURRENCY,
    FETCHES,
    FETCHES_PER_PEER,
    REQUESTS,
    REQUESTS_PER_PEER,
    STATE_PROTOCOL,
    StateService,
    state_limits,
)
from swarm.config import NodeConfig
from swarm.errors import SwarmError
from swarm.events import TRAINING, Events
from swarm.loop import NodeLoop
from swarm.net.records import MAX_DISTRUSTS, MAX_HOLDS, MAX_LINKS, MemberState
from swarm.refusals import CallableLogger, lines_to
from swarm.runtime.state import OpState, read_checkpoint
from swarm.scheduler import Plan

logger = logging.getLogger(__name__)

OBSERVED_KEEP_S = 1800.0   # how long what a peer delivered is remembered

__all__ = ["ADOPT_WAIT_TTLS", "BUSY_WAIT_S", "CONCURRENCY", "FETCHES", "FETCHES_PER_PEER", "OBSERVED_KEEP_S",
           "REQUESTS", "REQUESTS_PER_PEER", "STATE_PROTOCOL", "CodecAdvert", "HoldingAdvert", "PlanFollower",
           "donor_order", "holds_ranges", "state_limits"]


@dataclass(frozen=True)
class HoldingAdvert:
    """What the plan follower puts in the member record: the plan it is ready in, its step, the op
    states it can hand over, what it saw next-stage peers deliver, and whom it banned for poison."""

    ready: str | None
    step: int
    holds: list[list[int]] | None
    observed_tflops: dict[str, float] | None
    distrusts: list[str] | None
    val_loss: float | None = None
    memory_peak_bytes: int | None = None


@dataclass(frozen=True)
class CodecAdvert:
    """The running stage's own measurement of its codec (raw bytes/s)."""

    codec_bps: float


def holds_ranges(index: dict[str, int], steps: dict[str, int]) -> list[list[int]]:
    """Compact ``[first op, stop op, step]`` ranges of the ops in ``steps`` (at most ``MAX_HOLDS``:
    the newest ranges are kept)."""
    out: list[list[int]] = []
    for i, op in sorted((index[op], op) for op in steps):
        if out and out[-1][1] == i and out[-1][2] == steps[op]:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1, steps[op]])
    return sorted(out, key=lambda h: -h[2])[:MAX_HOLDS]


# read on the state service (what the tests and the node's status look at)
class PlanFollower:
    """Everything between the committed plan and this node's running stage. ``follow`` once per
    heartbeat; ``loop``: the node's ``NodeLoop`` (or a running asyncio loop)."""

    def __init__(self, me: str, traced, cfg: NodeConfig, p2p, loop: NodeLoop | asyncio.AbstractEventLoop,
                 bandwidth: Callable[[str], float | None], admit: Callable[[str], bool] | None,
                 log: Callable[[str], None] | None = None, device: str = "cpu"):
        self.traced, self.cfg, self.p2p, self.loop = traced, cfg, p2p, NodeLoop.wrap(loop)
        self.log = CallableLogger(log) if log is not None else logger
        self.session_args = {"bandwidth": bandwidth, "admit": admit, "device": device,
                             "log": log if log is not None else lines_to(logging.getLogger("swarm.runtime.session"))}
        self.events = Events(cfg.training.metrics_path, me)   # a ``training`` row per session started
        self.service = StateService(traced.gm, traced.dag, p2p, self, admit, log=log, events=self.events)
        self.adoption = PlanAdoption(me, traced.dag.index, set(self.service.owned), ADOPT_WAIT_TTLS * cfg.network.ttl_s)
        self.store: dict[str, OpState] = {}
        self.observed: dict[str, tuple[float, float]] = {}   # next-stage peer -> (TFLOP/s it delivered, when seen)
        self.stopped = None   # the last session stopped (what ``persist`` writes; a stage without state has no other record of its step)
        self.session = None
        self.pusher: SnapshotPusher | None = None
        self.fetching = None   # the future of the Fetch in flight
        if cfg.training.checkpoint_dir:
            checkpoint_log = log if log is not None else lines_to(logger)
            self.store.update(read_checkpoint(cfg.training.checkpoint_dir, sorted(self.service.owned), log=checkpoint_log))
            if self.store:
                self.log.info(f"checkpoint: state of {len(self.store)} ops at step {self.step} from {cfg.training.checkpoint_dir}")
        self.loop.call_sync(self.p2p.add_binary_stream_handler(STATE_PROTOCOL, lambda *a: self._serve(*a)))

    # --- the adoption's state, read where it lives ---------------------------------------------------

    async def _serve(self, stream_info, reader, writer) -> None:
        await self.service.serve(stream_info, reader, writer)

    me = property(lambda self: self.adoption.me)

    @property
    def step(self) -> int:
        live = self.session.step if self.session is not None else 0
        stopped = self.stopped.step if self.stopped is not None else 0
        return max([live, stopped, *(s.step for s in self.store.values())])

    # --- the StateHost of the state service -------------------------------------------------------

    def serves_to(self) -> set[str] | None:
        return self.adoption.members() if self.cfg.training.serve_state == "plan" else None

    def backed_up(self, peer: str) -> dict[str, int]:
        return self._backed_up(peer)

    def _backed_up(self, peer: str) -> dict[str, int]:
        """The ops (-> stage) of the single-holder stages ``peer`` holds and this node backs up, in the
        plan it runs or the one it is adopting."""
        out = {}
        for plan in (self.adoption.plan, self.adoption.pending):
            copies = self.cfg.training.backup_copies
            for stage, keepers in (backups(plan, copies).items() if plan is not None else ()):
                if self.me in keepers and plan.stages[stage].peers == (peer,):
                    out.update({op: stage for op in plan.stages[stage].ops if op in self.service.owned})
        return out

    async def state_of(self, op: str) -> OpState | None:
        session = self.session
        if session is not None and op in session.ops:
            return (await session.capture([op]))[op]
        return self.store.get(op)

    # --- following plans --------------------------------------------------------------------------

    def follow(self, plan: Plan | None, view) -> HoldingAdvert:
        """One heartbeat: adopt a newly committed plan step by step; back up single-holder stages.
        Returns what the record advertises."""
        self._run(self.adoption.committed(plan, time.monotonic()))
        if self.fetching is not None and self.fetching.done():
            future, self.fetching = self.fetching, None
            self._run(self.adoption.fetched(future.result() if future.exception() is None else {}))
        self._run(self.adoption.observe(view.members, self.step, self.store, time.monotonic()))
        self._take_snapshots()
        return self.advert()

    def _run(self, commands: list) -> None:
        for c in commands:
            if isinstance(c, StopSession):
                self.fetching = None   # a fetch for the plan given up: its result is not waited for
                self._stop_session()
            elif isinstance(c, Warn):
                self.log.warning(c.message)
            elif isinstance(c, Fetch):
                self.fetching = self.loop.submit(self.service.fetch(c.donors))
            elif isinstance(c, StartSession):
                self._start(c.plan, c.stage, c.states)
            elif not isinstance(c, (Wait, Adopted)):
                raise TypeError(f"unknown adoption command {c!r}")

    def advert(self) -> HoldingAdvert:
        """What this node holds and saw (see ``HoldingAdvert``): the compute each next-stage peer
        delivered is kept ``OBSERVED_KEEP_S`` across plans, so a liar moved off the pipeline stays
        down-rated; the peers it banned for NaN/Inf are a dispute (``swarm.planning.disputed``)."""
        steps = {op: s.step for op, s in self.store.items()}
        if self.session is not None:
            steps.update({op: self.session.step for op in self.session.ops})
        now = time.monotonic()
        if self.session is not None:
            for peer, rate in self.session.server.counters.delivered.items():
                self.observed[peer] = (rate, now)
        self.observed = {p: (r, t) for p, (r, t) in self.observed.items() if now - t < OBSERVED_KEEP_S}
        newest = sorted(self.observed, key=lambda p: self.observed[p][1])[-MAX_LINKS:]
        return HoldingAdvert(ready=self.adoption.ready, step=self.step,
                             holds=holds_ranges(self.traced.dag.index, steps) or None,
                             observed_tflops={p: self.observed[p][0] for p in newest} or None,
                             distrusts=sorted(self.service.bans.active())[:MAX_DISTRUSTS] or None,
                             val_loss=self.session.val_loss if self.session is not None else None,
                             memory_peak_bytes=self.session.gauge.peak() if self.session is not None else None)

    def codec(self) -> CodecAdvert | None:
        """The running stage's codec throughput, once it has measured it (else None: keep the start's)."""
        policy = self.session.policy if self.session is not None else None
        return CodecAdvert(policy.codec_bytes_per_s) if policy is not None and policy.codec_s_per_byte else None

    def _start(self, plan: Plan, stage: int, states: dict[str, OpState]) -> None:
        from swarm.runtime.session import TrainingSession

        start_step, local, donors = self.adoption.start_step, len(self.adoption.local), self.adoption.donors
        missing = [op for op in plan.stages[stage].ops if op in self.service.owned and op not in states]
        if missing and self.step:
            self.log.warning(f"no state of {len(missing)} ops anywhere ({', '.join(missing[:3])}...): initial weights")
        keepers = backups(plan, self.cfg.training.backup_copies).get(stage)
        holder: dict = {}
        pusher = None
        if keepers and self.cfg.training.backup_every_steps:
            pusher = SnapshotPusher(lambda: holder["session"].capture(holder["session"].ops), self.service.send_snapshot,
                                    keepers, self.cfg.training.backup_every_steps,
                                    self.log.log if isinstance(self.log, CallableLogger) else None)
        try:
            session = TrainingSession(plan, self.me, self.traced, self.cfg, self.p2p, self.loop, start_step=start_step,
                                      states=states, own=set(self.adoption.local), bans=self.service.bans,
                                      before_apply=pusher.before_apply if pusher is not None else None, **self.session_args)
            holder["session"] = session
            self.session, self.pusher = session, pusher
            session.start()
        except SwarmError as e:
            self.session, self.pusher = None, None
            self.log.error(f"cannot run stage {stage} of plan {plan.hash}: {e}")
            return
        for op in session.ops:
            self.store.pop(op, None)   # live now: served from the session
        if session.completed:
            self.log.info(f"completed step {start_step - 1} on {len(session.completed)} ops with the gradient "
                          "the previous plan left (the rest of the swarm had applied it)")
        behind = {op: start_step - s.step for op, s in states.items()   # (a replica syncing rarely resumes its own)
                  if s.step < start_step and op in session.ops and op not in session.completed and not syncs_rarely(s)}
        if behind:
            self.log.info(f"restored {len(behind)} ops from older state: up to {max(behind.values())} steps of them lost")
        self.adoption.started(plan)
        self.events.emit(TRAINING, stage=stage, stages=len(plan.stages), step=start_step, ops=len(states),
                         fetched=len(states) - local, donors=list(donors), initial=len(missing) if self.step else 0,
                         lost_steps=max(behind.values(), default=0), **session.outer_digests())
        self.log.info(f"training: stage {stage} of {len(plan.stages)} from step {start_step} "
                      f"({len(states)} ops of state, {len(states) - local} fetched"
                      + (f" from {', '.join(p[-8:] for p in donors)})" if donors else ")")
                      + (f"; snapshots to {', '.join(p[-8:] for p in keepers)}" if pusher else ""))

    def _take_snapshots(self) -> None:
        """Move the snapshots received as a backup into the store (newest per op)."""
        got: dict[tuple[str, int], int] = {}
        received = self.service.received
        while received:
            peer, op, state = received.popleft()
            if op not in self.store or self.store[op].step < state.step:
                self.store[op] = state
                got[peer, state.step] = got.get((peer, state.step), 0) + 1
        for (peer, step), n in sorted(got.items(), key=lambda kv: kv[0][1]):
            self.log.info(f"backup: snapshot of {n} ops at step {step} from {peer[-8:]}")

    def _stop_session(self) -> None:
        if self.pusher is not None:
            self.loop.call_soon(self.pusher.close)
            self.pusher = None
        if self.session is not None:
            session, self.session = self.session, None
            session.stop()
            self.store.update(session.final_state(pending=True))
            self.stopped = session

    def persist(self) -> None:
        """Leaving or finished: the stage this node trained last, written where the config says
        (``training.save_dir``: its parameters; ``training.checkpoint_dir``: its ops' state, the
        gradient of a step in progress included). A write that fails is a warning: the state is still
        served to whoever takes it over."""
        from swarm.runtime.session import checkpoint

        session, training = self.stopped, self.cfg.training
        if session is None:
            return
        states = {op: self.store[op] for op in session.ops if op in self.store}
        try:
            if training.save_dir:
                self.log.info(f"saved stage {session.index} at step {session.step} to {session.save(Path(training.save_dir))}")
            if training.checkpoint_dir and states:
                step = min(st.step for st in states.values())
                checkpoint(training.checkpoint_dir, states, session.index, step, training.keep_checkpoints,
                           (self.cfg.model, self.cfg.granularity))
                self.log.info(f"checkpoint of stage {session.index} at step {step} written to {training.checkpoint_dir}")
        except (OSError, SwarmError) as e:
            self.log.warning(f"stage {session.index} not written on the way out: {e}")

    def drain(self):
        """Leaving: let the running stage finish its step in progress and take no new one; a future
        done when it has (None without a session). ``stop`` afterwards keeps the state served."""
        return self.session.drain(self.cfg.training.timeout_s) if self.session is not None else None

    def stop(self) -> None:
        self._stop_session()

    def close(self) -> None:
        self.loop.call_sync(self.p2p.remove_binary_stream_handler(STATE_PROTOCOL))

    def handed_over(self, view, old_plan: str | None) -> bool:
        """Leaving: every other member runs one new plan (not ``old_plan``, which had this node), its
        state in place; or this node ran no plan, or there is nobody to hand over to."""
        others = [r for p, r in view.members.items() if p != self.me and r.state != MemberState.LEAVING]
        hashes = {r.ready for r in others}
        return old_plan is None or not others or (len(hashes) == 1 and None not in hashes and old_plan not in hashes)
