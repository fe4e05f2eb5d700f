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
model. Every node serves ``swarm.state.v1`` all the time: in a public swarm (``training.serve_state:
plan``, the default) to the members of the plan it runs or adopts only; at most ``FETCHES_PER_PEER``
fetches of one peer and ``FETCHES`` in all at once (the op's state is captured only once one has a
place, and the place is held until the reply is sent, with a deadline); requests beyond the gate,
from strangers or banned peers are refused after the length prefix, unread. State frames are raw
tensors only (no codec can expand), within the largest op's state; snapshots and fetched state with
NaN or Inf are refused and their sender banned (docs/hostile.md).
"""
from __future__ import annotations

import asyncio
import struct
import time
from collections import deque
from collections.abc import Callable

from swarm.config import NodeConfig
from swarm.errors import PeerUnavailable, Poisoned, RemoteProtocolError, SwarmError
from swarm.messages import check_reply, error_frame
from swarm.net.membership import MembershipView
from swarm.net.records import MAX_DISTRUSTS, MAX_HOLDS, MAX_LINKS, MemberRecord
from swarm.net.streams import Gate, close_stream, serve_one, stream_caller
from swarm.refusals import Bans, Refusals, short
from swarm.runtime.backup import SnapshotPusher, backups
from swarm.runtime.state import OpState, check, op_tensors, read_checkpoint
from swarm.scheduler import Plan
from swarm.wire import Limits, decode, non_finite, pack, read_header, unpack

STATE_PROTOCOL = "swarm.state.v1"
OBSERVED_KEEP_S = 1800.0   # how long what a peer delivered is remembered
ADOPT_WAIT_TTLS = 2        # a plan is adopted after this many record TTLs even if some member has not committed it
FETCHES_PER_PEER, FETCHES = 2, 4     # state fetches served at once: per peer, in all
REQUESTS_PER_PEER, REQUESTS = 8, 32  # state requests (fetches and snapshots) in progress: per peer, in all
CONCURRENCY = 2                      # requests this node sends to one peer at once (below FETCHES_PER_PEER)
BUSY_WAIT_S = 60.0                   # how long a fetch or snapshot refused as busy is tried again


def state_limits(module, owned: dict[str, list[tuple[str, str]]]) -> Limits:
    """What one op's state can take on ``swarm.state.v1``: per parameter, the parameter, its gradient and
    the optimizer's tensors (at most five tensors of its size and a scalar), and its buffers; raw only."""
    params, buffers = dict(module.named_parameters()), dict(module.named_buffers())
    tensors, nbytes, numel = 8, 1 << 10, 1
    for names in owned.values():
        n, b = 0, 0
        for kind, name in names:
            t = params[name] if kind == "p" else buffers[name]
            n += 6 if kind == "p" else 1
            b += (5 * t.numel() * max(t.element_size(), 4) + 64) if kind == "p" else t.numel() * t.element_size()
            numel = max(numel, t.numel())
        tensors, nbytes = max(tensors, n + 8), max(nbytes, b)
    frame = nbytes + tensors * 256 + (1 << 20)
    return Limits(max_frame_bytes=frame, max_tensors=tensors, max_header_bytes=max(64 << 10, tensors * 256),
                  max_numel=numel, max_decoded_bytes=frame, codecs=frozenset({"raw"}))


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
        self.limits = state_limits(traced.gm, self.owned)
        self.call = stream_caller(p2p, self.limits.max_frame_bytes, 120.0, STATE_PROTOCOL)
        self.serve_timeout_s = 60.0   # deadline of every read and send of a state request
        self.gate = Gate(REQUESTS_PER_PEER, REQUESTS, max(4 * self.limits.max_frame_bytes, 32 << 20))
        self.fetches = Gate(FETCHES_PER_PEER, FETCHES, 0)   # places for a capture and its reply
        self.refusals, self.bans = Refusals(log), Bans()   # one table of bans for the node, sessions included
        self.observed: dict[str, tuple[float, float]] = {}   # next-stage peer -> (TFLOP/s it delivered, when seen)
        self.store: dict[str, OpState] = {}
        self.stopped_at = 0   # the step of the last session stopped (a stage without state has no other record)
        self.session = None
        self.plan: Plan | None = None
        self.pending: Plan | None = None
        self.pending_since = 0.0   # when the plan being adopted was committed here
        self.plan_step = 0         # the highest step the members of the plan this node ran advertised (a dead one's too)
        self.fetching: asyncio.Future | None = None
        self.pusher: SnapshotPusher | None = None
        self.received: deque[tuple[str, str, OpState]] = deque()   # (holder, op, snapshot) kept as a backup
        self.served = 0
        if cfg.training.checkpoint_dir:
            self.store.update(read_checkpoint(cfg.training.checkpoint_dir, sorted(self.owned), log=log))
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

    def _members(self) -> set[str]:
        return {p for plan in (self.plan, self.pending) if plan is not None for p in plan.members}

    def _refuse(self, peer: str) -> SwarmError | None:
        """Why a state request of ``peer`` is refused after its length prefix, unread (None: read it)."""
        if self.bans.banned(peer):
            return RemoteProtocolError(f"peer {short(peer)} is banned for a while ({self.bans.until[peer][1]})")
        if getattr(self.cfg.training, "serve_state", "plan") == "plan" and peer not in self._members():
            return RemoteProtocolError(f"peer {short(peer)} is not a member of the plan this node follows (training.serve_state: plan)")
        return None

    async def _answer(self, frame: bytes, peer: str):
        """The reply to a ``fetch`` or ``snapshot`` request from ``peer``: never raises. A fetch's reply
        comes with the release of its place (``serve_one`` calls it once the reply is sent)."""
        kind = "state request"
        try:
            try:
                header = read_header(frame, self.limits)
            except SwarmError as e:
                raise RemoteProtocolError(str(e)) from None
            op = header.meta.get("op")
            if header.kind not in ("fetch", "snapshot") or not isinstance(op, str):
                raise RemoteProtocolError("expected a fetch or snapshot request naming an op")
            kind = header.kind
            if kind == "snapshot":
                return self._keep(peer, op, header.meta.get("step"), frame, header)
            if header.entries:
                raise RemoteProtocolError("a fetch request carries no tensors")
            busy = self.fetches.enter(peer, 0)
            if busy is not None:
                raise busy
            try:   # the capture and the reply exist only while this fetch holds its place
                state = await self._state_of(op)
                if state is None:
                    raise SwarmError(f"no state of op '{op}' here")
                reply = pack("state", {"op": op, "step": state.step}, state.tensors)[0]
            except BaseException:
                self.fetches.leave(peer)
                raise
            self.served += 1
            return reply, lambda: self.fetches.leave(peer)
        except Exception as e:   # never raises: a capture that failed is the caller's error reply too
            if isinstance(e, (RemoteProtocolError, PeerUnavailable)):
                self.refusals.note(peer, "busy" if isinstance(e, PeerUnavailable) else kind, str(e))
            elif not isinstance(e, SwarmError):
                self.log(f"warning: serving a {kind} of {short(peer)} failed ({type(e).__name__}: {str(e)[:100]})")
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

    def _keep(self, peer: str, op: str, step, frame: bytes, header) -> bytes:
        """Keep ``peer``'s snapshot of ``op`` if this node backs that op up and the tensors are the op's
        (and finite: else ``peer`` is banned); checked on the header before anything is decoded."""
        if op not in self._backed_up(peer):
            raise RemoteProtocolError(f"this node keeps no snapshot of '{op}' for {peer[-8:]}")
        if type(step) is not int or step < 0:
            raise RemoteProtocolError("a snapshot names its step (an int >= 0)")
        if any(e["name"].startswith("g:") for e in header.entries):
            raise RemoteProtocolError("a snapshot carries no gradient")
        try:
            tensors = decode(frame, header, self.limits).tensors
        except SwarmError as e:
            raise RemoteProtocolError(str(e)) from None
        state = OpState(step, self._finite(peer, "snapshot", tensors))
        try:
            check(self.traced.gm, self.owned, {op: state})
        except SwarmError as e:
            raise RemoteProtocolError(str(e)) from None
        self.received.append((peer, op, state))   # into the store on the next heartbeat
        return pack("kept", {"op": op, "step": step}, {})[0]

    async def _serve(self, stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = stream_info.peer_id.to_base58()
        try:
            if self.admit is None or self.admit(peer):   # only a holder this node backs up sends big frames
                limit = self.limits.max_frame_bytes if self._backed_up(peer) else 1 << 16
                await serve_one(reader, writer, lambda frame: self._answer(frame, peer), limit, self.serve_timeout_s,
                                self.gate, peer, lambda: self._refuse(peer))
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, struct.error, SwarmError, OSError) as e:
            what = str(e) if isinstance(e, SwarmError) else \
                "the stream ended inside a frame" if isinstance(e, asyncio.IncompleteReadError) else \
                "no frame, send or hang-up in time" if isinstance(e, asyncio.TimeoutError) else type(e).__name__
            self.refusals.note(peer, "busy" if isinstance(e, PeerUnavailable) else "state stream", what)
        finally:
            close_stream(writer)

    def _finite(self, peer: str, what: str, tensors: dict) -> dict:
        bad = non_finite(tensors)
        if bad is not None:
            self.bans.ban(peer, f"sent a {what} with NaN/Inf")
            raise Poisoned(f"{what}: {bad}; peer {short(peer)} banned for {self.bans.ban_s:.0f} s")
        return tensors

    async def _fetch_one(self, peer: str, op: str) -> OpState:
        frame = await self.call(peer, pack("fetch", {"op": op}, {})[0])
        try:
            header = read_header(frame, self.limits)
        except SwarmError as e:
            raise RemoteProtocolError(str(e)) from None
        if header.kind == "error" and header.meta.get("retry"):
            raise PeerUnavailable(f"peer {peer[-8:]}: {header.meta.get('message')}")
        if header.kind != "state" or header.meta.get("op") != op or not isinstance(header.meta.get("step"), int):
            raise SwarmError(f"peer {peer[-8:]} answered no state of '{op}': {header.meta.get('message', header.kind)}")
        tensors = self._finite(peer, "state", decode(frame, header, self.limits).tensors)
        return OpState(header.meta["step"], tensors)

    async def fetch(self, sources: dict[str, list[str]]) -> dict[str, tuple[OpState, str]]:
        """The state of every op in ``sources`` (op -> donors holding its newest step) and who gave it:
        spread over the donors (``donor_order``), at most ``CONCURRENCY`` at once from one donor, each op
        tried on its other donors if one fails (a donor that answers busy is asked again for a while)."""
        places: dict[str, asyncio.Semaphore] = {}

        async def one(op: str, donors: list[str]) -> tuple[str, OpState | None, str]:
            for peer in donors:
                if self.bans.banned(peer):
                    continue
                deadline, delay = asyncio.get_running_loop().time() + BUSY_WAIT_S, 0.1
                while True:
                    try:
                        async with places.setdefault(peer, asyncio.Semaphore(CONCURRENCY)):
                            return op, await self._fetch_one(peer, op), peer
                    except PeerUnavailable as e:
                        if "busy" in str(e) and asyncio.get_running_loop().time() + delay < deadline:
                            await asyncio.sleep(delay)   # back-off: the donor serves others first
                            delay = min(2 * delay, 2.0)
                            continue
                        self.log(f"warning: fetching '{op}' from {peer[-8:]} failed ({type(e).__name__}: {str(e)[:100]})")
                    except Exception as e:   # any donor failure: try the next one
                        if isinstance(e, RemoteProtocolError):
                            self.refusals.note(peer, "state reply", str(e))
                        self.log(f"warning: fetching '{op}' from {peer[-8:]} failed ({type(e).__name__}: {str(e)[:100]})")
                    break
            return op, None, ""
        results = await asyncio.gather(*(one(op, donors) for op, donors in donor_order(sources).items()))
        return {op: (state, peer) for op, state, peer in results if state is not None}

    async def _send_snapshot(self, peer: str, states: dict[str, OpState]) -> None:
        """Push a snapshot of ops to a backup, ``CONCURRENCY`` at a time (raises unless it kept every op)."""
        place = asyncio.Semaphore(CONCURRENCY)

        async def one(op: str, state: OpState) -> None:
            deadline, delay = asyncio.get_running_loop().time() + BUSY_WAIT_S, 0.1
            while True:
                async with place:
                    reply = unpack(await self.call(peer, pack("snapshot", {"op": op, "step": state.step}, state.tensors)[0]),
                                   Limits(max_frame_bytes=1 << 16, max_tensors=0))
                try:
                    check_reply(reply, f"backup {peer[-8:]}")
                    return
                except PeerUnavailable as e:
                    if "busy" not in str(e) or asyncio.get_running_loop().time() + delay > deadline:
                        raise
                await asyncio.sleep(delay)   # back-off: the backup is serving others
                delay = min(2 * delay, 2.0)
        await asyncio.gather(*(one(op, state) for op, state in states.items()))

    # --- following plans ------------------------------------------------------------------------

    def follow(self, plan: Plan | None, view: MembershipView, record: MemberRecord) -> None:
        """One heartbeat: adopt a newly committed plan step by step; back up single-holder stages."""
        pending = self.pending.hash if self.pending is not None else None
        if self.plan is not None:   # remembered: a holder that dies takes its step out of the view, not out of the swarm
            self.plan_step = max([self.plan_step, *(r.step or 0 for p, r in view.members.items() if p in self.plan.members)])
        if plan is not None and (self.plan is None or plan.hash != self.plan.hash) and plan.hash != pending:
            self._stop_session()
            record.ready, self.pending, self.fetching = None, plan, None
            self.pending_since = time.monotonic()
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
        self._report(record)

    def _report(self, record: MemberRecord) -> None:
        """What this node saw of others, for everyone's planning: the compute each next-stage peer
        delivered (kept ``OBSERVED_KEEP_S`` across plans, so a liar moved off the pipeline stays
        down-rated) and the peers it banned for NaN/Inf (a dispute: ``swarm.planning.disputed``)."""
        now = time.monotonic()
        if self.session is not None:
            for peer, rate in self.session.server.counters.delivered.items():
                self.observed[peer] = (rate, now)
        self.observed = {p: (r, t) for p, (r, t) in self.observed.items() if now - t < OBSERVED_KEEP_S}
        newest = sorted(self.observed, key=lambda p: self.observed[p][1])[-MAX_LINKS:]
        record.observed_tflops = {p: self.observed[p][0] for p in newest} or None
        record.distrusts = sorted(self.bans.active())[:MAX_DISTRUSTS] or None

    def _adopt(self, plan: Plan, view: MembershipView, record: MemberRecord) -> None:
        live = [m for m in plan.members if m in view.members]
        behind = [m for m in live if view.members[m].committed_hash != plan.hash]
        if behind:   # some member still runs the previous plan: its state is not final yet ...
            waited = time.monotonic() - self.pending_since
            if waited < ADOPT_WAIT_TTLS * self.cfg.network.ttl_s:
                return
            if self.fetching is None:   # ... but a member that never commits cannot hold the plan up for good
                self.log(f"warning: adopting plan {plan.hash} without {', '.join(short(m) for m in behind)}: "
                         f"not committed {waited:.0f} s after this node did")
        stage = plan.role(self.me)["stage"]
        if stage is None:
            self.plan, self.pending, record.ready = plan, None, plan.hash
            return
        spec = plan.stages[stage]
        ops = [op for op in spec.ops if op in self.owned]
        if self.fetching is None:
            start = max([self.step, self.plan_step, *(view.members[m].step or 0 for m in live)])
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
                                                     self.bandwidth, self.start_step, self.admit, self.log, self.device, states,
                                                     bans=self.bans)
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
