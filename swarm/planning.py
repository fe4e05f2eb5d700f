"""The node's side of the election: feeds DHT observations to the ``Election`` state machine and
carries out its commands (plan with the OP-Fence scheduler, publish ballots and votes, adopt the
committed plan). Every DHT access goes through ``Membership``.

Before a ballot from another proposer reaches the machine (so before this node can vote for it) the
node re-prices its plan with its own view (``check_ballot``): a plan that does not match its ballot,
overloads a peer's memory, or predicts a step ``PLAN_TOLERANCE`` times slower than the plan this node
would make for the same members is refused, named in one log line, and never voted for. Members'
self-reported compute enters planning capped at ``CLAIM_SPREAD`` times the members' median
(``rated_tflops``), so one liar cannot draw every op to itself (docs/hostile.md)."""
from __future__ import annotations

import enum
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, replace

from swarm.config import ElectionConfig, TrainingConfig, election_settings, plan_settings
from swarm.election import Ballot, Commit, ComputePlan, Election, Ignored, PeerState, Publish
from swarm.errors import SwarmError
from swarm.events import COMMIT, NO_EVENTS, Events
from swarm.net.membership import Membership, MembershipView
from swarm.net.records import Reachability
from swarm.refusals import Refusals, short
from swarm.scheduler import PeerSpec, Plan, PlanSettings, Swarm, Workload, baseline, evaluate, schedule

EPOCH_WINDOW = 64        # epochs claimed further above the swarm's committed one are not believed
PLAN_TOLERANCE = 2.0     # a ballot's plan may predict a step at most this much slower than this node's own
CLAIM_SPREAD = 100.0     # a member's compute counts at most this many times the members' median ...
OBSERVED_SLACK = 100.0   # ... and at most this many times what its pipeline neighbours saw it deliver (overheads read low)


def ratings(view: MembershipView, members) -> dict[str, tuple[float, float, str]]:
    """For each member: (claimed TFLOP/s, the rate planning believes, why it was down-rated or "").
    The claim is its measured model rate (else its peak). It counts at most ``CLAIM_SPREAD`` times the
    members' median (a claim far above everyone else's is not evidence), and at most ``OBSERVED_SLACK``
    times the best rate any other member saw it deliver on pipeline calls (``observed_tflops``)."""
    claimed = {m: view.members[m].model_tflops or view.members[m].tflops for m in members}
    cap = CLAIM_SPREAD * statistics.median(claimed.values()) if claimed else math.inf
    out = {}
    for m, c in claimed.items():
        seen = [r.observed_tflops[m] for p, r in view.members.items() if p != m and r.observed_tflops and m in r.observed_tflops]
        rated, why = c, ""
        if rated > cap:
            rated, why = cap, f"{CLAIM_SPREAD:g}x the members' median"
        if seen and rated > OBSERVED_SLACK * max(seen):
            rated, why = OBSERVED_SLACK * max(seen), f"{OBSERVED_SLACK:g}x the {max(seen):.3g} TFLOP/s its neighbours saw"
        out[m] = (c, rated, why)
    return out


def rated_tflops(view: MembershipView, members) -> dict[str, float]:
    """The compute planning believes of each member (``ratings``)."""
    return {m: rated for m, (_, rated, _) in ratings(view, members).items()}


def disputed(view: MembershipView, plan: Plan | None) -> dict[str, str]:
    """Members left out of the next plans (-> why) because pipeline neighbours accuse each other of
    sending NaN/Inf (``distrusts``; docs/hostile.md, "Disputes"). Only an accusation between neighbours
    in ``plan`` counts (only they exchange tensors). A member accused by two or more neighbours is left
    out and its own accusations dropped, most accused first; each accusation left then takes out both
    its accuser and the accused: a liar can trade itself for one honest member, no more."""
    if plan is None:
        return {}
    place = {p: s.index for s in plan.stages for p in s.peers}
    accusations = {(r.peer_id, b) for r in view.members.values() for b in (r.distrusts or [])
                   if b in view.members and b != r.peer_id and r.peer_id in place and b in place
                   and abs(place[r.peer_id] - place[b]) <= 1}
    out: dict[str, str] = {}
    while accusations:
        accusers: dict[str, set[str]] = {}
        for a, b in accusations:
            accusers.setdefault(b, set()).add(a)
        most = max(sorted(accusers), key=lambda b: len(accusers[b]))
        if len(accusers[most]) < 2:
            break
        out[most] = f"{len(accusers[most])} neighbours say it sent NaN/Inf"
        accusations = {(a, b) for a, b in accusations if most not in (a, b)}
    for a, b in sorted(accusations):
        out.setdefault(b, f"{short(a)} says it sent NaN/Inf")
        out.setdefault(a, f"it says {short(b)} sent NaN/Inf (a dispute takes out both)")
    return out


