"""Coordinator-free election of one plan per epoch: a pure state machine (observations in, commands
out, no I/O). The protocol and its guarantees are in docs/election.md; in short:

- Every member publishes its *vote* (epoch, plan hash) and its last *commit*; a proposer also
  publishes its *ballot* (epoch, plan hash, proposer, members = everyone it sees live).
- Only the live member with the smallest peer id proposes, and only when an election is needed: no
  plan yet (and at least ``min_members`` live), a plan member is gone, members outside the plan have been live for ``join_batch_s``
  (after ``min_epoch_s`` of the current epoch), the runtime reports drift, or a link the plan uses is
  cut (``report_cut``: one end cannot reach the other; at once, whatever ``min_epoch_s``). A ballot's epoch is one
  above every epoch the proposer has seen.
- A member votes for the best ballot it sees that names it (highest epoch, then smallest proposer);
  it votes at most once per epoch and never for an epoch below one it voted in.
- A ballot commits when *every* member it names votes for it (the quorum is the ballot's whole
  electorate). Two ballots of one epoch that share a member can therefore never both commit.
- A proposer whose ballot has not committed within ``election_timeout_s`` proposes again one epoch
  higher (members that died drop out of the live set after their record's TTL).

``leader="rotating"`` (what nodes run; the default keeps the rules above) hardens this against a hostile
member (docs/election.md, "A hostile member"): each epoch has one *rightful* proposer, drawn by hash from
the members of the plan most live members run (seeded with that plan's hash, so no one can grind a peer
id to win it); only its ballot gets votes; when no rightful ballot commits within ``election_timeout_s``
the next epoch's proposer takes over; epochs further than ``epoch_window`` above the swarm's committed
one are ignored (``Ignored``); a ballot that does not name this node is committed only when most live
members already run it.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Ballot:
    epoch: int
    plan_hash: str
    proposer: str
    members: tuple[str, ...]   # sorted: the electorate, and everyone the plan places

    @property
    def key(self) -> tuple[int, str]:
        return (self.epoch, self.plan_hash)


@dataclass(frozen=True)
class PeerState:
    """What one member publishes about the election."""

    ballot: Ballot | None = None
    vote: tuple[int, str] | None = None
    committed: tuple[int, str] | None = None


@dataclass(frozen=True)
class ElectionSettings:
    join_batch_s: float = 20.0       # members outside the plan wait this long, so joins batch up
    min_epoch_s: float = 60.0        # no join- or drift-triggered epoch sooner than this after a commit
    election_timeout_s: float = 30.0 # a ballot not committed by then is retried one epoch higher
    min_members: int = 1             # the first plan waits until this many members are live
    leader: str = "smallest"         # "smallest": the smallest live id proposes; "rotating": see the module docstring
    epoch_window: int | None = None  # claims of epochs more than this above the swarm's committed epoch are ignored
    probe_wait_s: float = 30.0       # the first plan waits at most this long past the join batch for unmeasured links


# --- commands ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ComputePlan:
    """Plan for exactly these members and hand the result back with ``Election.proposed``."""

    epoch: int
    members: tuple[str, ...]


@dataclass(frozen=True)
class Publish:
    """Advertise this state (vote, commit, own ballot) to the swarm."""

    state: PeerState


@dataclass(frozen=True)
class Commit:
    """A ballot committed: run its plan."""

    ballot: Ballot
    reason: str


@dataclass(frozen=True)
class Ignored:
    """A member's claim was not believed (say so once): ``what`` names it."""

    peer: str
    what: str


def rank(peer: str, epoch: int, seed: str) -> str:
    """Order of the proposers of ``epoch`` (smallest first): a hash of the peer id, the epoch and the
    plan the swarm runs, so nobody can pick a peer id that leads an epoch of a plan not made yet."""
    return hashlib.sha256(f"{seed}|{epoch}|{peer}".encode()).hexdigest() if seed else peer


