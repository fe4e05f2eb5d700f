"""Reachability: can peers dial this node, and how does each of its links run (docs/nat.md).

Dial-back protocol ``swarm.reach.v1`` (one request per stream, framed as ``swarm.net.streams``, a
``swarm.wire`` frame without tensors): the asker sends ``reach`` {ports}: the TCP ports it listens
on (at most ``MAX_PORTS``, comma-separated: wire meta values are scalars). The helper opens a plain
TCP connection to the *observed* IP of that
stream (the address the request came from, never another host: a helper cannot be used to scan a
third party) at each of those ports and at the observed port, each bounded by ``DIAL_TIMEOUT_S``, and
answers ``reached`` {observed, open}: the observed ``ip:port`` and the ports that accepted (comma-separated). Behind a
NAT none does (the router drops what it did not see go out); a relayed request has no IP to dial and
is answered with no port open. The daemon's own AutoNAT says nothing through its control API, hence
this; hole punching itself is the daemon's (DCUtR).

A link is ``relayed`` when every connection the daemon holds to the peer is a ``/p2p-circuit`` one,
else ``direct`` (``link_paths``).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from swarm.errors import RemoteProtocolError
from swarm.net.records import LinkPath, Reachability
from swarm.net.streams import serve_stream, stream_caller
from swarm.wire import pack, unpack

logger = logging.getLogger(__name__)

PROTOCOL = "swarm.reach.v1"
REACH, REACHED = "reach", "reached"
MAX_PORTS = 4
DIAL_TIMEOUT_S = 4.0
MAX_FRAME_BYTES = 4096
TIMEOUT_S = 3 * DIAL_TIMEOUT_S


@dataclass(frozen=True)
class Reached:
    """A helper's answer: the address it saw the request come from, and the ports that accepted."""

    observed: str
    open: tuple[int, ...]

    @property
    def public(self) -> bool:
        return bool(self.open)

    @property
    def relayed(self) -> bool:
        """The request reached the helper through a relay: it saw no IP (``observed`` is the multiaddr)."""
        return self.observed.startswith("/")


def listen_ports(maddrs: list[str]) -> list[int]:
    """The TCP ports of a node's ``/ip4|ip6/.../tcp/<port>`` listen addresses (no relay addresses)."""
    ports = [where[1] for where in map(observed_host, maddrs) if where is not None]
    return list(dict.fromkeys(ports))[:MAX_PORTS]


def observed_host(addr: str) -> tuple[str, int] | None:
    """(ip, port) of a stream's remote multiaddr, or None for a relayed one (or no TCP/IP address)."""
    parts = str(addr).split("/")
    if "p2p-circuit" in parts or len(parts) < 5 or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp" \
            or not parts[4].isdigit():
        return None
    return parts[2], int(parts[4])


async def dial(host: str, port: int, timeout_s: float = DIAL_TIMEOUT_S) -> bool:
    """A TCP connection to ``host:port`` opens within ``timeout_s`` (it is closed at once)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


def port_list(ports: list[int]) -> str:
    return ",".join(str(p) for p in ports)


def parse_ports(text, limit: int = MAX_PORTS) -> list[int]:
    """Ports from their comma-separated form; ``RemoteProtocolError`` for anything else."""
    parts = text.split(",") if isinstance(text, str) and text else []
    if not isinstance(text, str) or len(parts) > limit or not all(p.isdigit() and 0 < int(p) < 65536 for p in parts):
        raise RemoteProtocolError(f"reach: expected at most {limit} comma-separated TCP ports")
    return [int(p) for p in parts]


class ReachHelper:
    """Answers dial-back requests on ``p2p`` (public members and bootstrap peers serve it)."""

    def __init__(self, p2p, admit=None):
        self.p2p, self.admit = p2p, admit
        self.answered = 0

    async def serve(self) -> None:
        await self.p2p.add_binary_stream_handler(PROTOCOL, self._handle)

    async def _handle(self, stream_info, reader, writer) -> None:
        where = observed_host(stream_info.addr)

        async def answer(frame: bytes, peer: str) -> bytes:
            request = unpack(frame)
            if request.kind != REACH:
                raise RemoteProtocolError(f"reach request of kind {request.kind!r}")
            ports = parse_ports(request.meta.get("ports"))
            if where is None:
                return pack(REACHED, {"observed": str(stream_info.addr)[:200], "open": ""}, {})[0]
            host, port = where
            candidates = list(dict.fromkeys([*ports, port]))
            opened = await asyncio.gather(*(dial(host, p) for p in candidates))
            self.answered += 1
            return pack(REACHED, {"observed": f"{host}:{port}", "open": port_list([p for p, ok in zip(candidates, opened) if ok])}, {})[0]

        await serve_stream(stream_info, reader, writer, answer=answer, limit=MAX_FRAME_BYTES, timeout_s=TIMEOUT_S,
                           admit=self.admit, failed=lambda peer, e: logger.info(f"dial-back for {peer[-8:]}: {e!r}"))

    async def close(self) -> None:
        await self.p2p.remove_binary_stream_handler(PROTOCOL)


async def ask(p2p, helper: str, ports: list[int]) -> Reached:
    """Ask ``helper`` (a peer id) to dial this node back at ``ports``; raises on no (or a bad) answer."""
    call = stream_caller(p2p, MAX_FRAME_BYTES, TIMEOUT_S, PROTOCOL)
    reply = unpack(await call(helper, pack(REACH, {"ports": port_list(ports[:MAX_PORTS])}, {})[0]))
    observed = reply.meta.get("observed")
    if reply.kind != REACHED or not isinstance(observed, str):
        raise RemoteProtocolError(f"peer {helper[-8:]}: malformed reach answer")
    return Reached(observed[:200], tuple(parse_ports(reply.meta.get("open"), MAX_PORTS + 1)))


async def connect(p2p, peer: str, maddrs: list[str]) -> bool:
    """Ask the daemon to connect to ``peer`` at ``maddrs`` (a member's record: a relay's circuit address
    among them); False when it could not (nothing is raised: the next heartbeat may try again)."""
    from hivemind.p2p import PeerID
    from multiaddr import Multiaddr

    addrs = []
    for m in maddrs:   # the daemon wants them without the /p2p/<id> of the peer itself
        try:
            addrs.append(Multiaddr(m[: -len(f"/p2p/{peer}")] if m.endswith(f"/p2p/{peer}") else m))
        except Exception:   # the multiaddr package raises several types
            continue
    try:
        await p2p._client.connect(PeerID.from_base58(peer), addrs)   # hivemind's P2P has no public connect
        return True
    except Exception as e:
        logger.debug(f"connecting to {peer[-8:]}: {e!r}")
        return False


def link_paths(peers) -> dict[str, str]:
    """``LinkPath`` by peer id from the daemon's ``list_peers`` (each with the addresses of its connections)."""
    out = {}
    for info in peers:
        addrs = [str(a) for a in info.addrs]
        if addrs:
            relayed = all("p2p-circuit" in a for a in addrs)
            out[info.peer_id.to_base58()] = (LinkPath.RELAYED if relayed else LinkPath.DIRECT).value
    return out


def reachability(public: bool | None, paths: dict[str, str], members) -> str | None:
    """``Reachability`` of this node: public if a dial-back reached it; else relayed when a link to one
    of ``members`` runs through a relay, NAT otherwise (None: no dial-back answered yet)."""
    if public is None:
        return None
    if public:
        return Reachability.PUBLIC.value
    relayed = any(paths.get(m) == LinkPath.RELAYED for m in members)
    return (Reachability.RELAYED if relayed else Reachability.NAT).value