def cut_links(plan: Plan | None, view: MembershipView) -> list[tuple[str, str]]:
    """The links ``plan`` uses (between neighbouring stages, and between a stage's replicas) that one
    end says it cannot reach (``MembershipView.cut``), each as a sorted pair."""
    if plan is None:
        return []
    stages = [[p for p in s.peers if p in view.members] for s in plan.stages]
    pairs = {tuple(sorted((a, b))) for i, s in enumerate(stages) for a in s
             for b in s + (stages[i + 1] if i + 1 < len(stages) else []) if a != b}
    return sorted(pair for pair in pairs if view.cut(*pair))


def unmeasured_links(view: MembershipView) -> list[tuple[str, str]]:
    """Pairs of members whose link neither end has measured nor found cut (what a first plan waits for)."""
    peers = view.peers()
    return [(a, b) for i, a in enumerate(peers) for b in peers[i + 1:]
            if not (view.members[a].bandwidth_bps.get(b) or view.members[b].bandwidth_bps.get(a) or view.cut(a, b))]


def swarm_of(view: MembershipView, members: tuple[str, ...] | list[str]) -> Swarm:
    """The planning input for ``members`` from their records and the measured bandwidth matrix."""
    rated = rated_tflops(view, members)
    peers = [PeerSpec(m, rated[m], view.members[m].memory_bytes, view.members[m].cpu_cores,
                      view.members[m].reachability == Reachability.RELAYED) for m in members]
    return Swarm.build(peers, view.bandwidth)


def layout_of(plan: Plan, w: Workload, swarm: Swarm) -> list[tuple[tuple[int, int], list[int]]]:
    """A committed plan as a layout over ``w``'s segments and ``swarm``'s peer indices."""
    seg = {stop: k + 1 for k, stop in enumerate(w.seg_stop)} | {0: 0}
    index = {p: i for i, p in enumerate(swarm.ids)}
    return [((seg[s.first_op], seg[s.stop_op]), [index[p] for p in s.peers]) for s in plan.stages]


logger = logging.getLogger(__name__)


class RoleKind(enum.StrEnum):
    STAGE = "stage"
    SPARE = "spare"
    OUTSIDE = "outside the plan"


@dataclass(frozen=True)
class Role:
    """This node's part in a committed plan; ``str`` is the record's ``role`` ("stage 2", "spare",
    "outside the plan")."""

    kind: RoleKind
    stage: int | None = None

    @classmethod
    def of(cls, plan: Plan, me: str) -> Role:
        role = plan.role(me)
        if role["stage"] is not None:
            return cls(RoleKind.STAGE, role["stage"])
        return cls(RoleKind.SPARE if role.get("spare") else RoleKind.OUTSIDE)

    def __str__(self) -> str:
        return f"stage {self.stage}" if self.kind is RoleKind.STAGE else self.kind.value


@dataclass(frozen=True)
class ElectionAdvert:
    """What the election puts in this node's member record: its vote, the plan it committed, and its
    role there (``role`` and ``stage`` None while no readable plan is committed)."""

    vote_epoch: int | None = None
    vote_hash: str | None = None
    committed_epoch: int | None = None
    committed_hash: str | None = None
    role: str | None = None
    stage: int | None = None


def _pair(epoch: int | None, value: str | None) -> tuple[int, str] | None:
    return (epoch, value) if epoch is not None and value else None