@dataclass
class Election:
    me: str
    settings: ElectionSettings = field(default_factory=ElectionSettings)
    committed: Ballot | None = None
    committed_at: float = 0.0
    ballot: Ballot | None = None          # my own proposal, if any
    vote: tuple[int, str] | None = None
    asked: tuple[int, tuple[str, ...]] | None = None   # last ComputePlan issued
    proposed_at: float = 0.0
    outside_since: float | None = None    # when members outside the committed plan were first seen
    drift: bool = False
    cut: bool = False
    unmeasured: bool = False          # some pair of live members has not measured its link yet (first plan only)
    reason: str = ""
    need_base: int | None = None    # rotating: the highest epoch seen when the current need for an election began ...
    need_since: float = 0.0         # ... and since when: every election_timeout_s without a commit, the next proposer

    def state(self) -> PeerState:
        return PeerState(self.ballot, self.vote, self.committed.key if self.committed else None)

    def report_drift(self) -> None:
        """The runtime predicts that re-planning pays off (compute or bandwidth moved)."""
        self.drift = True

    def report_cut(self) -> None:
        """A link the committed plan uses is cut: re-plan now (``min_epoch_s`` does not hold it back)."""
        self.cut = True

    def report_unmeasured(self, pending: bool) -> None:
        """Whether some pair of live members has neither measured nor given up on its link: the first
        plan waits for it (at most ``probe_wait_s`` past the join batch), so it prices links it knows."""
        self.unmeasured = pending

    def proposed(self, ballot: Ballot) -> list:
        """The plan asked for by ``ComputePlan`` is ready: publish it as my ballot (and vote)."""
        if self.asked != (ballot.epoch, ballot.members) or ballot.proposer != self.me:
            return []  # stale answer: a newer request superseded it
        self.ballot = ballot
        return [Publish(self.state())]

    def observe(self, now: float, peers: dict[str, PeerState]) -> list:
        """One look at the live members' published states (``peers`` includes this node)."""
        before = self.state()
        peers = {**peers, self.me: before}
        out: list = []
        rotating = self.settings.leader == "rotating"
        if self.settings.epoch_window is not None:
            peers = self._within_window(peers, out)
        live = tuple(sorted(peers))
        ballots = {b.key: b for p, s in peers.items() if (b := s.ballot) is not None and b.proposer == p}
        running = self._running(peers) if rotating else None

        # 1. commit: the highest ballot all of whose members voted for it
        mine = self.committed.epoch if self.committed else 0
        for ballot in sorted(ballots.values(), key=lambda b: (-b.epoch, b.proposer)):
            if ballot.epoch <= mine:
                break
            if rotating and self.me not in ballot.members and (running is None or ballot.key != running[0]):
                continue   # a plan without me: joined only once most live members run it
            if all(m in peers and peers[m].vote == ballot.key for m in ballot.members):
                self.committed, self.committed_at, self.drift, self.outside_since = ballot, now, False, None
                self.cut = False
                out.append(Commit(ballot, self.reason or "joined a committed plan"))
                self.reason = ""
                break

        # 2. is an election needed?
        current, reason = self.committed, ""
        outside = set(live) - set(current.members) if current else set(live)
        self.outside_since = (self.outside_since if self.outside_since is not None else now) if outside else None
        batched = bool(outside) and now - self.outside_since >= self.settings.join_batch_s
        settled = current is None or now - self.committed_at >= self.settings.min_epoch_s
        if current is not None and set(current.members) - set(live):
            reason = "a member left"
        elif current is not None and self.cut:
            reason = "a planned link is cut"
        elif batched and settled and (current is not None or len(live) >= self.settings.min_members):
            probing = current is None and self.unmeasured and \
                now - self.outside_since < self.settings.join_batch_s + self.settings.probe_wait_s
            reason = "" if probing else "members joined" if current else "first plan"
        elif current is not None and self.drift and settled:
            reason = "measurements drifted"

        # 3. propose (the smallest live peer id only): once per need, again after a timeout
        if rotating:
            out += self._propose_rotating(now, reason, peers, ballots, running, mine)
        elif reason and self.me == live[0]:
            self.reason = reason
            timed_out = now - self.proposed_at >= self.settings.election_timeout_s
            waiting = self.asked is not None and self.asked[0] > mine and not timed_out and (
                self.ballot is None or self.ballot.epoch < self.asked[0] or not set(self.ballot.members) - set(live))
            if not waiting:
                seen = [mine] + [b.epoch for b in ballots.values()] + [s.vote[0] for s in peers.values() if s.vote] \
                    + [s.committed[0] for s in peers.values() if s.committed]
                self.asked, self.proposed_at = (max(seen) + 1, live), now
                out.append(ComputePlan(max(seen) + 1, live))

        # 4. vote: the best ballot naming me (highest epoch, then smallest proposer); once per epoch, never backwards
        candidates = [b for b in ballots.values() if self.me in b.members and b.epoch > mine and b.proposer in peers
                      and (not rotating or b.proposer == self._leader(b.epoch, peers, running))]
        if candidates:
            best = min(candidates, key=lambda b: (-b.epoch, b.proposer))
            if self.vote is None or best.epoch > self.vote[0]:
                self.vote = best.key
        if out or self.state() != before:
            out.append(Publish(self.state()))
        return out

    # --- rotating proposers (leader="rotating") -------------------------------------------------------

    def _running(self, peers: dict[str, PeerState]) -> tuple[tuple[int, str], tuple[str, ...]] | None:
        """The plan most live members run (ties: the higher epoch) and who may propose the next one:
        the live members it names (as this node or a visible ballot knows them), else those running it."""
        counts = Counter(s.committed for s in peers.values() if s.committed)
        mine = self.committed.key if self.committed else None
        believed = [k for k in counts if counts[k] >= 2 or k == mine or len(peers) <= 2]   # one stranger's word is not a plan
        if not believed:
            return None
        key = max(believed, key=lambda k: (counts[k], k == mine, k))
        named = self.committed.members if self.committed and self.committed.key == key else next(
            (s.ballot.members for s in peers.values() if s.ballot and s.ballot.key == key), None)
        running = [p for p, s in peers.items() if s.committed == key]
        eligible = [p for p in (named or running) if p in peers] or running
        return key, tuple(sorted(eligible))

    def _leader(self, epoch: int, peers: dict[str, PeerState], running) -> str:
        """The rightful proposer of ``epoch``: the first of the eligible members by ``rank``."""
        if running is None:
            return min(peers)
        (_, seed), eligible = running
        return min(eligible, key=lambda p: rank(p, epoch, seed))

    def _propose_rotating(self, now: float, reason: str, peers, ballots, running, mine: int) -> list:
        if not reason:
            self.need_base = None
            return []
        self.reason = reason
        seen = [mine] + [b.epoch for b in ballots.values()] + [s.vote[0] for s in peers.values() if s.vote] \
            + [s.committed[0] for s in peers.values() if s.committed]
        base = max(seen)
        if self.need_base != base:   # something new: a ballot, a vote, a commit
            self.need_base, self.need_since = base, now
        waited = int((now - self.need_since) // self.settings.election_timeout_s)
        pending = next((b for b in ballots.values() if b.epoch == base and set(b.members) <= set(peers)
                        and b.proposer == self._leader(b.epoch, peers, running)), None)
        target = base + waited + (0 if pending else 1)   # a rightful ballot gets one time-out to commit
        members = set(peers)
        if pending is not None and self.vote == pending.key:   # it timed out, yet this node found it good:
            members -= {m for m in pending.members if m != self.me and peers[m].vote != pending.key}   # without the abstainers
        members = tuple(sorted(members))
        if target > max(base, mine) and self._leader(target, peers, running) == self.me and self.asked != (target, members):
            self.asked, self.proposed_at = (target, members), now
            return [ComputePlan(target, members)]
        return []

    def _within_window(self, peers: dict[str, PeerState], out: list) -> dict[str, PeerState]:
        """Members' claims with epochs past the window dropped (an ``Ignored`` for each)."""
        running = self._running(peers)   # the plan most members run: one member's claim does not move it
        own = [self.committed.epoch if self.committed else 0, self.vote[0] if self.vote else 0,
               self.asked[0] if self.asked else 0, running[0][0] if running else 0]
        top = max(own) + self.settings.epoch_window
        kept = {}
        for p, s in peers.items():
            bad = [(name, pair[0]) for name, pair in (("ballot", s.ballot and s.ballot.key), ("vote", s.vote),
                                                      ("commit", s.committed)) if pair and pair[0] > top]
            if bad and p != self.me:
                out.append(Ignored(p, ", ".join(f"{name} in epoch {e} (more than {self.settings.epoch_window} "
                                                f"above the swarm's)" for name, e in bad)))
                s = PeerState(None if s.ballot and s.ballot.epoch > top else s.ballot,
                              None if s.vote and s.vote[0] > top else s.vote,
                              None if s.committed and s.committed[0] > top else s.committed)
            kept[p] = s
        return kept
