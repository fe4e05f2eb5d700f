"""This node's reachability and the path of each of its links, kept fresh in the background of the
heartbeat (``swarm.net.reach``, docs/nat.md).

Every ``interval_s`` (and whenever its visible addresses change: a relay reservation adds a
``/p2p-circuit`` one) the node asks one helper at a time to dial it back: the bootstrap peers first,
then members that are public themselves. An answer from a helper that saw the request come through a
relay says nothing (the next helper is asked). Each heartbeat it also reads which of its connections
are relayed (``link_paths``) and its visible addresses, which go into its record so that peers behind
NAT can be dialled through the relay they reserved on; a member it holds no connection to is dialled
at the addresses its record names.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from swarm.loop import NodeLoop
from swarm.net.membership import MembershipView
from swarm.net.reach import ReachHelper, ask, connect, link_paths, listen_ports, reachability
from swarm.net.records import Reachability

logger = logging.getLogger(__name__)

DIAL_EVERY_S = 30.0   # a member this node holds no connection to is dialled at most this often


@dataclass(frozen=True)
class ConnectivityAdvert:
    """What connectivity puts in the member record."""

    maddrs: list[str]
    reachability: str | None
    paths: dict[str, str] | None


def peer_of(maddr: str) -> str | None:
    """The peer id a ``.../p2p/<id>`` multiaddr ends with (None: none)."""
    parts = maddr.rstrip("/").split("/")
    return parts[-1] if len(parts) >= 2 and parts[-2] == "p2p" else None


class Connectivity:
    """Reachability checks, link paths and dials on ``loop`` (see the module docstring); serves
    dial-backs for others meanwhile (``admit``: private swarms)."""

    def __init__(self, loop: NodeLoop, p2p, maddrs: list[str], helpers: list[str], interval_s: float,
                 admit=None):
        self.loop, self.p2p, self.interval_s = loop, p2p, interval_s
        self.helper = ReachHelper(p2p, admit)
        loop.call_sync(self.helper.serve())
        self.bootstrap = [p for p in (peer_of(m) for m in helpers) if p]
        self.maddrs, self.checked_maddrs = list(maddrs), None
        self.public: bool | None = None
        self.observed: str | None = None
        self.paths: dict[str, str] = {}
        self.checked_at = -float("inf")
        self.pending = None            # (helpers left to ask, future of the question in flight)
        self.reading = None            # future of (visible maddrs, link paths)
        self.dialled: dict[str, float] = {}
        self.reported: str | None = None

    def advert(self, members: list[str]) -> ConnectivityAdvert:
        state = reachability(self.public, self.paths, members)
        if state != self.reported and state is not None:
            self.reported = state
            behind = f" (seen as {self.observed})" if self.observed and state != Reachability.PUBLIC else ""
            logger.info(f"reachability: {state}{behind}")
        paths = {p: self.paths[p] for p in members if p in self.paths}
        return ConnectivityAdvert(list(self.maddrs), state, paths or None)

    def step(self, view: MembershipView, me: str) -> None:
        """Collect what finished; start what is due (never waits)."""
        self._collect_reading()
        self._collect_answer()
        members = [p for p in view.peers() if p != me]
        if self.reading is None:
            self.reading = self.loop.submit(self._read())
        now = time.monotonic()
        due = now - self.checked_at >= self.interval_s or self.maddrs != self.checked_maddrs
        if self.pending is None and due:
            public_members = [p for p in members if view.members[p].reachability == Reachability.PUBLIC]
            helpers = list(dict.fromkeys(self.bootstrap + public_members))
            if helpers:
                self.checked_at, self.checked_maddrs = now, list(self.maddrs)
                self._ask(helpers)
        for peer in members:   # not connected: dial it at the addresses its record names (a relay's, say)
            if peer not in self.paths and now - self.dialled.get(peer, -float("inf")) >= DIAL_EVERY_S \
                    and view.members[peer].maddrs:
                self.dialled[peer] = now
                self.loop.submit(connect(self.p2p, peer, view.members[peer].maddrs))

    def _ask(self, helpers: list[str]) -> None:
        ports = listen_ports(self.maddrs)
        self.pending = (helpers[1:], self.loop.submit(ask(self.p2p, helpers[0], ports)), helpers[0])

    def _collect_answer(self) -> None:
        if self.pending is None or not self.pending[1].done():
            return
        left, future, helper = self.pending
        self.pending = None
        error = future.exception() if not future.cancelled() else None
        answer = future.result() if not future.cancelled() and error is None else None
        if answer is not None and not answer.relayed:
            self.public, self.observed = answer.public, answer.observed
            return
        logger.debug(f"dial-back by {helper[-8:]}: {error!r}" if error else f"dial-back by {helper[-8:]} came via a relay")
        if left:
            self._ask(left)

    async def _read(self) -> tuple[list[str], dict[str, str]]:
        maddrs = [str(a) for a in await self.p2p.get_visible_maddrs(latest=True)]
        return maddrs, link_paths(await self.p2p.list_peers())

    def _collect_reading(self) -> None:
        if self.reading is None or not self.reading.done():
            return
        future, self.reading = self.reading, None
        if not future.cancelled() and future.exception() is None:
            maddrs, self.paths = future.result()
            if maddrs:
                self.maddrs = maddrs

    def close(self) -> None:
        for future in [f for f in (self.reading, self.pending[1] if self.pending else None) if f is not None]:
            future.cancel()
        try:
            self.loop.call_sync(self.helper.close(), 5)
        except Exception:   # the daemon may be gone already
            pass
