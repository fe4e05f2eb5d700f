"""Request/reply over libp2p streams, shared by every swarm protocol (stage, state).

One request per stream: the caller writes one length-prefixed frame (8-byte big-endian length, then
the frame) and reads one back. The callee side is ``serve_stream`` (the handler skeleton: admission,
``serve_one``, the exception set, logging a refusal, closing); the caller side is ``stream_caller``
(transport failures become ``PeerUnavailable``). ``with_backoff`` is the one retry loop.
"""
from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Awaitable, Callable

from swarm.errors import PeerUnavailable, RemoteProtocolError, SwarmError
from swarm.messages import error_frame

_LEN = struct.Struct(">Q")
PREFIX_BYTES = _LEN.size
Call = Callable[[str, bytes], Awaitable[bytes]]   # (peer id, request frame) -> reply frame
Answer = Callable[[bytes], Awaitable["bytes | tuple[bytes, Callable[[], None]]"]]
# what a stream can fail with, besides our own errors: the peer hung up, stalled, or sent garbage
STREAM_ERRORS = (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, struct.error, OSError)


async def read_length(reader: asyncio.StreamReader, timeout_s: float) -> int:
    return _LEN.unpack(await asyncio.wait_for(reader.readexactly(_LEN.size), timeout_s))[0]


async def read_frame(reader: asyncio.StreamReader, limit: int, timeout_s: float) -> bytes:
    n = await read_length(reader, timeout_s)
    if n > limit:
        raise RemoteProtocolError(f"frame of {n} bytes announced (limit {limit})")
    return await asyncio.wait_for(reader.readexactly(n), timeout_s)


def write_frame(writer: asyncio.StreamWriter, frame: bytes) -> None:
    writer.write(_LEN.pack(len(frame)))
    writer.write(frame)   # not concatenated: a large reply is not copied once more


class Gate:
    """Admission of one protocol's requests, decided from the sender and the announced length before the
    frame body is read: at most ``per_peer`` requests of one peer and ``total`` in all in progress (from
    the length prefix until the reply is sent), and at most ``read_bytes`` announced bytes being read at
    once (one frame is always admitted when nothing else is being read)."""

    def __init__(self, per_peer: int = 8, total: int = 64, read_bytes: int = 64 << 20):
        self.per_peer = per_peer
        self.total = total
        self.read_bytes = read_bytes
        self.active: dict[str, int] = {}   # requests in progress, by peer
        self.reading = 0                   # announced bytes of the frames being read

    @property
    def in_progress(self) -> int:
        return sum(self.active.values())

    def enter(self, peer: str, n: int) -> PeerUnavailable | None:
        """Take a place for a request of ``n`` bytes from ``peer`` (None), or say why not."""
        if self.active.get(peer, 0) >= self.per_peer:
            return PeerUnavailable(f"busy: {self.per_peer} requests of this peer in progress")
        if self.in_progress >= self.total:
            return PeerUnavailable(f"busy: {self.total} requests in progress")
        if self.reading and self.reading + n > self.read_bytes:
            return PeerUnavailable(f"busy: {self.reading} bytes being read (budget {self.read_bytes})")
        self.active[peer] = self.active.get(peer, 0) + 1
        self.reading += n
        return None

    def read(self, n: int) -> None:
        """The frame of ``n`` bytes is read (or its reading failed)."""
        self.reading -= n

    def leave(self, peer: str) -> None:
        self.active[peer] -= 1
        if not self.active[peer]:
            del self.active[peer]


def close_stream(writer: asyncio.StreamWriter) -> None:
    """Close a stream; one whose reply is still unsent (the caller does not read it) is aborted, so the
    buffered bytes go now rather than when the peer reads them."""
    transport = getattr(writer, "transport", None)
    try:
        if transport is not None and transport.get_write_buffer_size():
            transport.abort()
        else:
            writer.close()
    except Exception:   # a stream the daemon already dropped
        pass


