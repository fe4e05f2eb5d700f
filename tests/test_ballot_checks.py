"""A node re-prices another proposer's plan before it votes, and planning does not take a member's word
for its compute beyond reason (swarm.planning, docs/hostile.md)."""
import json
import time

import pytest
import torch

from swarm.config import ElectionConfig
from swarm.models import trace_model
from swarm.net.membership import MemberRecord, MembershipView
from swarm.planning import CLAIM_SPREAD, OBSERVED_SLACK, Elector, disputed, rated_tflops, ratings, swarm_of
from swarm.scheduler import PlanSettings, Workload, evaluate, schedule
from tests.loglines import swarm_lines
from tests.test_planning import Ballots


def member(peer: str, tflops: float = 1.0, memory: int = 8 << 30) -> MemberRecord:
    now = time.time()
    return MemberRecord(peer, [], "cpu", "test", tflops, memory, {"swarm": "0"}, now, now,
                        bandwidth_bps={p: 1e9 for p in "ABCX" if p != peer})


@pytest.fixture(scope="module")
def workload() -> Workload:
    return Workload.from_dag(trace_model("gpt2-tiny", "coarse", 4).dag)


def ballot_for(plan, proposer: str, epoch: int = 1) -> dict:
    return {"epoch": epoch, "plan_hash": plan.hash, "proposer": proposer, "members": list(plan.members),
            "plan": json.dumps(plan.compact())}


def all_on(workload: Workload, view: MembershipView, members: list[str], peer: str):
    swarm = swarm_of(view, members)
    return evaluate(workload, swarm, [((0, len(workload.seg_stop)), [members.index(peer)])], PlanSettings())


def test_a_plan_far_slower_than_the_voters_own_or_over_memory_is_refused_and_named(workload, caplog):
    view = MembershipView({"A": member("A"), "B": member("B"), "C": member("C", tflops=0.001)}, time.time())
    logged = swarm_lines(caplog)
    ballots = Ballots()
    elector = Elector("A", ballots, workload, ElectionConfig(join_batch_s=0, min_members=3))

    slow = all_on(workload, view, ["A", "B", "C"], "C")   # every op on the slowest member
    verdict = elector.check_ballot(ballot_for(slow, "C"), view)
    assert verdict and "this node's own plan" in verdict

    small = MembershipView({**view.members, "B": member("B", memory=1 << 20)}, time.time())
    crammed = all_on(workload, small, ["A", "B", "C"], "B")   # every op on a member with 1 MiB
    assert "memory" in elector.check_ballot(ballot_for(crammed, "C"), small)

    fair = schedule(workload, swarm_of(view, ["A", "B", "C"]), PlanSettings())
    assert elector.check_ballot(ballot_for(fair, "B"), view) == ""
    forged = {**ballot_for(fair, "B"), "plan_hash": "0" * 16}
    assert "does not match" in elector.check_ballot(forged, view)
    assert elector.check_ballot({**ballot_for(fair, "B"), "members": ["A", "B", "C", "Z"]}, view) is None   # Z unseen yet

    # through the election: the refused ballot gets no vote and one log line names it
    ballots.stored["C"] = ballot_for(slow, "C", epoch=5)
    record = view.members["A"]
    for _ in range(3):
        record = record.merged(elector.step(view))   # what the node publishes
    assert record.vote_hash != slow.hash
    lines = [line for line in logged if "refused ballot from" in line]
    assert len(lines) == 1 and slow.hash in lines[0]


def test_a_compute_claim_far_above_everyone_elses_is_capped(workload):
    view = MembershipView({"A": member("A"), "B": member("B"), "C": member("C"), "X": member("X", tflops=1e9)},
                          time.time())
    rated = rated_tflops(view, ["A", "B", "C", "X"])
    assert rated["X"] == pytest.approx(CLAIM_SPREAD * 1.0) and rated["A"] == 1.0
    assert [p.tflops for p in swarm_of(view, ["A", "B", "C", "X"]).peers] == [1.0, 1.0, 1.0, CLAIM_SPREAD]


def test_a_claim_far_above_what_the_neighbours_saw_delivered_is_down_rated(workload):
    liar = member("X", tflops=50.0)
    witness = member("A")
    witness.observed_tflops = {"X": 0.05}   # A sent X micro-batches: X delivered 0.05 TFLOP/s
    liar.observed_tflops = {"A": 1e3}      # X's word about others does not raise them above their own claim
    view = MembershipView({"A": witness, "B": member("B"), "X": liar}, time.time())
    rates = ratings(view, ["A", "B", "X"])
    assert rates["X"][1] == pytest.approx(OBSERVED_SLACK * 0.05) and "neighbours saw" in rates["X"][2]
    assert rates["A"] == (1.0, 1.0, "") and rates["B"] == (1.0, 1.0, "")


