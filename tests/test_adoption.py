"""Plan adoption as a state machine (swarm.churn.adoption): events in, commands out, no daemons, no
torch. The slow end-to-end version of the same rules is tests/test_churn.py."""
from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.churn.adoption import (
    FETCH_TRIES,
    Adopted,
    Fetch,
    PlanAdoption,
    StartSession,
    StopSession,
    Wait,
    Warn,
    donor_order,
    newest_sources,
)

OPS = [f"op{i}" for i in range(6)]
INDEX = {op: i for i, op in enumerate(OPS)}


@dataclass
class Rec:   # what adoption reads of a member record
    committed_hash: str | None = None
    step: int | None = None
    holds: list[list[int]] | None = None


@dataclass
class St:    # an op state: only its step matters here
    step: int


@dataclass
class StagePlan:
    ops: tuple[str, ...]
    peers: tuple[str, ...] = ()


@dataclass
class P:
    hash: str
    stages: list[StagePlan]
    spares: tuple[str, ...] = ()
    feasible: bool = True
    extra: tuple[str, ...] = field(default_factory=tuple)   # members without a stage

    @property
    def members(self) -> tuple[str, ...]:
        return tuple(sorted({p for s in self.stages for p in s.peers} | set(self.spares) | set(self.extra)))

    def role(self, peer: str) -> dict:
        stage = next((i for i, s in enumerate(self.stages) if peer in s.peers), None)
        return {"stage": stage, "spare": peer in self.spares}


def machine(me: str = "me", wait_s: float = 8.0) -> PlanAdoption:
    return PlanAdoption(me, INDEX, set(OPS), wait_s)


def two_stage(hash_: str = "p1", first=("me",), second=("b",)) -> P:
    return P(hash_, [StagePlan(tuple(OPS[:3]), tuple(first)), StagePlan(tuple(OPS[3:]), tuple(second))])


def test_a_new_plan_stops_the_session_and_waits_for_members_that_have_not_committed_it():
    m, plan = machine(), two_stage()
    assert m.committed(plan, 0.0) == [StopSession()] and m.ready is None and m.pending is plan
    assert m.committed(plan, 1.0) == []   # the same plan again: nothing new
    members = {"me": Rec("p1"), "b": Rec("p0")}
    out = m.observe(members, 0, {}, 1.0)
    assert len(out) == 1 and isinstance(out[0], Wait) and m.pending is plan
    out = m.observe(members, 0, {}, 8.5)   # b never commits: adopted without it after wait_s, said once
    warns = [c for c in out if isinstance(c, Warn)]
    assert len(warns) == 1 and "adopting plan p1 without b" in warns[0].message
    assert isinstance(out[-1], StartSession)
    assert not [c for c in m.observe(members, 0, {}, 9.0) if isinstance(c, Warn)]


def test_state_from_the_own_store_and_from_donors_then_ready():
    m, plan = machine(), two_stage()
    m.committed(plan, 0.0)
    store = {"op0": St(4), "op1": St(2)}
    members = {"me": Rec("p1", 4), "b": Rec("p1", 4, [[0, 3, 4]]), "c": Rec("p1", 3, [[1, 3, 4]])}
    out = m.observe(members, 4, store, 1.0)
    (fetch,) = out
    assert isinstance(fetch, Fetch)
    assert fetch.donors == {"op1": ["b", "c"], "op2": ["c", "b"]}   # op0 is here at step 4; spread round-robin
    assert m.observe(members, 4, store, 2.0) == [Wait("fetching state")]   # one fetch at a time
    got = {"op1": (St(4), "b"), "op2": (St(4), "c")}
    (start,) = m.fetched(got)
    assert isinstance(start, StartSession) and start.stage == 0 and start.start_step == 4
    assert set(start.states) == {"op0", "op1", "op2"} and start.local == 1 and start.donors == ("b", "c")
    assert m.ready is None and m.pending is None
    m.started(plan)
    assert m.ready == "p1" and m.plan is plan and m.members() == {"me", "b"}


