"""The state protocol ``swarm.state.v1``: serving op states and snapshots, fetching and pushing them.

Every node serves it all the time (``StateService.serve``, through ``swarm.net.streams.serve_stream``):

- ``Fetch`` {op} is answered by ``State`` {op, step} with the op's tensors, from the running session
  or the node's store; at most ``FETCHES_PER_PEER`` fetches of one peer and ``FETCHES`` in all at
  once (the state is captured only once a fetch has a place, and the place is held until the reply is
  sent, with a deadline);
- ``Snapshot`` {op, step} (a single-holder stage's backup, ``swarm.churn.backup``) is answered by
  ``Kept`` once its tensors are checked against the model; it goes into the store on the next heartbeat.

In a public swarm (``training.serve_state: plan``, the default) only the members of the plan the node
runs or adopts are served. Requests beyond the gate, from strangers or banned peers are refused after
the length prefix, unread. State frames are raw tensors only (no codec can expand), within the largest
op's state; snapshots and fetched state with NaN or Inf are refused and their sender banned
(docs/hostile.md). What the node serves and keeps is its host's business (``StateHost``).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

from swarm import messages
from swarm.errors import PeerUnavailable, RemoteProtocolError, SwarmError
from swarm.events import NO_EVENTS, Events
from swarm.net.streams import Gate, describe, serve_stream, stream_caller, with_backoff
from swarm.pipeline.frames import peer_header, refuse_non_finite
from swarm.refusals import Bans, CallableLogger, Refusals, short
from swarm.runtime.state import OpState, check, op_tensors
from swarm.wire import Limits, decode, unpack

logger = logging.getLogger(__name__)

STATE_PROTOCOL = "swarm.state.v1"
FETCHES_PER_PEER, FETCHES = 2, 4     # state fetches served at once: per peer, in all
REQUESTS_PER_PEER, REQUESTS = 8, 32  # state requests (fetches and snapshots) in progress: per peer, in all
CONCURRENCY = 2                      # requests this node sends to one peer at once (below FETCHES_PER_PEER)
BUSY_WAIT_S = 60.0                   # how long a fetch or snapshot refused as busy is tried again


class StateHost(Protocol):
    """What the service asks the node: who may fetch, whose snapshots it keeps, and the states."""

    def serves_to(self) -> set[str] | None:
        """The peers that may fetch state here (None: anyone)."""

    def backed_up(self, peer: str) -> dict[str, int]:
        """The ops (-> stage) this node keeps snapshots of for ``peer``."""

    def state_of(self, op: str) -> Awaitable[OpState | None]:
        """The op's state now (captured from the session, or from the store)."""


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


class _GiveUp(Exception):
    """A donor or backup that failed otherwise than busy: not tried again (carries the error)."""