def stages_plan(*stages):
    from swarm.scheduler.plan import Plan, StagePlan
    return Plan("m", tuple(StagePlan(i, i, i + 1, (f"op{i}",), tuple(peers), 0.1, 1.0, 0.0) for i, peers in enumerate(stages)),
                (), (), 0.1, 1.0, 8)


def accusing(view_peers: dict[str, list[str]]) -> MembershipView:
    records = {}
    for peer, accused in view_peers.items():
        records[peer] = member(peer)
        records[peer].distrusts = accused or None
    return MembershipView(records, time.time())


def test_disputes_take_out_the_member_accused_by_two_neighbours_or_both_sides_of_one_accusation():
    plan = stages_plan(["A"], ["P"], ["C"])
    # the middle member poisons both neighbours (and accuses them back): it alone is left out
    assert set(disputed(accusing({"A": ["P"], "P": ["A", "C"], "C": ["P"]}), plan)) == {"P"}
    # one accusation: both sides sit out (a liar trades itself for one honest member, no more)
    assert set(disputed(accusing({"A": [], "P": ["A"], "C": []}), plan)) == {"A", "P"}
    # accusations between members that exchange no tensors, or of strangers, count for nothing
    assert disputed(accusing({"A": ["C", "Z"], "P": [], "C": []}), plan) == {}
    assert disputed(accusing({"A": ["P"], "P": [], "C": []}), None) == {}


def test_the_electorate_leaves_disputed_members_out_and_names_them_once(workload, caplog):
    logged = swarm_lines(caplog)
    elector = Elector("A", Ballots(), workload, ElectionConfig())
    elector.plan = stages_plan(["A"], ["P"], ["C"])
    view = accusing({"A": ["P"], "P": [], "C": ["P"]})
    for _ in range(3):
        assert set(elector.electorate(view).members) == {"A", "C"}
    assert len([line for line in logged if "P" in line and "NaN" in line]) == 1


def test_the_compute_a_next_stage_peer_delivers_is_measured_on_pipeline_calls():
    """Stage 1 takes at least 0.25 s a micro-batch (a slow device, whatever it claims): stage 0 sees it
    deliver no more than its FLOPs over that time; the wait a middle stage reports is not counted."""
    import asyncio

    from swarm.dag.stages import input_specs
    from swarm.pipeline import Neighbours, StageServer, local_caller, train_step
    from swarm.runtime.worker import StageWorker
    from tests.test_hostile_frames import two_stage_gpt
    from tests.test_rpc import lm_loss

    traced, stages = two_stage_gpt(2)
    ids, servers = ["s0", "s1"], {}
    for i, stage in enumerate(stages):
        worker = StageWorker(stage, loss_fn=lm_loss if i else None, max_batch=2, input_specs=input_specs(traced.dag, stage.io))
        hood = Neighbours(ids[i], (ids[i],), tuple(ids[i - 1:i]), tuple(ids[i + 1:i + 2]))
        servers[ids[i]] = StageServer(worker, hood, local_caller(ids[i], servers), timeout_s=30.0)
    slow, forward = servers["s1"].worker, servers["s1"].worker.forward

    def slow_forward(*args):
        time.sleep(0.25)   # the device's own pace, not synchronisation
        return forward(*args)

    slow.forward = slow_forward
    dag = traced.dag
    flops = sum(dag.ops[dag.index[name]].flops for name in stages[1].io.ops) * 2 / dag.batch_size
    servers["s0"].link.next_stage = (float(flops), True)
    data = torch.randint(0, 256, (4, 129))
    asyncio.run(asyncio.wait_for(train_step(servers["s0"], data[:, :-1], data[:, 1:], micro_batches=2, in_flight=1), 60))
    delivered = servers["s0"].counters.delivered["s1"]
    assert 0 < delivered <= flops / 0.25 / 1e12
    assert delivered > flops / 2.5 / 1e12   # the measurement is of the peer's pass, not of anything slower


def test_status_names_down_rated_members_and_disputes():
    from swarm.node.status import trust_notes

    liar, witness = member("X", tflops=50.0), member("A")
    witness.observed_tflops, witness.distrusts = {"X": 0.05}, ["X"]
    lines = trust_notes(MembershipView({"A": witness, "B": member("B"), "X": liar}, time.time()))
    assert lines == [f"down-rated: X claims 50 TFLOP/s, planned at {OBSERVED_SLACK * 0.05:.3g} "
                     f"({OBSERVED_SLACK:g}x the 0.05 TFLOP/s its neighbours saw)", "dispute: A banned X for sending NaN/Inf"]