class Elector:
    """One node's election loop; ``step`` once per heartbeat returns what the record advertises."""

    def electorate(self, view: MembershipView) -> MembershipView:
        """The members that take part in elections: not those leaving, nor those in a dispute
        (``disputed``; each named once in the log)."""
        view = view.electorate()
        out = disputed(view, self.plan)
        for peer, why in out.items():
            self.refusals.note(peer, "plan place", why)
        return MembershipView({p: r for p, r in view.members.items() if p not in out}, view.taken_at) if out else view

    def __init__(self, me: str, membership: Membership, workload: Workload, cfg: ElectionConfig,
                 max_ratio: float = PlanSettings.max_ratio, schedule: str = PlanSettings.schedule,
                 events: Events = NO_EVENTS, training: TrainingConfig | None = None,
                 wire_fraction: float = PlanSettings.wire_fraction, recompute: str = PlanSettings.recompute,
                 optimizer: str = PlanSettings.optimizer):
        self.me, self.membership, self.workload = me, membership, workload
        self.events = events   # a ``commit`` row per commit
        self.log = logger
        self.settings = plan_settings(cfg, max_ratio=max_ratio, schedule=schedule,   # memory at the real in-flight count
                                      training=training, wire_fraction=wire_fraction, recompute=recompute,
                                      optimizer=optimizer)
        self.cfg = cfg
        self.election = Election(me, election_settings(cfg, leader="rotating", epoch_window=EPOCH_WINDOW))
        self.refusals = Refusals(events=events)
        self.verdicts: dict[tuple[str, tuple[str, ...]], str] = {}   # (plan hash, members) -> "" (good) or why not
        self.plans: dict[str, Plan] = {}   # by hash: the ones this node computed or verified
        self.plan: Plan | None = None       # the committed one
        self.drift_checked_at = 0.0
        self.cuts: set[tuple[str, tuple[str, str]]] = set()   # (plan hash, link) reported cut
        self.advert = ElectionAdvert()

    def step(self, view: MembershipView) -> ElectionAdvert:
        """One heartbeat of the election over ``view``; returns the record fields it sets."""
        now = time.time()
        ballots = self._believed(view, self.membership.ballots())
        peers = {}
        for pid, r in view.members.items():
            b = ballots.get(pid)
            peers[pid] = PeerState(Ballot(b["epoch"], b["plan_hash"], pid, tuple(b["members"])) if b else None,
                                   _pair(r.vote_epoch, r.vote_hash), _pair(r.committed_epoch, r.committed_hash))
        try:
            self._check_drift(view, now)
        except (SwarmError, ValueError, KeyError) as e:
            self.log.warning(f"cannot re-price the committed plan ({e})")
        self._check_cuts(view)
        if self.plan is None:
            self.election.report_unmeasured(bool(unmeasured_links(view)))
        self._run(self.election.observe(now, peers), view, ballots)
        return self.advert

    def _check_cuts(self, view: MembershipView) -> None:
        """A link of the committed plan newly cut (once per plan and link): re-plan without it."""
        new = [link for link in cut_links(self.plan, view) if (self.plan.hash, link) not in self.cuts]
        if new:
            self.cuts.update((self.plan.hash, link) for link in new)
            self.log.warning(f"plan {self.plan.hash}: link {' - '.join(short(p) for p in new[0])} is cut "
                             f"({len(new)} link{'s' if len(new) > 1 else ''}): re-planning without it")
            self.election.report_cut()

    def _run(self, commands: list, view: MembershipView, ballots: dict) -> None:
        for c in commands:
            if isinstance(c, Ignored):
                self.refusals.note(c.peer, "election state", c.what)
            elif isinstance(c, ComputePlan):
                try:
                    plan = self._own_plan(view, c.members)
                except (SwarmError, ValueError, KeyError) as e:   # the members' records cannot be planned on
                    self.log.warning(f"cannot plan epoch {c.epoch} for {len(c.members)} members ({e}); "
                                     "the next proposer takes over after the election time-out")
                    continue
                ballot = Ballot(c.epoch, plan.hash, self.me, c.members)
                try:
                    self.membership.publish_ballot(c.epoch, plan.hash, self.me, list(c.members), json.dumps(plan.compact()))
                except SwarmError as e:
                    self.log.warning(f"ballot of epoch {c.epoch} not published ({e})")
                    continue
                self.log.info(f"proposed epoch {c.epoch} plan {plan.hash} for {len(c.members)} members "
                              f"({self.election.reason}), predicted step {plan.predicted_step_s:.3f} s")
                self._run(self.election.proposed(ballot), view, ballots)
            elif isinstance(c, Publish):
                vote_epoch, vote_hash = c.state.vote if c.state.vote else (None, None)
                committed_epoch, committed_hash = c.state.committed if c.state.committed else (None, None)
                self.advert = replace(self.advert, vote_epoch=vote_epoch, vote_hash=vote_hash,
                                      committed_epoch=committed_epoch, committed_hash=committed_hash)
            elif isinstance(c, Commit):
                self._adopt(c, ballots)

    def _adopt(self, c: Commit, ballots: dict) -> None:
        plan = self.plans.get(c.ballot.plan_hash)
        if plan is None and c.ballot.proposer in ballots:
            try:
                plan = Plan.from_compact(json.loads(ballots[c.ballot.proposer]["plan"]), self.workload.names)
            except ValueError as e:
                self.log.warning(f"committed plan {c.ballot.plan_hash} is unreadable ({e})")
        if plan is not None and (plan.hash != c.ballot.plan_hash or plan.members != c.ballot.members):
            self.log.warning(f"committed plan {c.ballot.plan_hash} does not match this node's model/OP-DAG")
            plan = None
        self.plan = plan
        role = Role.of(plan, self.me) if plan is not None else None
        self.advert = replace(self.advert, stage=role.stage if role else None, role=str(role) if role else None)
        self.log.info(f"committed epoch {c.ballot.epoch} plan {c.ballot.plan_hash} with {len(c.ballot.members)} members "
                      f"({c.reason}): {self.advert.role or 'role unknown'}")
        if plan is not None:
            self.log.info(f"plan {plan.hash}: {plan.summary()}")
        self.events.emit(COMMIT, epoch=c.ballot.epoch, plan_hash=c.ballot.plan_hash, members=len(c.ballot.members),
                         reason=c.reason, role=self.advert.role,
                         stages=[list(s.peers) for s in plan.stages] if plan is not None else [])

    def _own_plan(self, view: MembershipView, members) -> Plan:
        """The plan this node makes for ``members`` (kept by hash, so a commit of it needs no parsing)."""
        swarm, settings = swarm_of(view, members), self._settings(view, members)
        plan = baseline(self.workload, swarm, settings, compress=settings.max_ratio > 1) if self.cfg.planner == "naive" else \
            schedule(self.workload, swarm, settings)
        self.plans[plan.hash] = plan
        return plan

    def _believed(self, view: MembershipView, ballots: dict[str, dict]) -> dict[str, dict]:
        """The ballots this node may vote for: its own, those not naming it, and those whose plan passes
        ``check_ballot`` (verdicts are kept by plan hash and members; a refusal is logged once)."""
        out = {}
        for proposer, ballot in ballots.items():
            if proposer == self.me or self.me not in ballot["members"]:
                out[proposer] = ballot
                continue
            key = (ballot["plan_hash"], tuple(ballot["members"]))
            verdict = self.verdicts.get(key)
            if verdict is None:
                verdict = self.check_ballot(ballot, view)
                if verdict is not None and len(self.verdicts) < 256:
                    self.verdicts[key] = verdict
            if verdict == "":
                out[proposer] = ballot
            elif verdict:
                self.refusals.note(proposer, "ballot", f"epoch {ballot['epoch']} plan {ballot['plan_hash']}: {verdict}")
        return out

    def check_ballot(self, ballot: dict, view: MembershipView) -> str | None:
        """Why this node would not vote for ``ballot`` ("" if it would; None while it cannot tell: a
        member it names is not in this node's view yet)."""
        members = tuple(ballot["members"])
        if not set(members) <= set(view.members):
            return None
        try:
            plan = Plan.from_compact(json.loads(ballot["plan"]), self.workload.names)
        except (ValueError, TypeError, KeyError) as e:
            return f"unreadable plan ({type(e).__name__})"
        if plan.hash != ballot["plan_hash"] or plan.members != members:
            return "its plan does not match the ballot (another model or OP-DAG, or forged)"
        try:
            swarm = swarm_of(view, members)
            theirs = evaluate(self.workload, swarm, layout_of(plan, self.workload, swarm), self._settings(view, members))
            own = self._own_plan(view, members)
        except (SwarmError, ValueError, KeyError, IndexError) as e:
            return f"cannot be priced ({type(e).__name__}: {str(e)[:80]})"
        if not theirs.feasible and own.feasible:
            return "it overloads a peer's memory"
        if theirs.predicted_step_s > PLAN_TOLERANCE * own.predicted_step_s:
            return (f"it predicts {theirs.predicted_step_s:.3g} s per step, {theirs.predicted_step_s / own.predicted_step_s:.1f}x "
                    f"this node's own plan for the same members")
        return ""

    def _settings(self, view: MembershipView, members) -> PlanSettings:
        """Plan settings with the members' measured AdaTopK codec throughput (median), once known."""
        rates = [view.members[m].codec_bps for m in members if m in view.members and view.members[m].codec_bps]
        return replace(self.settings, codec_bytes_per_s=statistics.median(rates)) if rates else self.settings

    def _check_drift(self, view: MembershipView, now: float) -> None:
        """The leader re-prices the committed plan under fresh measurements now and then."""
        if (self.plan is None or self.cfg.planner == "naive" or now - self.drift_checked_at < self.cfg.drift_check_s
                or self.me != min(view.members)
                or not set(self.plan.members) <= set(view.members)):
            return
        self.drift_checked_at = now
        swarm = swarm_of(view, self.plan.members)  # joins are the join trigger's business
        settings = self._settings(view, self.plan.members)
        current = evaluate(self.workload, swarm, layout_of(self.plan, self.workload, swarm), settings)
        fresh = schedule(self.workload, swarm, settings)
        if current.predicted_step_s > self.cfg.drift_gain * fresh.predicted_step_s:
            self.log.info(f"drift: committed plan now predicts {current.predicted_step_s:.3f} s, a new one "
                          f"{fresh.predicted_step_s:.3f} s")
            self.election.report_drift()
