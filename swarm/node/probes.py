"""Link measurements and liveness pings in the background of the heartbeat (``swarm.net.probe``,
``swarm.liveness``).

A peer never measured is measured right away, one probe at a time; after that one peer is probed per
``interval_s``, with jitter so that peers rarely collide. Each probe takes about a second of the
link, so it is rare while training. Results are smoothed: each new measurement is averaged with the
one before (an EMA with weight 1/2). Every member is also pinged (``alive``), and one that answers
nothing for a TTL is left out of the view.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from swarm.liveness import MAX_PINGS, Liveness, agreed_gone
from swarm.loop import NodeLoop
from swarm.net.membership import MembershipView
from swarm.net.probe import PROBE, LinkProber

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkAdvert:
    """What the probes put in the member record: measured bits/s and round trips, by peer id, and the
    members that answer no ping (``Liveness.unreachable``)."""

    bandwidth_bps: dict[str, float]
    rtt_s: dict[str, float]
    unreachable: list[str] | None = None


class ProbeSchedule:
    """Measures links and pings members on ``loop``, never blocking the heartbeat (see the module
    docstring); serves ``swarm.probe.v1`` on ``p2p`` meanwhile (``admit``: private swarms)."""

    def __init__(self, loop: NodeLoop, p2p, interval_s: float, admit: Callable[[str], bool] | None = None):
        self.loop, self.p2p = loop, p2p
        self.links = LinkProber(p2p, admit=admit)
        loop.call_sync(self.links.serve())
        self.interval_s = interval_s
        self.next_at = 0.0
        self.pending = None   # (peer, future) of the bandwidth probe in flight
        self.bandwidth_bps: dict[str, float] = {}
        self.rtt_s: dict[str, float] = {}
        self.probed_at: dict[str, float] = {}
        self.liveness: Liveness | None = None
        self.pings: dict[str, object] = {}   # peer -> the future of its ping in flight

    def advert(self) -> LinkAdvert:
        return LinkAdvert(dict(self.bandwidth_bps), dict(self.rtt_s), self.unreachable() or None)

    def unreachable(self) -> list[str]:
        """Members whose last pings went unanswered (``swarm.liveness``)."""
        return self.liveness.unreachable() if self.liveness is not None else []

    def alive(self, view: MembershipView, me: str, ttl_s: float) -> MembershipView:
        """``view`` without the members that answer no direct probe, where most members agree
        (``swarm.liveness``): collects the finished pings and sends the due ones (at most ``MAX_PINGS``
        in flight; never waits for one)."""
        now = time.monotonic()
        if self.liveness is None or self.liveness.ttl_s != ttl_s or self.liveness.me != me:
            self.liveness = Liveness(ttl_s, me)
        live = self.liveness
        for peer, future in list(self.pings.items()):
            if future.done():
                del self.pings[peer]
                (live.failed if future.cancelled() or future.exception() is not None else live.answered)(peer, now)
        peers = [p for p in view.peers() if p != me]
        live.observe(peers, now)
        for peer in live.due(peers, now, self.pings)[:max(0, MAX_PINGS - len(self.pings))]:
            live.pinged(peer, now)
            try:
                coro = self.links.ping(peer, live.timeout_s)
            except Exception:   # not a peer id: never answers
                live.failed(peer, now)
                continue
            self.pings[peer] = self.loop.submit(coro)
        gone = agreed_gone(live.gone_among(peers, now), me, {p: r.unreachable for p, r in view.members.items()})
        return MembershipView({p: r for p, r in view.members.items() if p not in gone}, view.taken_at) if gone else view

    def step(self, peers: Callable[[], list[str]]) -> None:
        """Collect a finished probe; start the next one when due (a new peer, else the least recently probed)."""
        if self.pending is not None and self.pending[1].done():
            peer, future = self.pending
            self.pending = None
            if future.exception() is None:
                bandwidth, rtt = future.result()
                if self.liveness is not None:
                    self.liveness.answered(peer, time.monotonic())
                for table, value in ((self.bandwidth_bps, bandwidth), (self.rtt_s, rtt)):
                    table[peer] = (table.pop(peer) + value) / 2 if peer in table else value  # newest last
                logger.info(f"link to {peer[-6:]}: {bandwidth / 1e6:.3g} Mbit/s, rtt {rtt * 1e3:.3g} ms")
        if self.pending is None:
            candidates = peers()
            fresh = [p for p in candidates if p not in self.probed_at]
            if not candidates or (not fresh and time.monotonic() < self.next_at):
                return
            peer = min(fresh) if fresh else min(candidates, key=lambda p: (self.probed_at[p], p))
            self.probed_at[peer] = now = time.monotonic()
            self.next_at = now + self.interval_s * random.uniform(0.5, 1.5)  # jitter: peers rarely collide
            self.pending = (peer, self.loop.submit(asyncio.wait_for(self.links.measure(peer), 60)))

    def close(self) -> None:
        """Stop serving probes and drop the ones in flight (the p2p replica and the loop are the node's)."""
        for future in [*self.pings.values(), *([self.pending[1]] if self.pending else [])]:
            future.cancel()
        self.pings.clear()
        self.pending = None
        try:
            self.loop.call_sync(self.p2p.remove_binary_stream_handler(PROBE), 5)
        except Exception:   # the daemon may be gone already
            pass