@dataclass
class Outer(St):   # a replica that syncs rarely: its state carries an anchor
    tensors: dict = field(default_factory=lambda: {"a:w": None, "p:w": None})


def test_ops_a_fetch_left_out_are_asked_for_again_and_the_plan_starting_may_fetch_here():
    plan = two_stage("p1", first=("me", "c"), second=("b",))
    m = machine()
    m.committed(plan, 0.0)
    members = {"me": Rec("p1"), "b": Rec("p1", 4, [[0, 3, 4]]), "c": Rec("p1", 4)}
    (fetch,) = m.observe(members, 4, {}, 1.0)
    assert set(fetch.donors) == {"op0", "op1", "op2"}
    (wait,) = m.fetched({"op1": (St(4), "b")})   # the donor refused two ops (it was starting the plan itself)
    assert isinstance(wait, Wait) and not m.fetching and m.pending is plan
    (again,) = m.observe(members, 4, {}, 1.5)
    assert set(again.donors) == {"op0", "op2"}   # only what is missing
    for _ in range(FETCH_TRIES - 2):
        assert isinstance(m.fetched({"op0": (St(4), "b")})[0], Wait)
        m.observe(members, 4, {}, 2.0)
    (start,) = m.fetched({})   # the last try: start without op2 (the follower says so)
    assert isinstance(start, StartSession) and set(start.states) == {"op0", "op1"} and start.donors == ("b",)
    assert m.members() == {"me", "b", "c"}   # until the session runs: a replica may fetch from it meanwhile
    m.started(plan)
    assert m.starting is None and m.members() == {"me", "b", "c"}


def test_a_replica_that_syncs_rarely_resumes_its_own_state_though_another_is_ahead():
    m, plan = machine(), two_stage()
    m.committed(plan, 0.0)
    members = {"me": Rec("p1", 4), "b": Rec("p1", 6, [[0, 3, 6]]), "c": Rec("p1", 6, [[0, 3, 6]])}
    (fetch,) = m.observe(members, 4, {"op0": St(4), "op1": St(4), "op2": St(4)}, 1.0)
    assert isinstance(fetch, Fetch) and set(fetch.donors) == {"op0", "op1", "op2"}   # synchronous: the newest
    m = machine()
    m.committed(plan, 0.0)
    (start,) = m.observe(members, 4, {op: Outer(4) for op in ("op0", "op1", "op2")}, 1.0)
    assert isinstance(start, StartSession) and start.local == 3 and start.start_step == 6   # its own inner steps


def test_a_node_without_a_stage_is_ready_at_once_and_an_infeasible_plan_is_not_trained():
    m = machine()
    spare = P("s", [StagePlan(tuple(OPS), ("b",))], spares=("me",))
    m.committed(spare, 0.0)
    assert m.observe({"me": Rec("s"), "b": Rec("s")}, 0, {}, 0.5) == [Adopted(spare)] and m.ready == "s"
    crammed = P("x", [StagePlan(tuple(OPS), ("me",))], feasible=False)
    out = m.committed(crammed, 1.0)
    assert out[0] == StopSession() and isinstance(out[1], Warn) and "does not fit" in out[1].message
    assert m.observe({"me": Rec("x")}, 0, {}, 2.0) == [] and m.ready is None


def test_the_step_never_goes_back_when_the_only_holder_dies():
    """The members of the plan adopted advertised step 7; the holder dies; the next plan starts at 7."""
    m, first = machine(), two_stage("p1", first=("me",), second=("b",))
    m.committed(first, 0.0)
    m.observe({"me": Rec("p1", 0), "b": Rec("p1", 0)}, 0, {}, 0.1)
    m.started(first)
    m.observe({"me": Rec("p1", 7), "b": Rec("p1", 7, [[3, 6, 7]])}, 7, {}, 1.0)   # remembered: plan_step 7
    alone = P("p2", [StagePlan(tuple(OPS), ("me",))])
    m.committed(alone, 2.0)
    (start,) = m.observe({"me": Rec("p2", 0)}, 0, {}, 2.1)   # b is gone from the view, and with it its step
    assert isinstance(start, StartSession) and start.start_step == 7 and start.states == {}