async def serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: Answer, limit: int,
                    timeout_s: float, gate: Gate | None = None, peer: str = "",
                    refuse: Callable[[], SwarmError | None] | None = None) -> int:
    """One request frame in, ``answer``'s reply out; returns the bytes written. After the 8-byte length
    prefix and before the frame is read, a frame announced above ``limit``, a sender ``refuse()`` names a
    reason for, or a request ``gate`` has no place for gets an error reply naming it, the frame unread,
    and this raises. ``answer`` may return ``(reply, release)``: ``release()`` runs once the reply is sent
    (or could not be). The reply's send has a deadline (``timeout_s``: a caller that does not read it
    does not hold it longer); then this waits (as long) until the caller has read the reply and hung up:
    closing first can cut the reply's tail in the daemons."""
    async def send(reply: bytes) -> int:
        write_frame(writer, reply)
        await asyncio.wait_for(writer.drain(), timeout_s)
        return len(reply) + _LEN.size

    n = await read_length(reader, timeout_s)
    if n > limit:
        error = RemoteProtocolError(f"frame of {n} bytes announced (limit {limit})")
    else:
        error = refuse() if refuse else None
    if error is None and gate is not None:
        error = gate.enter(peer, n)
    if error is not None:   # only the length prefix was read: nothing allocated for the frame
        try:
            await send(error_frame(error))
            await asyncio.wait_for(reader.read(1), timeout_s)
        except (asyncio.TimeoutError, ConnectionError, OSError):
            pass
        raise error
    release = None
    try:
        try:
            frame = await asyncio.wait_for(reader.readexactly(n), timeout_s)
        finally:
            if gate is not None:
                gate.read(n)
        reply = await answer(frame)
        del frame
        if isinstance(reply, tuple):
            reply, release = reply
        sent = await send(reply)
        del reply
    finally:
        if release is not None:
            release()
        if gate is not None:
            gate.leave(peer)
    await asyncio.wait_for(reader.read(1), timeout_s)
    return sent


def describe(e: BaseException) -> str:
    """One line saying what went wrong on a stream."""
    if isinstance(e, SwarmError):
        return str(e)
    if isinstance(e, asyncio.IncompleteReadError):
        return "the stream ended inside a frame"
    if isinstance(e, asyncio.TimeoutError):
        return "no frame or hang-up in time"
    return type(e).__name__


async def serve_stream(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, answer: Callable,
                       limit: int | Callable[[str], int], timeout_s: float, gate: Gate | None = None,
                       refuse: Callable[[str], SwarmError | None] | None = None,
                       admit: Callable[[str], bool] | None = None,
                       failed: Callable[[str, BaseException], None] = lambda peer, e: None) -> int | None:
    """The handler skeleton of every request/reply protocol: a peer ``admit`` turns away gets a closed
    stream; otherwise one ``serve_one`` exchange with ``answer(frame, peer)``, ``limit`` (or
    ``limit(peer)``) and ``refuse(peer)``; a failure is handed to ``failed(peer, error)`` (for the
    refusal log); the stream is always closed. Returns the bytes sent (None: nothing was)."""
    peer = stream_info.peer_id.to_base58()
    try:
        if admit is not None and not admit(peer):
            return None
        return await serve_one(reader, writer, lambda frame: answer(frame, peer), limit(peer) if callable(limit) else limit,
                               timeout_s, gate, peer, (lambda: refuse(peer)) if refuse is not None else None)
    except (*STREAM_ERRORS, SwarmError) as e:
        failed(peer, e)
        return None
    except asyncio.CancelledError:   # the service is shutting down: end the handler's task quietly
        return None                  # (the daemon bindings read a cancelled task's exception in a callback)
    finally:
        close_stream(writer)


def stream_caller(p2p, max_frame_bytes: int, timeout_s: float, protocol: str) -> Call:
    """``call(peer, frame) -> reply frame`` over a new libp2p stream per request; transport failures
    (dial, reset, time-out) raise ``PeerUnavailable``."""
    from hivemind.p2p import PeerID

    async def call(peer: str, frame: bytes) -> bytes:
        async def exchange() -> bytes:
            _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer), protocol)
            try:
                write_frame(writer, frame)
                await writer.drain()
                return await read_frame(reader, max_frame_bytes, timeout_s)
            finally:
                writer.close()
        try:
            return await asyncio.wait_for(exchange(), timeout_s)
        except STREAM_ERRORS as e:
            raise PeerUnavailable(f"peer {peer[-8:]} unreachable ({type(e).__name__})") from None
        except SwarmError:
            raise
        except Exception as e:   # hivemind's daemon errors (failed to dial, ...)
            raise PeerUnavailable(f"peer {peer[-8:]} unreachable ({' '.join(str(e).split())[:120]})") from None
    return call


async def with_backoff(attempt: Callable[[], Awaitable], deadline: float, first_s: float = 0.05, max_s: float = 2.0):
    """``await attempt()`` again after a ``PeerUnavailable`` (a peer restarting, a plan being adopted),
    waiting ``first_s``, then twice as long each time up to ``max_s``, until ``deadline`` (monotonic
    seconds): then the last ``PeerUnavailable`` is raised."""
    delay = first_s
    while True:
        try:
            return await attempt()
        except PeerUnavailable:
            if time.monotonic() + delay > deadline:
                raise
        await asyncio.sleep(delay)   # back-off
        delay = min(2 * delay, max_s)
