"""The node's side of the election: what the members measured reaches the plan they vote on."""
import json
import statistics
import time

import pytest

import swarm.planning
from swarm.config import ElectionConfig
from swarm.models import trace_model
from swarm.net.membership import MemberRecord, MembershipView
from swarm.planning import Elector
from swarm.scheduler import Plan, PlanSettings, Workload


class Ballots:
    """The ballot part of ``Membership``, in memory."""

    def __init__(self):
        self.stored: dict[str, dict] = {}

    def ballots(self) -> dict[str, dict]:
        return self.stored

    def publish_ballot(self, epoch: int, plan_hash: str, proposer: str, members: list[str], plan_json: str) -> bool:
        self.stored[proposer] = {"epoch": epoch, "plan_hash": plan_hash, "proposer": proposer, "members": members,
                                 "plan": plan_json}
        return True


def member(peer: str, codec_bps: float | None) -> MemberRecord:
    """A member record as read from the DHT: slow links to everyone, its own codec measurement."""
    now = time.time()
    record = MemberRecord(peer, [], "cpu", "test", 1.0, 8 << 30, {"swarm": "0"}, now, now, codec_bps=codec_bps,
                          bandwidth_bps={p: 1e6 for p in "ABC" if p != peer})
    return MemberRecord.from_wire(record.to_wire())


@pytest.fixture(scope="module")
def workload() -> Workload:
    return Workload.from_dag(trace_model("gpt2-tiny", "coarse", 4).dag)


def propose(workload: Workload, codecs: dict[str, float | None]) -> Plan:
    """The plan member A proposes for the members A, B, C of ``codecs``."""
    ballots = Ballots()
    view = MembershipView({p: member(p, c) for p, c in codecs.items()}, time.time())
    elector = Elector("A", ballots, workload, ElectionConfig(join_batch_s=0, min_members=3, stages=2))
    elector.step(view)
    return Plan.from_compact(json.loads(ballots.stored["A"]["plan"]), workload.names)


def test_members_codec_throughput_reaches_the_plan_the_election_votes_on(workload, monkeypatch):
    planned: list[PlanSettings] = []
    schedule = swarm.planning.schedule

    def recording(w: Workload, members, settings: PlanSettings) -> Plan:
        planned.append(settings)
        return schedule(w, members, settings)

    monkeypatch.setattr(swarm.planning, "schedule", recording)
    fast = propose(workload, {"A": 4e9, "B": 1e9, "C": None})   # C has not measured yet: not counted
    assert planned[-1].codec_bytes_per_s == statistics.median([4e9, 1e9])
    assert planned[-1].stages == 2 and planned[-1].micro_batches == ElectionConfig().micro_batches
    slow = propose(workload, {"A": 1e3, "B": 2e3, "C": 3e3})   # a codec this slow costs more than it saves
    assert planned[-1].codec_bytes_per_s == 2e3
    assert fast.links[0].ratio > 1 and slow.links[0].ratio == 1.0   # 1 Mbit/s links: only a fast codec pays
    propose(workload, {"A": None, "B": None, "C": None})   # nobody measured yet: the default
    assert planned[-1].codec_bytes_per_s == PlanSettings().codec_bytes_per_s and len(planned) == 3
