"""Adopting a committed plan, as a state machine without I/O (like ``swarm.election.machine``).

Adopting plan P, one heartbeat at a time, never blocking the heartbeat for a transfer:

1. stop the previous session and keep its final state (by op, with its step) in the node's store;
2. wait until every live member of P has committed P (so every old session has stopped and every
   donor's state is frozen), but at most ``ADOPT_WAIT_TTLS`` record TTLs: a member that never commits
   cannot hold the plan up for good;
3. the start step is the highest step any member holds (one the members of the previous plan
   advertised counts too, even if its holder died since); for each op of this node's new stage, take
   the newest state anyone advertises (``holds`` in the member records): from the node's own store, or
   fetched over ``swarm.state.v1``, the ops spread over all donors that hold that newest step (ops a
   fetch left out are asked for again, ``FETCH_TRIES`` fetches in all);
4. start the session at the start step and advertise ``ready = P``.

Events in: ``committed`` (the plan the election committed), ``observe`` (the members' records, what
this node holds, the time), ``fetched`` (the states a ``Fetch`` brought), ``started`` (the session
runs). Commands out: ``StopSession``, ``Fetch``, ``StartSession``, ``Adopted``, ``Wait``, ``Warn``.
The adapter (``swarm.churn.follower``) carries them out. Plans are duck-typed (``hash``, ``members``,
``feasible``, ``role(peer)``, ``stages[k].ops``); states are anything with a ``step``.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

ADOPT_WAIT_TTLS = 2   # a plan is adopted after this many record TTLs even if some member has not committed it
FETCH_TRIES = 3       # fetches of the ops some member holds (a donor may refuse while it starts the plan itself)


class Holder(Protocol):
    """What adoption reads of a member record."""

    committed_hash: str | None
    step: int | None
    holds: list[list[int]] | None


@dataclass(frozen=True)
class StopSession:
    """Stop the running session (if any) and keep its final state in the store."""


@dataclass(frozen=True)
class Wait:
    """Nothing to do this heartbeat."""

    reason: str


@dataclass(frozen=True)
class Warn:
    """A line for the log (``warning: ...``)."""

    message: str


@dataclass(frozen=True)
class Fetch:
    """Fetch the state of each op from its donors, in order (``donor_order``); answer with ``fetched``."""

    donors: dict[str, list[str]]


def syncs_rarely(state: Any) -> bool:
    """A state of a replica that syncs rarely (it carries an anchor, ``a:``): its own trajectory, which
    it resumes even where another replica is steps ahead (their steps are not its missing ones)."""
    return any(key.startswith("a:") for key in getattr(state, "tensors", {}))


@dataclass(frozen=True)
class StartSession:
    """Run ``stage`` of ``plan`` from ``start_step`` with ``states`` (op -> state; ``local`` of them
    came from the node's own store, the others from ``donors``); answer with ``started`` if it runs."""

    plan: Any
    stage: int
    start_step: int
    states: dict[str, Any]
    local: int
    donors: tuple[str, ...] = ()


@dataclass(frozen=True)
class Adopted:
    """``plan`` is adopted without a stage (a spare, or outside the plan): ready."""

    plan: Any


def donor_order(sources: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """The donors to try for each op, in order: the ops spread over the donors round-robin (the k-th op
    first asks its donors' k-th), the others after it in case one fails."""
    out = {}
    for k, op in enumerate(sorted(sources)):
        donors = sources[op]
        out[op] = [donors[(k + j) % len(donors)] for j in range(len(donors))]
    return out


def newest_sources(index: Mapping[str, int], me: str, members: Mapping[str, Holder], store: Mapping[str, Any],
                   ops: list[str]) -> dict[str, tuple[int, list[str]]]:
    """For each op: the newest step anyone advertises and who holds it (this node included, from its
    ``store``; the others from their records' ``holds``), holders in peer-id order."""
    found: dict[str, tuple[int, list[str]]] = {}
    holders = {p: r.holds or [] for p, r in members.items() if p != me}
    holders[me] = [[index[op], index[op] + 1, s.step] for op, s in store.items()]
    for op in ops:
        i = index[op]
        for peer, ranges in sorted(holders.items()):
            for first, stop, step in ranges:
                if first <= i < stop:
                    best, donors = found.get(op, (-1, []))
                    if step > best:
                        found[op] = (step, [peer])
                    elif step == best and peer not in donors:
                        donors.append(peer)
    return found


@dataclass
class PlanAdoption:
    """One node's adoption of committed plans (see the module docstring). ``index``: op -> position in
    the OP-DAG; ``owned``: the ops that have state; ``wait_s``: how long members that have not committed
    the new plan are waited for (``ADOPT_WAIT_TTLS`` TTLs)."""

    me: str
    index: Mapping[str, int]
    owned: Collection[str]
    wait_s: float
    plan: Any = None          # the plan adopted (running, or adopted without a stage)
    pending: Any = None       # the plan being adopted
    pending_since: float = 0.0
    plan_step: int = 0        # the highest step the members of the plan adopted advertised (a dead one's too)
    ready: str | None = None  # the hash of the plan whose stage runs here, state in place
    start_step: int = 0
    fetching: bool = False    # a Fetch is out: waiting for ``fetched``
    local: dict[str, Any] = field(default_factory=dict)   # states from the store for the start in progress
    donors: tuple[str, ...] = ()   # who gave the fetched states of the last start
    warned: bool = False      # the "adopting without" line of the pending plan was said
    got: dict[str, tuple[Any, str]] = field(default_factory=dict)   # states fetched so far for the pending plan
    asked: set[str] = field(default_factory=set)   # the ops the Fetch out asks for
    tries: int = 0            # fetches out for the pending plan so far (at most FETCH_TRIES)
    starting: Any = None      # the plan of the StartSession out (until ``started``, or a newer plan)

    def members(self) -> set[str]:
        """The members of the plan adopted, of the one being adopted and of the one starting (they may
        fetch state here)."""
        return {p for plan in (self.plan, self.pending, self.starting) if plan is not None for p in plan.members}

    def committed(self, plan: Any, now: float) -> list:
        """The election's committed plan this heartbeat (None: none, or the same as before)."""
        if plan is None or (self.plan is not None and plan.hash == self.plan.hash) or \
                (self.pending is not None and plan.hash == self.pending.hash):
            return []
        self.pending, self.pending_since, self.fetching, self.ready, self.warned = plan, now, False, None, False
        self.got, self.asked, self.tries, self.starting = {}, set(), 0, None
        out: list = [StopSession()]
        if not plan.feasible:
            out.append(Warn(f"plan {plan.hash} does not fit its peers' memory; not training"))
        return out

    def observe(self, members: Mapping[str, Holder], own_step: int, store: Mapping[str, Any], now: float) -> list:
        """A heartbeat's view: ``members`` (peer -> record), ``own_step`` (the newest step this node has
        been at), ``store`` (op -> state this node keeps outside a session)."""
        if self.plan is not None:   # remembered: a holder that dies takes its step out of the view, not out of the swarm
            self.plan_step = max([self.plan_step, *(r.step or 0 for p, r in members.items() if p in self.plan.members)])
        plan = self.pending
        if plan is None or not plan.feasible:
            return []
        live = [m for m in plan.members if m in members]
        out: list = []
        behind = [m for m in live if members[m].committed_hash != plan.hash]
        if behind:   # some member still runs the previous plan: its state is not final yet ...
            waited = now - self.pending_since
            if waited < self.wait_s:
                return [Wait(f"{len(behind)} members have not committed plan {plan.hash}")]
            if not self.fetching and not self.warned:   # ... but a member that never commits cannot hold the plan up
                self.warned = True
                out.append(Warn(f"adopting plan {plan.hash} without {', '.join(m[-8:] for m in behind)}: "
                                f"not committed {waited:.0f} s after this node did"))
        stage = plan.role(self.me)["stage"]
        if stage is None:
            self.plan, self.pending, self.ready = plan, None, plan.hash
            return [*out, Adopted(plan)]
        if self.fetching:
            return [*out, Wait("fetching state")]
        ops = [op for op in plan.stages[stage].ops if op in self.owned]
        self.start_step = max([own_step, self.plan_step, *(members[m].step or 0 for m in live)])
        newest = newest_sources(self.index, self.me, members, store, ops)
        self.local = {op: store[op] for op, (step, _) in newest.items()
                      if op in store and (store[op].step >= step or syncs_rarely(store[op]))}
        remote = {op: donors for op, (_, donors) in newest.items() if op not in self.local and op not in self.got}
        if remote and self.tries < FETCH_TRIES:
            self.fetching, self.asked, self.tries = True, set(remote), self.tries + 1
            return [*out, Fetch(donor_order(remote))]
        return [*out, self._start(plan, stage)]

    def fetched(self, results: Mapping[str, tuple[Any, str]]) -> list:
        """What the ``Fetch`` brought: op -> (state, donor), the ops no donor gave left out. Ops left
        out are asked for again on the next heartbeat (``FETCH_TRIES`` fetches in all), then started
        without (from initial weights: the follower says so)."""
        plan = self.pending
        if not self.fetching or plan is None:
            return []   # a fetch for a plan no longer being adopted
        self.fetching = False
        self.got.update({op: r for op, r in results.items() if op in self.asked})
        left = self.asked - set(self.got)
        if left and self.tries < FETCH_TRIES:
            return [Wait(f"{len(left)} ops not fetched: asking again ({self.tries} of {FETCH_TRIES} fetches)")]
        return [self._start(plan, plan.role(self.me)["stage"])]

    def _start(self, plan: Any, stage: int) -> StartSession:
        results = self.got
        self.pending, self.fetching, self.starting, self.got, self.asked = None, False, plan, {}, set()
        states = {**self.local, **{op: state for op, (state, _) in results.items()}}
        self.donors = donors = tuple(sorted({peer for _, peer in results.values()}))
        return StartSession(plan, stage, self.start_step, states, len(self.local), donors)

    def started(self, plan: Any) -> None:
        """The session of ``plan`` runs (a start that failed is tried again when the plan is seen again)."""
        self.plan, self.ready, self.starting = plan, plan.hash, None
