"""Peer-to-peer transport: the only hivemind.p2p user. For now: bandwidth and RTT probes.

Probe protocol ``swarm.probe.v1`` on a libp2p binary stream: the caller sends an 8-byte big-endian
length ``n`` (at most ``MAX_PROBE_BYTES``) and ``n`` bytes; the callee reads them and answers one
byte. RTT = time of an empty probe; bandwidth = 8 n / (time of an n-byte probe - RTT), with ``n``
grown until the transfer takes about ``target_s``. The callee bounds every read in time, so a peer
that stalls or lies about ``n`` costs nothing but a closed stream.
"""
from __future__ import annotations

import asyncio
import struct
import time

from hivemind.p2p import P2P, PeerID

PROBE = "swarm.probe.v1"
MAX_PROBE_BYTES = 64 << 20
CHUNK = 1 << 20
_HEADER = struct.Struct(">Q")


async def _serve_probe(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       timeout_s: float = 30.0) -> None:
    try:
        (n,) = _HEADER.unpack(await asyncio.wait_for(reader.readexactly(_HEADER.size), timeout_s))
        if n > MAX_PROBE_BYTES:
            return  # hostile or broken: close without reading
        deadline = time.monotonic() + timeout_s
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
        writer.close()


async def serve_probes(p2p: P2P) -> None:
    await p2p.add_binary_stream_handler(PROBE, _serve_probe)


async def probe_once(p2p: P2P, peer: PeerID, n_bytes: int, timeout_s: float = 30.0) -> float:
    """Seconds from the first byte sent to the callee's answer."""
    async def transfer() -> float:
        _, reader, writer = await p2p.call_binary_stream_handler(peer, PROBE)
        try:
            start = time.perf_counter()
            writer.write(_HEADER.pack(n_bytes))
            payload = bytes(min(n_bytes, CHUNK))
            left = n_bytes
            while left:
                writer.write(payload[: min(left, CHUNK)])
                left -= min(left, CHUNK)
                await writer.drain()
            if await reader.readexactly(1) != b"\x01":
                raise ConnectionError("bad probe answer")
            return time.perf_counter() - start
        finally:
            writer.close()

    return await asyncio.wait_for(transfer(), timeout_s)


async def measure_link(p2p: P2P, peer: PeerID, target_s: float = 1.0, first_bytes: int = 64 << 10) -> tuple[float, float]:
    """(bandwidth_bps, rtt_s) to ``peer``: probes grow 4x until one takes ``target_s / 4`` or more."""
    rtt = min([await probe_once(p2p, peer, 0) for _ in range(3)])
    n, elapsed = first_bytes, 0.0
    while True:
        elapsed = await probe_once(p2p, peer, n, timeout_s=30 * target_s + 10)
        if elapsed >= target_s / 4 or n >= MAX_PROBE_BYTES:
            break
        n = min(MAX_PROBE_BYTES, max(n * 4, int(n * target_s / max(elapsed, 1e-3))))
    return 8 * n / max(elapsed - rtt, 1e-6), rtt