def test_a_fetch_for_a_plan_given_up_is_ignored():
    m = machine()
    m.committed(two_stage("p1"), 0.0)
    assert isinstance(m.observe({"me": Rec("p1"), "b": Rec("p1", 1, [[0, 3, 1]])}, 0, {}, 0.5)[0], Fetch)
    m.committed(two_stage("p2"), 1.0)   # a newer plan before the fetch came back
    assert m.fetched({"op0": (St(1), "b")}) == []


def test_newest_sources_counts_this_nodes_store_and_every_holder_of_the_newest_step():
    members = {"a": Rec(holds=[[0, 2, 5], [2, 4, 3]]), "b": Rec(holds=[[1, 3, 5]]), "me": Rec(holds=[[0, 6, 9]])}
    found = newest_sources(INDEX, "me", members, {"op3": St(4)}, ["op0", "op1", "op2", "op3", "op5"])
    assert found == {"op0": (5, ["a"]), "op1": (5, ["a", "b"]), "op2": (5, ["b"]), "op3": (4, ["me"])}
    # (op5: nobody; this node's own record is not believed over its store)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(OPS), st.lists(st.sampled_from("abcdef"), min_size=1, max_size=6, unique=True)))
def test_donor_order_asks_every_donor_once_and_spreads_the_first_asks(sources):
    order = donor_order(sources)
    assert set(order) == set(sources)
    for op, donors in order.items():
        assert sorted(donors) == sorted(sources[op])
    for k, op in enumerate(sorted(order)):   # the k-th op asks its k-th donor first: n ops on n donors, one each
        assert order[op][0] == sources[op][k % len(sources[op])]
    shared = sorted(op for op in order if sources[op] == list("abc"))
    if len(shared) == len(order) == 3:
        assert {order[op][0] for op in shared} == set("abc")


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["commit", "observe", "fetched", "started"]), st.integers(0, 3),
                          st.integers(0, 9), st.booleans()), max_size=30))
def test_any_sequence_of_events_keeps_the_machine_consistent(events):
    """Whatever arrives in whatever order: a start only for the plan being adopted, never below a step
    seen before, ready only for a plan adopted, and one fetch out at a time."""
    m = machine(wait_s=2.0)
    plans = [two_stage(f"p{i}", first=("me",) if i % 2 else ("x",), second=("b",) if i % 3 else ("me",))
             for i in range(4)]
    now, seen_steps, fetch_out = 0.0, 0, False
    for kind, k, step, flag in events:
        now += 1.0
        if kind == "commit":
            out = m.committed(plans[k], now)
            if out:
                assert out[0] == StopSession()
                fetch_out = False
        elif kind == "observe":
            members = {"me": Rec(plans[k].hash if flag else None, step), "b": Rec(plans[k].hash, step, [[0, 6, step]])}
            seen_steps = max(seen_steps, step) if m.plan is not None and "b" in m.plan.members else seen_steps
            pending = m.pending
            out = m.observe(members, 0, {"op0": St(step)}, now)
            for c in out:
                if isinstance(c, Fetch):
                    assert not fetch_out
                    fetch_out = True
                if isinstance(c, StartSession):
                    assert c.plan is pending and c.start_step >= step
        elif kind == "fetched":
            pending = m.pending
            out = m.fetched({"op1": (St(step), "b")} if flag else {})
            if out:
                assert fetch_out and (isinstance(out[0], Wait) or out[0].plan is pending)
                fetch_out = False
        elif m.pending is None and m.plan is not None:
            m.started(m.plan)
        assert m.ready is None or m.ready == m.plan.hash
        assert not (m.fetching and m.pending is None)