class StateService:
    """This node's end of ``swarm.state.v1``, both sides (see the module docstring). ``host``: the node's
    ``StateHost``; ``admit``: private swarms, the peers whose streams are read at all."""

    def __init__(self, module, dag, p2p, host: StateHost, admit: Callable[[str], bool] | None = None,
                 bans: Bans | None = None, log: Callable[[str], None] | None = None, events: Events = NO_EVENTS):
        self.module, self.p2p, self.host, self.admit = module, p2p, host, admit
        self.log = CallableLogger(log) if log is not None else logger
        self.owned = op_tensors(dag, module)
        self.limits = state_limits(module, self.owned)
        self.call = stream_caller(p2p, self.limits.max_frame_bytes, 120.0, STATE_PROTOCOL)
        self.serve_timeout_s = 60.0   # deadline of every read and send of a state request
        self.gate = Gate(REQUESTS_PER_PEER, REQUESTS, max(4 * self.limits.max_frame_bytes, 32 << 20))
        self.fetches = Gate(FETCHES_PER_PEER, FETCHES, 0)   # places for a capture and its reply
        self.refusals = Refusals(log, events=events)
        self.bans = bans if bans is not None else Bans()    # one table of bans for the node, sessions included
        self.received: deque[tuple[str, str, OpState]] = deque()   # (holder, op, snapshot) kept as a backup
        self.served = 0

    # --- serving ----------------------------------------------------------------------------------

    async def serve(self, stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The stream handler: one request, one reply (``serve_stream``)."""
        await serve_stream(stream_info, reader, writer, answer=self._answer, limit=self._limit,
                           timeout_s=self.serve_timeout_s, gate=self.gate, refuse=self._refuse, admit=self.admit,
                           failed=self._failed)

    def _limit(self, peer: str) -> int:
        return self.limits.max_frame_bytes if self.host.backed_up(peer) else 1 << 16   # only a holder sends big frames

    def _failed(self, peer: str, e: BaseException) -> None:
        self.refusals.note(peer, "busy" if isinstance(e, PeerUnavailable) else "state stream", describe(e))

    def _refuse(self, peer: str) -> SwarmError | None:
        """Why a state request of ``peer`` is refused after its length prefix, unread (None: read it)."""
        if self.bans.banned(peer):
            return RemoteProtocolError(f"peer {short(peer)} is banned for a while ({self.bans.until[peer][1]})")
        members = self.host.serves_to()
        if members is not None and peer not in members:
            return RemoteProtocolError(f"peer {short(peer)} is not a member of the plan this node follows (training.serve_state: plan)")
        return None

    async def _answer(self, frame: bytes, peer: str):
        """The reply to a ``fetch`` or ``snapshot`` request from ``peer``: never raises. A fetch's reply
        comes with the release of its place (``serve_one`` calls it once the reply is sent)."""
        kind = "state request"
        try:
            header = peer_header(frame, self.limits)
            op = header.meta.get("op")
            if header.kind not in messages.STATE_REQUESTS or not isinstance(op, str):
                raise RemoteProtocolError("expected a fetch or snapshot request naming an op")
            kind = header.kind
            if kind == messages.SNAPSHOT:
                return self._keep(peer, op, header.meta.get("step"), frame, header)
            if header.entries:
                raise RemoteProtocolError("a fetch request carries no tensors")
            busy = self.fetches.enter(peer, 0)
            if busy is not None:
                raise busy
            try:   # the capture and the reply exist only while this fetch holds its place
                state = await self.host.state_of(op)
                if state is None:
                    raise SwarmError(f"no state of op '{op}' here")
                reply = messages.State(op, state.step, state.tensors).to_frame()
            except BaseException:
                self.fetches.leave(peer)
                raise
            self.served += 1
            return reply, lambda: self.fetches.leave(peer)
        except Exception as e:   # never raises: a capture that failed is the caller's error reply too
            if isinstance(e, (RemoteProtocolError, PeerUnavailable)):
                self.refusals.note(peer, "busy" if isinstance(e, PeerUnavailable) else kind, str(e))
            elif not isinstance(e, SwarmError):
                self.log.warning(f"serving a {kind} of {short(peer)} failed ({type(e).__name__}: {str(e)[:100]})")
            return messages.error_frame(e)

    def _keep(self, peer: str, op: str, step, frame: bytes, header) -> bytes:
        """Keep ``peer``'s snapshot of ``op`` if this node backs that op up and the tensors are the op's
        (and finite: else ``peer`` is banned); checked on the header before anything is decoded."""
        if op not in self.host.backed_up(peer):
            raise RemoteProtocolError(f"this node keeps no snapshot of '{op}' for {peer[-8:]}")
        if type(step) is not int or step < 0:
            raise RemoteProtocolError("a snapshot names its step (an int >= 0)")
        if any(e["name"].startswith("g:") for e in header.entries):
            raise RemoteProtocolError("a snapshot carries no gradient")
        try:
            tensors = decode(frame, header, self.limits).tensors
        except SwarmError as e:
            raise RemoteProtocolError(str(e)) from None
        state = OpState(step, refuse_non_finite(self.bans, peer, messages.SNAPSHOT, tensors))
        try:
            check(self.module, self.owned, {op: state})
        except SwarmError as e:
            raise RemoteProtocolError(str(e)) from None
        self.received.append((peer, op, state))   # into the store on the next heartbeat
        return messages.Kept(op, step).to_frame()

    # --- fetching and pushing ---------------------------------------------------------------------

    async def _fetch_one(self, peer: str, op: str) -> OpState:
        frame = await self.call(peer, messages.Fetch(op).to_frame())
        header = peer_header(frame, self.limits)
        if header.kind == messages.ERROR and header.meta.get("retry"):
            raise PeerUnavailable(f"peer {peer[-8:]}: {header.meta.get('message')}")
        if header.kind != messages.STATE or header.meta.get("op") != op or not isinstance(header.meta.get("step"), int):
            raise SwarmError(f"peer {peer[-8:]} answered no state of '{op}': {header.meta.get('message', header.kind)}")
        tensors = refuse_non_finite(self.bans, peer, messages.STATE, decode(frame, header, self.limits).tensors)
        return OpState(header.meta["step"], tensors)

    async def fetch(self, donors: dict[str, list[str]]) -> dict[str, tuple[OpState, str]]:
        """The state of every op in ``donors`` (op -> donors holding its newest step, in the order to ask
        them: ``swarm.churn.adoption.donor_order``) and who gave it: at most ``CONCURRENCY`` at once from
        one donor, each op tried on its next donor if one fails (a donor that answers busy is asked
        again for a while, with back-off)."""
        places: dict[str, asyncio.Semaphore] = {}

        async def one(op: str, peers: list[str]) -> tuple[str, OpState | None, str]:
            for peer in peers:
                if self.bans.banned(peer):
                    continue

                async def attempt(peer: str = peer) -> OpState:
                    try:
                        async with places.setdefault(peer, asyncio.Semaphore(CONCURRENCY)):
                            return await self._fetch_one(peer, op)
                    except PeerUnavailable as e:
                        if "busy" in str(e):
                            raise   # back-off: the donor serves others first
                        raise _GiveUp(e) from None
                    except Exception as e:   # any donor failure: try the next one
                        raise _GiveUp(e) from None
                try:
                    return op, await with_backoff(attempt, time.monotonic() + BUSY_WAIT_S, first_s=0.1), peer
                except (PeerUnavailable, _GiveUp) as failure:
                    error = failure.args[0] if isinstance(failure, _GiveUp) else failure
                    if isinstance(error, RemoteProtocolError):
                        self.refusals.note(peer, "state reply", str(error))
                    self.log.warning(f"fetching '{op}' from {peer[-8:]} failed "
                                     f"({type(error).__name__}: {str(error)[:100]})")
            return op, None, ""
        results = await asyncio.gather(*(one(op, peers) for op, peers in donors.items()))
        return {op: (state, peer) for op, state, peer in results if state is not None}

    async def send_snapshot(self, peer: str, states: dict[str, OpState]) -> None:
        """Push a snapshot of ops to a backup, ``CONCURRENCY`` at a time (raises unless it kept every op;
        a backup that answers busy is asked again for a while, with back-off)."""
        place = asyncio.Semaphore(CONCURRENCY)

        async def one(op: str, state: OpState) -> None:
            async def attempt() -> None:
                try:
                    async with place:
                        frame = await self.call(peer, messages.Snapshot(op, state.step, state.tensors).to_frame())
                    messages.check_reply(unpack(frame, Limits(max_frame_bytes=1 << 16, max_tensors=0)), f"backup {peer[-8:]}")
                except PeerUnavailable as e:
                    if "busy" in str(e):
                        raise   # back-off: the backup is serving others
                    raise _GiveUp(e) from None
            try:
                await with_backoff(attempt, time.monotonic() + BUSY_WAIT_S, first_s=0.1)
            except _GiveUp as e:
                raise e.args[0] from None
        await asyncio.gather(*(one(op, state) for op, state in states.items()))
