"""Coordinator-free election of one plan per epoch: a pure state machine (observations in, commands
out, no I/O). The protocol and its guarantees are in docs/election.md; in short:

- Every member publishes its *vote* (epoch, plan hash) and its last *commit*; a proposer also
  publishes its *ballot* (epoch, plan hash, proposer, members = everyone it sees live).
- Only the live member with the smallest peer id proposes, and only when an election is needed: no
  plan yet (and at least ``min_members`` live), a plan member is gone, members outside the plan have been live for ``join_batch_s``
  (after ``min_epoch_s`` of the current epoch), or the runtime reports drift. A ballot's epoch is one
  above every epoch the proposer has seen.
- A member votes for the best ballot it sees that names it (highest epoch, then smallest proposer);
  it votes at most once per epoch and never for an epoch below one it voted in.
- A ballot commits when *every* member it names votes for it (the quorum is the ballot's whole
  electorate). Two ballots of one epoch that share a member can therefore never both commit.
- A proposer whose ballot has not committed within ``election_timeout_s`` proposes again one epoch
  higher (members that died drop out of the live set after their record's TTL).
"""
from __future__ import annotations

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
    reason: str = ""

    def state(self) -> PeerState:
        return PeerState(self.ballot, self.vote, self.committed.key if self.committed else None)

    def report_drift(self) -> None:
        """The runtime predicts that re-planning pays off (compute or bandwidth moved)."""
        self.drift = True

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
        live = tuple(sorted(peers))
        out: list = []
        ballots = {b.key: b for p, s in peers.items() if (b := s.ballot) is not None and b.proposer == p}

        # 1. commit: the highest ballot all of whose members voted for it
        mine = self.committed.epoch if self.committed else 0
        for ballot in sorted(ballots.values(), key=lambda b: (-b.epoch, b.proposer)):
            if ballot.epoch <= mine:
                break
            if all(m in peers and peers[m].vote == ballot.key for m in ballot.members):
                self.committed, self.committed_at, self.drift, self.outside_since = ballot, now, False, None
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
        elif batched and settled and (current is not None or len(live) >= self.settings.min_members):
            reason = "members joined" if current else "first plan"
        elif current is not None and self.drift and settled:
            reason = "measurements drifted"

        # 3. propose (the smallest live peer id only): once per need, again after a timeout
        if reason and self.me == live[0]:
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
        candidates = [b for b in ballots.values() if self.me in b.members and b.epoch > mine and b.proposer in peers]
        if candidates:
            best = min(candidates, key=lambda b: (-b.epoch, b.proposer))
            if self.vote is None or best.epoch > self.vote[0]:
                self.vote = best.key
        if out or self.state() != before:
            out.append(Publish(self.state()))
        return out
