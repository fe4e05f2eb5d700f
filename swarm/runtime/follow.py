"""A node follows the committed plans: it hands training state over by op, backs up stages that have a
single holder, and runs its own stage (``TrainingSession``) once its state is in place.

Adopting plan P (one heartbeat at a time, never blocking the heartbeat for a transfer):

1. stop the previous session and keep its final state (by op, with its step) in the node's store;
2. wait until every live member of P has committed P (so every old session has stopped and every
   donor's state is frozen);
3. the start step is the highest step any member holds; for each op of this node's new stage, take
   the newest state anyone advertises (``holds`` in the member records): from the node's own store, or
   fetched over ``swarm.state.v1``, the ops spread over all donors that hold that newest step;
4. start the session at the start step and advertise ``ready = P``.

A stage held by a single peer is backed up (``swarm.runtime.backup``): its holder pushes snapshots to
the peers ``backups`` names (``snapshot`` requests, checked against the plan and the model before they
are kept), so a SIGKILLed sole holder costs at most ``backup_every_steps`` steps of its ops, never the
model. Every node serves ``swarm.state.v1`` all the time.
"""
from __future__ import annotations

import asyncio
import struct
from collections import deque
from typing import Callable

from swarm.config import NodeConfig
from swarm.errors import SwarmError
from swarm.membership import MAX_HOLDS, MemberRecord, MembershipView
from swarm.runtime.backup import SnapshotPusher, backups
from swarm.runtime.rpc import check_reply, error_frame, serve_one, stream_caller
from swarm.runtime.state import OpState, check, op_tensors, read_checkpoint
from swarm.scheduler import Plan
from swarm.wire import Limits, pack, unpack

STATE_PROTOCOL = "swarm.state.v1"


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


def donor_order(sources: dict[str, list[str]]) -> dict[str, list[str]]:
    """The donors to try for each op, in order: the ops spread over the donors round-robin (the k-th op
    first asks its donors' k-th), the others after it in case one fails."""
    out = {}
    for k, op in enumerate(sorted(sources)):
        donors = sources[op]
        out[op] = [donors[(k + j) % len(donors)] for j in range(len(donors))]
    return out


