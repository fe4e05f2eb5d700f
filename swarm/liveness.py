"""Liveness from the network: a member is live while it answers direct probes, whatever its record says.

A member record can outlive its writer: one stored once with a far expiration stays in the DHT, and
readers cap it at ``ttl_s`` after its ``updated_at`` (``swarm.net.membership``), but a record kept fresh by
a broken or hostile writer that does not serve anything would still name a member that never votes,
never trains and stalls every epoch. So each node pings every member it sees (an empty
``swarm.probe.v1`` probe, answered even while the peer is busy: ``swarm.net.probe``) every
``ttl_s / PINGS_PER_TTL`` seconds, and a member that has answered nothing for ``ttl_s`` since it was
first seen or last answered, with at least ``MIN_FAILURES`` pings unanswered meanwhile, is gone: left out
of the view the election and the pipeline see. It is pinged on, and comes back the moment it answers.

A member whose last ``MIN_FAILURES`` pings in a row went unanswered is *unreachable* from here
(``unreachable``): after a failure the next ping goes out at once and waits at most
``UNREACHABLE_PING_S``, so a neighbour whose traffic is dropped is named within about
``interval_s + 2 * UNREACHABLE_PING_S``. The node advertises those peers (``unreachable`` in its
record); planning prices their links as cut (``swarm.net.membership.MembershipView.bandwidth``), and a
member is left out of the view only when most members say it is gone (``agreed_gone``), so that one
cut link does not split the swarm's views.

The failure count keeps a stalled prober (this node's own heartbeat held up for longer than a TTL)
from declaring everyone gone at once: silence is only believed when pings went out and failed.

Pure: the caller sends the pings and reports what came back (``swarm.node.probes.ProbeSchedule``); times are the
caller's clock (monotonic seconds); no I/O but logging.
"""
from __future__ import annotations

import logging
from collections.abc import Container, Iterable
from dataclasses import dataclass, field

from swarm.refusals import short

logger = logging.getLogger(__name__)

PINGS_PER_TTL = 3     # a member is pinged every ttl_s / 3, and each ping waits at most ttl_s / 3
MIN_FAILURES = 2      # unanswered pings before silence counts (the ping timeouts must have run out)
MAX_PINGS = 64        # pings in flight at once, whatever the number of members
UNREACHABLE_PING_S = 5.0   # a ping waits at most this long (an empty probe takes one round trip)


@dataclass
class Liveness:
    """For each peer: when it was first seen (in the view), last pinged, last answered, and how many
    pings went unanswered since. ``me`` is never gone."""

    ttl_s: float
    me: str = ""
    first_seen: dict[str, float] = field(default_factory=dict)
    in_view_at: dict[str, float] = field(default_factory=dict)
    pinged_at: dict[str, float] = field(default_factory=dict)
    answered_at: dict[str, float] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    reported: set[str] = field(default_factory=set)   # peers logged as gone (a line when they come back)

    @property
    def interval_s(self) -> float:
        """How often a member is pinged."""
        return self.ttl_s / PINGS_PER_TTL

    @property
    def timeout_s(self) -> float:
        """How long a ping waits."""
        return min(self.interval_s, UNREACHABLE_PING_S)

    def observe(self, peers: Iterable[str], now: float) -> None:
        """The peers whose records are in the view now. A peer out of the view for a TTL is forgotten,
        so one that comes back is a new peer (seen now) again."""
        for peer in peers:
            if peer != self.me:
                self.first_seen.setdefault(peer, now)
                self.in_view_at[peer] = now
        for peer in [p for p, t in self.in_view_at.items() if now - t > self.ttl_s]:
            self.forget(peer)

    def forget(self, peer: str) -> None:
        for table in (self.first_seen, self.in_view_at, self.pinged_at, self.answered_at, self.failures):
            table.pop(peer, None)
        self.reported.discard(peer)

    def due(self, peers: Iterable[str], now: float, pending: Container[str] = ()) -> list[str]:
        """Peers to ping now: not pinged within ``interval_s`` (``timeout_s`` after a failed ping) and no
        ping of theirs in flight, the longest unpinged first."""
        due = [p for p in peers if p != self.me and p not in pending
               and now - self.pinged_at.get(p, -float("inf")) >= (self.timeout_s if self.failures.get(p) else self.interval_s)]
        return sorted(due, key=lambda p: (self.pinged_at.get(p, -float("inf")), p))

    def pinged(self, peer: str, now: float) -> None:
        self.pinged_at[peer] = now

    def answered(self, peer: str, now: float) -> None:
        """The peer answered a direct probe (a ping, a bandwidth probe)."""
        self.answered_at[peer] = max(now, self.answered_at.get(peer, now))
        self.failures[peer] = 0
        if peer in self.reported:
            self.reported.discard(peer)
            logger.info(f"member {short(peer)} answers probes again")

    def failed(self, peer: str, now: float) -> None:
        """A ping to the peer got no answer in time (or its stream failed)."""
        self.failures[peer] = self.failures.get(peer, 0) + 1

    def silent_s(self, peer: str, now: float) -> float:
        """Seconds since the peer was first seen or last answered, whichever is later."""
        since = max(self.first_seen.get(peer, now), self.answered_at.get(peer, -float("inf")))
        return max(0.0, now - since)

    def unreachable(self) -> list[str]:
        """Peers whose last ``MIN_FAILURES`` pings in a row went unanswered."""
        return sorted(p for p, n in self.failures.items() if n >= MIN_FAILURES and p in self.first_seen)

    def gone(self, peer: str, now: float) -> bool:
        return (peer != self.me and peer in self.first_seen and self.silent_s(peer, now) >= self.ttl_s
                and self.failures.get(peer, 0) >= MIN_FAILURES)

    def gone_among(self, peers: Iterable[str], now: float) -> set[str]:
        """The gone ones of ``peers``; each newly gone peer is logged once."""
        gone = {p for p in peers if self.gone(p, now)}
        for peer in sorted(gone - self.reported):
            self.reported.add(peer)
            logger.info(f"member {short(peer)} answers no probe for {self.silent_s(peer, now):.0f} s: treated as gone")
        return gone


def agreed_gone(gone_here: set[str], me: str, unreachable: dict[str, list[str] | None]) -> set[str]:
    """The peers of ``gone_here`` (gone by this node's pings) that most members say they cannot reach:
    ``unreachable`` holds each member's advertised list (this node counts as saying so). A peer cut off
    from this node alone stays in the view (its link is priced as cut instead), so every member keeps
    the same view through a partial partition; a dead or mute one is gone for all."""
    members, out = set(unreachable) | {me}, set()
    for peer in gone_here:
        others = members - {peer}
        says = sum(q == me or peer in (unreachable.get(q) or ()) for q in others)
        if 2 * says > len(others):
            out.add(peer)
    return out
