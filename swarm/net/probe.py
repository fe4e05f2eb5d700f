"""Peer-to-peer transport: the only hivemind.p2p user. For now: bandwidth and RTT probes, liveness pings.

Probe protocol ``swarm.probe.v1`` on a libp2p binary stream: the caller sends an 8-byte big-endian
length ``n`` (at most ``MAX_PROBE_BYTES``) and ``n`` bytes; the callee reads them and answers one
byte (``0x01``), or ``0x02`` at once when it is busy: a node takes part in one probe at a time, in
either role, because concurrent probes share its access link (and the ACKs of one flow queue behind
the data of the other) and would all read low. An empty probe (``n = 0``: the RTT probe, and the
liveness ping of ``swarm.liveness``) is answered ``0x01`` busy or not. RTT = time of an empty probe; bandwidth =
8 n / (time of an n-byte probe - RTT), with ``n``
sized so that the transfer takes about ``target_s`` (the faster of two such probes counts). The callee bounds every read in time, so a peer
that stalls or lies about ``n`` costs nothing but a closed stream. In a private swarm, ``admit`` (a
check of the caller's authenticated libp2p peer id) turns away non-members the same way.
"""
from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable

from hivemind.p2p import P2P, PeerID

PROBE = "swarm.probe.v1"
MAX_PROBE_BYTES = 64 << 20
CHUNK = 1 << 20
_HEADER = struct.Struct(">Q")


class ProbeBusy(Exception):
    """The peer (or this node) is in another probe; try later."""


class LinkProber:
    """Serves probes and measures links, one probe at a time per node."""

    def __init__(self, p2p: P2P, timeout_s: float = 30.0, admit: Callable[[str], bool] | None = None):
        self.p2p, self.timeout_s, self.busy, self.admit = p2p, timeout_s, False, admit

    async def serve(self) -> None:
        await self.p2p.add_binary_stream_handler(PROBE, self._serve)

    async def _serve(self, stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held = False
        try:
            if self.admit is not None and not self.admit(stream_info.peer_id.to_base58()):
                return  # private swarm: not a member, the stream just closes
            (n,) = _HEADER.unpack(await asyncio.wait_for(reader.readexactly(_HEADER.size), self.timeout_s))
            if n > MAX_PROBE_BYTES:
                return  # hostile or broken: close without reading
            if self.busy and n:
                writer.write(b"\x02")
                await writer.drain()
                return
            if n:   # an empty probe (RTT, liveness ping) is answered whatever this node is doing
                held = self.busy = True
            deadline = time.monotonic() + self.timeout_s
            while n:
                chunk = await asyncio.wait_for(reader.read(min(n, CHUNK)), max(0.01, deadline - time.monotonic()))
                if not chunk:
                    return  # the caller hung up early: no answer
                n -= len(chunk)
            writer.write(b"\x01")
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.CancelledError, ConnectionError, struct.error):
            pass  # cancelled only when this node shuts down: the stream just closes
        finally:
            if held:
                self.busy = False
            writer.close()

    async def probe_once(self, peer: PeerID | str, n_bytes: int, timeout_s: float = 30.0) -> float:
        """Seconds from the first byte sent to the callee's answer (``peer``: a PeerID or its base58)."""
        peer = PeerID.from_base58(peer) if isinstance(peer, str) else peer

        async def transfer() -> float:
            _, reader, writer = await self.p2p.call_binary_stream_handler(peer, PROBE)
            try:
                start = time.perf_counter()
                writer.write(_HEADER.pack(n_bytes))
                payload, left = bytes(min(n_bytes, CHUNK)), n_bytes
                while left:
                    writer.write(payload[: min(left, CHUNK)])
                    left -= min(left, CHUNK)
                    await writer.drain()
                answer = await reader.readexactly(1)
                if answer == b"\x02":
                    raise ProbeBusy(f"peer {peer} is busy")
                if answer != b"\x01":
                    raise ConnectionError("bad probe answer")
                return time.perf_counter() - start
            finally:
                writer.close()

        return await asyncio.wait_for(transfer(), timeout_s)

    async def ping(self, peer: PeerID | str, timeout_s: float) -> float:
        """Seconds an empty probe took: the peer answers it even while it is in another probe (a
        liveness check: ``swarm.liveness``). Raises on no answer within ``timeout_s``."""
        return await self.probe_once(peer, 0, timeout_s)

    async def measure(self, peer: PeerID | str, target_s: float = 1.0, first_bytes: int = 64 << 10) -> tuple[float, float]:
        """(bandwidth_bps, rtt_s) to ``peer``: probes grow until one takes a tenth of ``target_s``; the
        last probe is then sized to take ``target_s`` (short probes read high: buffers absorb them)."""
        if self.busy:
            raise ProbeBusy("this node is in another probe")
        self.busy = True
        try:
            rtt = min([await self.probe_once(peer, 0) for _ in range(3)])
            n, limit = first_bytes, 30 * target_s + 10
            while True:
                elapsed = await self.probe_once(peer, n, limit)
                if elapsed >= target_s / 10 or n >= MAX_PROBE_BYTES:
                    break
                n = min(MAX_PROBE_BYTES, n * 4)
            n = min(MAX_PROBE_BYTES, max(n, int(n * target_s / max(elapsed - rtt, 1e-3))))
            # two full-length probes, keep the faster: interference (other traffic, a busy CPU on either
            # end) only ever slows a transfer down, so the faster one is the better capacity estimate
            elapsed = min([await self.probe_once(peer, n, limit) for _ in range(2)])
            return 8 * n / max(elapsed - rtt, 1e-6), rtt
        finally:
            self.busy = False