class PlanFollower:
    """Everything between the committed plan and this node's running stage (see the module docstring)."""

    def __init__(self, me: str, traced, cfg: NodeConfig, p2p, loop: asyncio.AbstractEventLoop,
                 bandwidth: Callable[[str], float | None], admit: Callable[[str], bool] | None, log,
                 device: str = "cpu"):
        self.me, self.traced, self.cfg, self.p2p, self.loop = me, traced, cfg, p2p, loop
        self.bandwidth, self.admit, self.log, self.device = bandwidth, admit, log, device
        self.dag = traced.dag
        self.owned = op_tensors(self.dag, traced.gm)
        biggest = max((sum(t.numel() for n, t in traced.gm.state_dict().items()), 1))
        self.limits = Limits(max_frame_bytes=16 * biggest + (1 << 20), max_tensors=4096, max_header_bytes=1 << 20)
        self.call = stream_caller(p2p, self.limits, 120.0, STATE_PROTOCOL)
        self.store: dict[str, OpState] = {}
        self.stopped_at = 0   # the step of the last session stopped (a stage without state has no other record)
        self.session = None
        self.plan: Plan | None = None
        self.pending: Plan | None = None
        self.fetching: asyncio.Future | None = None
        self.pusher: SnapshotPusher | None = None
        self.received: deque[tuple[str, str, OpState]] = deque()   # (holder, op, snapshot) kept as a backup
        self.served = 0
        if cfg.training.checkpoint_dir:
            self.store.update(read_checkpoint(cfg.training.checkpoint_dir, sorted(self.owned)))
            if self.store:
                log(f"checkpoint: state of {len(self.store)} ops at step {self.step} from {cfg.training.checkpoint_dir}")
        self._call(self.p2p.add_binary_stream_handler(STATE_PROTOCOL, self._serve))

    def _call(self, coro, timeout_s: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    @property
    def step(self) -> int:
        live = self.session.step if self.session is not None else 0
        return max([live, self.stopped_at, *(s.step for s in self.store.values())])

    # --- serving state --------------------------------------------------------------------------

    async def _state_of(self, op: str) -> OpState | None:
        session = self.session
        if session is not None and op in session.ops:
            return (await session.capture([op]))[op]
        return self.store.get(op)

    async def _answer(self, frame: bytes, peer: str) -> bytes:
        """The reply to a ``fetch`` or ``snapshot`` request from ``peer``: never raises."""
        try:
            msg = unpack(frame, self.limits)
            op = msg.meta.get("op")
            if msg.kind not in ("fetch", "snapshot") or not isinstance(op, str):
                raise SwarmError("expected a fetch or snapshot request naming an op")
            if msg.kind == "snapshot":
                return self._keep(peer, op, msg.meta.get("step"), msg.tensors)
            state = await self._state_of(op)
            if state is None:
                raise SwarmError(f"no state of op '{op}' here")
            self.served += 1
            return pack("state", {"op": op, "step": state.step}, state.tensors)[0]
        except SwarmError as e:
            return error_frame(e)

    def _backed_up(self, peer: str) -> dict[str, int]:
        """The ops (-> stage) of the single-holder stages ``peer`` holds and this node backs up, in the
        plan it runs or the one it is adopting."""
        out = {}
        for plan in (self.plan, self.pending):
            copies = self.cfg.training.backup_copies
            for stage, keepers in (backups(plan, copies).items() if plan is not None else ()):
                if self.me in keepers and plan.stages[stage].peers == (peer,):
                    out.update({op: stage for op in plan.stages[stage].ops if op in self.owned})
        return out

    def _keep(self, peer: str, op: str, step, tensors) -> bytes:
        """Keep ``peer``'s snapshot of ``op`` if this node backs that op up and the tensors are the op's."""
        if op not in self._backed_up(peer):
            raise SwarmError(f"this node keeps no snapshot of '{op}' for {peer[-8:]}")
        if type(step) is not int or step < 0:
            raise SwarmError("a snapshot names its step (an int >= 0)")
        if any(k.startswith("g:") for k in tensors):
            raise SwarmError("a snapshot carries no gradient")
        state = OpState(step, tensors)
        check(self.traced.gm, self.owned, {op: state})
        self.received.append((peer, op, state))   # into the store on the next heartbeat
        return pack("kept", {"op": op, "step": step}, {})[0]

    async def _serve(self, stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = stream_info.peer_id.to_base58()
        try:
            if self.admit is None or self.admit(peer):   # only a holder this node backs up sends big frames
                limit = self.limits.max_frame_bytes if self._backed_up(peer) else 1 << 16
                await serve_one(reader, writer, lambda frame: self._answer(frame, peer), limit, 60.0)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, struct.error, SwarmError):
            pass
        finally:
            writer.close()

    async def _fetch_one(self, peer: str, op: str) -> OpState:
        msg = unpack(await self.call(peer, pack("fetch", {"op": op}, {})[0]), self.limits)
        if msg.kind != "state" or msg.meta.get("op") != op or not isinstance(msg.meta.get("step"), int):
            raise SwarmError(f"peer {peer[-8:]} answered no state of '{op}': {msg.meta.get('message', msg.kind)}")
        return OpState(msg.meta["step"], msg.tensors)

    async def fetch(self, sources: dict[str, list[str]]) -> dict[str, tuple[OpState, str]]:
        """The state of every op in ``sources`` (op -> donors holding its newest step) and who gave it:
        spread over the donors (``donor_order``), each op tried on its other donors if one fails."""
        async def one(op: str, donors: list[str]) -> tuple[str, OpState | None, str]:
            for peer in donors:
                try:
                    return op, await self._fetch_one(peer, op), peer
                except Exception as e:   # any donor failure: try the next one
                    self.log(f"warning: fetching '{op}' from {peer[-8:]} failed ({type(e).__name__}: {str(e)[:100]})")
            return op, None, ""
        results = await asyncio.gather(*(one(op, donors) for op, donors in donor_order(sources).items()))
        return {op: (state, peer) for op, state, peer in results if state is not None}

    async def _send_snapshot(self, peer: str, states: dict[str, OpState]) -> None:
        """Push a snapshot of ops to a backup (raises unless it kept every op)."""
        async def one(op: str, state: OpState) -> None:
            reply = unpack(await self.call(peer, pack("snapshot", {"op": op, "step": state.step}, state.tensors)[0]),
                           Limits(max_frame_bytes=1 << 16))
            check_reply(reply, f"backup {peer[-8:]}")
        await asyncio.gather(*(one(op, state) for op, state in states.items()))

    # --- following plans ------------------------------------------------------------------------

    def follow(self, plan: Plan | None, view: MembershipView, record: MemberRecord) -> None:
        """One heartbeat: adopt a newly committed plan step by step; back up single-holder stages."""
        pending = self.pending.hash if self.pending is not None else None
        if plan is not None and (self.plan is None or plan.hash != self.plan.hash) and plan.hash != pending:
            self._stop_session()
            record.ready, self.pending, self.fetching = None, plan, None
            if not plan.feasible:
                self.log(f"warning: plan {plan.hash} does not fit its peers' memory; not training")
        if self.pending is not None and self.pending.feasible:
            self._adopt(self.pending, view, record)
        self._take_snapshots()
        if self.session is not None and self.session.policy is not None and self.session.policy.codec_s_per_byte:
            record.codec_bps = self.session.policy.codec_bytes_per_s
        record.step = self.step
        steps = {op: s.step for op, s in self.store.items()}
        if self.session is not None:
            steps.update({op: self.session.step for op in self.session.ops})
        record.holds = holds_ranges(self.dag.index, steps) or None

    def _adopt(self, plan: Plan, view: MembershipView, record: MemberRecord) -> None:
        live = [m for m in plan.members if m in view.members]
        if any(view.members[m].committed_hash != plan.hash for m in live):
            return   # some member still runs the previous plan: its state is not final yet
        stage = plan.role(self.me)["stage"]
        if stage is None:
            self.plan, self.pending, record.ready = plan, None, plan.hash
            return
        spec = plan.stages[stage]
        ops = [op for op in spec.ops if op in self.owned]
        if self.fetching is None:
            start = max([self.step, *(view.members[m].step or 0 for m in live)])
            newest = self._sources(view, ops)
            local = {op: self.store[op] for op, (step, _) in newest.items() if op in self.store and self.store[op].step >= step}
            remote = {op: donors for op, (step, donors) in newest.items() if op not in local}
            self.start_step, self.local, self.donors = start, local, []
            self.fetching = asyncio.run_coroutine_threadsafe(self.fetch(remote), self.loop) if remote else None
            if self.fetching is None:
                self._start(plan, stage, local, record)
            return
        if not self.fetching.done():
            return
        fetched = self.fetching.result() if self.fetching.exception() is None else {}
        self.donors = sorted({peer for _, peer in fetched.values()})
        self._start(plan, stage, {**self.local, **{op: state for op, (state, _) in fetched.items()}}, record)

    def _sources(self, view: MembershipView, ops: list[str]) -> dict[str, tuple[int, list[str]]]:
        """For each op: the newest step anyone advertises and who holds it (this node included)."""
        found: dict[str, tuple[int, list[str]]] = {}
        holders = {p: r.holds or [] for p, r in view.members.items() if p != self.me}
        holders[self.me] = [[self.dag.index[op], self.dag.index[op] + 1, s.step] for op, s in self.store.items()]
        for op in ops:
            i = self.dag.index[op]
            for peer, ranges in sorted(holders.items()):
                for first, stop, step in ranges:
                    if first <= i < stop:
                        best, donors = found.get(op, (-1, []))
                        if step > best:
                            found[op] = (step, [peer])
                        elif step == best and peer not in donors:
                            donors.append(peer)
        return found

    def _start(self, plan: Plan, stage: int, states: dict[str, OpState], record: MemberRecord) -> None:
        from swarm.runtime.session import TrainingSession

        self.fetching, self.pending = None, None
        missing = [op for op in plan.stages[stage].ops if op in self.owned and op not in states]
        if missing and self.step:
            self.log(f"warning: no state of {len(missing)} ops anywhere ({', '.join(missing[:3])}...): initial weights")
        try:
            self.session = session = TrainingSession(plan, self.me, self.traced, self.cfg, self.p2p, self.loop,
                                                     self.bandwidth, self.start_step, self.admit, self.log, self.device, states)
            keepers = backups(plan, self.cfg.training.backup_copies).get(stage)
            if keepers and self.cfg.training.backup_every_steps:
                self.pusher = SnapshotPusher(lambda: session.capture(session.ops), self._send_snapshot, keepers,
                                             self.cfg.training.backup_every_steps, self.log)
                session.server.before_apply = self.pusher.before_apply
            session.start()
        except SwarmError as e:
            self.session, self.pusher = None, None
            self.log(f"error: cannot run stage {stage} of plan {plan.hash}: {e}")
            return
        for op in self.session.ops:
            self.store.pop(op, None)   # live now: served from the session
        if session.completed:
            self.log(f"completed step {self.start_step - 1} on {len(session.completed)} ops with the gradient "
                     "the previous plan left (the rest of the swarm had applied it)")
        behind = {op: self.start_step - s.step for op, s in states.items()
                  if s.step < self.start_step and op in session.ops and op not in session.completed}
        if behind:
            self.log(f"restored {len(behind)} ops from older state: up to {max(behind.values())} steps of them lost")
        self.plan, record.ready = plan, plan.hash
        self.log(f"training: stage {stage} of {len(plan.stages)} from step {self.start_step} "
                 f"({len(states)} ops of state, {len(states) - len(self.local)} fetched"
                 + (f" from {', '.join(p[-8:] for p in self.donors)})" if self.donors else ")")
                 + (f"; snapshots to {', '.join(p[-8:] for p in keepers)}" if self.pusher else ""))

    def _take_snapshots(self) -> None:
        """Move the snapshots received as a backup into the store (newest per op)."""
        got: dict[tuple[str, int], int] = {}
        while self.received:
            peer, op, state = self.received.popleft()
            if op not in self.store or self.store[op].step < state.step:
                self.store[op] = state
                got[peer, state.step] = got.get((peer, state.step), 0) + 1
        for (peer, step), n in sorted(got.items(), key=lambda kv: kv[0][1]):
            self.log(f"backup: snapshot of {n} ops at step {step} from {peer[-8:]}")

    def _stop_session(self) -> None:
        if self.pusher is not None:
            self.loop.call_soon_threadsafe(self.pusher.close)
            self.pusher = None
        if self.session is not None:
            session, self.session = self.session, None
            session.stop()
            self.store.update(session.final_state(pending=True))
            self.stopped_at = max(self.stopped_at, session.step)

    def drain(self):
        """Leaving: let the running stage finish its step in progress and take no new one; a future
        done when it has (None without a session). ``stop`` afterwards keeps the state served."""
        return self.session.drain(self.cfg.training.timeout_s) if self.session is not None else None

    def stop(self) -> None:
        self._stop_session()

    def close(self) -> None:
        self._call(self.p2p.remove_binary_stream_handler(STATE_PROTOCOL))

    def handed_over(self, view: MembershipView, old_plan: str | None) -> bool:
        """Leaving: every other member runs one new plan (not ``old_plan``, which had this node), its
        state in place; or this node ran no plan, or there is nobody to hand over to."""
        others = [r for p, r in view.members.items() if p != self.me and r.state != "leaving"]
        hashes = {r.ready for r in others}
        return old_plan is None or not others or (len(hashes) == 1 and None not in hashes and old_plan not in hashes)
