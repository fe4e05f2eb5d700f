"""The stage protocol's rules without I/O (``swarm.pipeline.protocol``): events in, decisions out,
no daemon, no event loop, no clock."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.errors import PeerUnavailable, RemoteProtocolError, SwarmError
from swarm.messages import Forward, Reduce, Step
from swarm.pipeline.protocol import MAX_CACHED_REPLIES, Neighbours, StageProtocol, StepStatus
from swarm.refusals import Bans
from swarm.wire import read_header


def inputs_ok(specs: list[tuple[list[int], str]]) -> None:
    if [dtype for _, dtype in specs] != ["float32"] or specs[0][0][1:] != [8]:
        raise SwarmError(f"inputs {specs} are not this stage's")


def protocol(me: str = "b1", replicas=("b1", "b2"), upstream=("a1", "a2"), downstream=("c1", "c2", "c3"),
             numel: int = 10, bans: Bans | None = None) -> StageProtocol:
    return StageProtocol(Neighbours(me, replicas, upstream, downstream, micro_batches=4), numel, inputs_ok, 1, bans)


def header(frame: bytes):
    return read_header(frame)


def forward(step: int = 0, mb: int = 0, x: torch.Tensor | None = None) -> bytes:
    return Forward(step, mb, 0.5, [torch.zeros(2, 8) if x is None else x]).to_frame()[0]


def test_admission_names_who_may_send_what():
    p = protocol()
    p.admit("a1", header(forward()))                       # a previous-stage replica sends forward ...
    p.admit("a2", header(Step(0).to_frame()))              # ... and step
    p.admit("b2", header(Reduce(0, 0, torch.zeros(5)).to_frame()))   # the other replica sends its part
    cases = [("z9", forward(), "not a previous-stage replica or a replica of stage 1"),   # a stranger
             ("b2", forward(), "is not a previous-stage replica"),     # a replica may only reduce
             ("a1", Reduce(0, 0, torch.zeros(5)).to_frame(), "is not a replica"),
             ("b2", Reduce(0, 1, torch.zeros(5)).to_frame(), "part 1 is not owned"),
             ("b2", Reduce(0, 0, torch.zeros(6)).to_frame(), "exactly one tensor 'g'"),
             ("a1", forward(x=torch.zeros(2, 9)), "are not this stage's"),
             ("a1", Forward(0, 0, 1.0, [torch.zeros(2, 8)], torch.zeros(2)).to_frame()[0], None)]
    for sender, frame, error in cases:
        if error is None:
            p.admit(sender, header(frame))
            continue
        with pytest.raises(RemoteProtocolError, match=error):
            p.admit(sender, header(frame))


def test_a_banned_peer_or_a_stranger_is_refused_before_its_frame_is_read():
    bans = Bans()
    p = protocol(bans=bans)
    assert p.refuse_stream("a1") is None and p.refuse_stream("b2") is None
    assert "not a previous-stage replica" in str(p.refuse_stream("c1"))   # downstream never sends here
    bans.ban("a1", "sent forward with NaN/Inf")
    assert "banned" in str(p.refuse_stream("a1"))
    assert p.route(0, 0.0) == ["c1", "c2", "c3"]
    bans.ban("c2", "sent grads with NaN/Inf")
    assert "c2" not in p.route(1, 0.0)   # a poisoner is not routed to at all


@given(step=st.one_of(st.integers(-3, 12), st.just(None), st.text(max_size=2), st.floats()), current=st.integers(0, 10),
       kind=st.sampled_from(["forward", "step", "reduce"]))
def test_every_step_id_is_current_next_a_repeat_or_refused(step, current, kind):
    status = StageProtocol.step_status(kind, step, current)
    if type(step) is not int:
        assert status is StepStatus.STALE
        assert isinstance(StageProtocol.not_current(step, current), RemoteProtocolError)
        return
    expected = {current: StepStatus.CURRENT, current + 1: StepStatus.NEXT}.get(step)
    if kind == "step" and step == current - 1:
        expected = StepStatus.REPEAT
    if expected is None:
        expected = StepStatus.FUTURE if step > current else StepStatus.STALE
    assert status is expected
    error = StageProtocol.not_current(step, current)
    assert isinstance(error, PeerUnavailable if step > current else RemoteProtocolError)


@settings(max_examples=200, deadline=None)
@given(arrivals=st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["a1", "a2"])), max_size=30),
       failures=st.sets(st.integers(0, 3)))
def test_a_step_finishes_exactly_once_after_every_previous_stage_replica_arrived(arrivals, failures):
    """Arrivals in any order, with repeats: the finish of a step begins once every upstream replica
    sent ``step`` and never twice, unless it failed (then a new round of arrivals may start it)."""
    p = protocol()
    started: dict[int, int] = {}
    seen: dict[int, set[str]] = {}
    for step, sender in arrivals:
        seen.setdefault(step, set()).add(sender)
        if p.arrive(step, sender):
            started[step] = started.get(step, 0) + 1
            assert seen[step] == {"a1", "a2"}
            if step in failures and started[step] == 1:
                p.abandon(step)
                seen[step] = set()
    for step, n in started.items():
        assert n <= (2 if step in failures else 1)
    for step, senders in seen.items():
        if senders == {"a1", "a2"} and step not in failures:
            assert started.get(step) == 1


def test_a_first_stage_is_its_own_previous_stage():
    p = protocol(me="a", replicas=("a",), upstream=(), downstream=("b",))
    assert p.hood.senders == ("a",)
    assert p.arrive(0, "a") and not p.arrive(0, "a")
    p.admit("a", header(forward()))
    with pytest.raises(RemoteProtocolError):
        p.admit("b", header(forward()))


@given(contributions=st.permutations(["b1", "b2", "b3"]))
def test_a_reduce_round_sums_in_peer_id_order_whatever_the_arrival_order(contributions):
    p = protocol(replicas=("b1", "b2", "b3"), numel=9)
    parts = {peer: torch.randn(3, generator=torch.Generator().manual_seed(i)) for i, peer in enumerate(("b1", "b2", "b3"))}
    totals = []
    for i, peer in enumerate(contributions):
        totals.append(p.contribute(0, peer, parts[peer]))
        if i == 0:
            assert p.contribute(0, peer, parts[peer]) is None   # a repeat adds nothing
    assert all(t is None for t in totals[:-1])
    expected = torch.zeros(3)
    for peer in ("b1", "b2", "b3"):
        expected += parts[peer]
    assert torch.equal(totals[-1], expected)   # bit-identical: one summation order everywhere
    with pytest.raises(RemoteProtocolError, match="not a replica"):
        p.contribute(1, "z", torch.zeros(3))
    with pytest.raises(RemoteProtocolError, match="float32"):
        p.contribute(1, "b2", torch.zeros(4))


def test_duplicates_get_the_same_reply_and_the_cache_is_bounded_and_forgotten_after_the_step():
    p = protocol()
    p.remember(3, 0, b"reply")
    assert p.cached(3, 0) == b"reply" and p.cached(3, 1) is None
    for mb in range(1, MAX_CACHED_REPLIES + 50):
        p.remember(3, mb, b"r")
    assert len(p.replies) == MAX_CACHED_REPLIES
    p.remember(4, 0, b"next")
    p.finished(3)
    assert p.cached(3, 0) is None and len(p.replies) == 0   # (the cache was full: step 4's reply was not kept)


def test_a_draining_stage_finishes_its_step_and_takes_no_new_one():
    p = protocol()
    p.take_forward()
    p.draining = True
    with pytest.raises(PeerUnavailable, match="leaving"):
        p.take_forward()   # between steps: nothing new
    p.remember(0, 1, b"r")
    p.take_forward()       # a step in progress goes on
    assert not p.between_steps(saved=False, passing=False)
    p.finished(0)
    assert p.between_steps(saved=False, passing=False) and not p.between_steps(saved=True, passing=False)


@given(mb=st.integers(0, 40), failed=st.sets(st.sampled_from(["c1", "c2", "c3"])))
def test_routing_tries_every_replica_once_and_recently_failed_ones_last(mb, failed):
    p = protocol()
    for peer in failed:
        p.unreachable(peer, now=100.0, retry_after_s=10.0)
    order = p.route(mb, now=105.0)
    assert sorted(order) == ["c1", "c2", "c3"]
    assert order[len(order) - len(failed):] == [q for q in order if q in failed]   # failed ones at the end
    assert p.route(mb, now=111.0) == p.hood.route(mb)   # after the retry time, the plain order again


def test_an_overlapped_sync_takes_contributions_a_period_either_side_and_closing_drops_older_rounds():
    from swarm.runtime.outer import OuterSettings
    p = StageProtocol(Neighbours("b1", ("b1", "b2"), ("a1",), (), micro_batches=2), 10, inputs_ok, 1,
                      outer=OuterSettings(sync_every=4, compression="off", overlap=True))
    # syncs after steps 3, 7, 11, ...: a replica at step 8 takes step 7's from one behind, step 11's from one ahead
    assert p.sync_window(7, 8) and p.sync_window(11, 8) and p.sync_window(3, 7)
    assert not p.sync_window(3, 8) and not p.sync_window(15, 8) and not p.sync_window(8, 8)   # too old, too far, no sync
    p.contribute(3, "b2", torch.zeros(5))
    assert p.sync_window(3, 20)   # its round is still open here: its exchange has not ended
    p.contribute(7, "b2", torch.zeros(5))
    p.contribute(11, "b2", torch.zeros(5))
    p.close_round(7)
    assert set(p.rounds) == {11}   # step 7's closed, step 3's a period older too
    assert not p.sync_window(3, 20)
    sync = StageProtocol(Neighbours("b1", ("b1", "b2"), ("a1",), (), micro_batches=2), 10, inputs_ok, 1)
    assert not sync.sync_window(3, 3)   # synchronous replicas: every reduce is of the current step


def test_a_gather_is_a_replicas_bare_ask_for_a_part_of_an_overlapped_sync():
    from swarm.messages import Gather
    from swarm.runtime.outer import OuterSettings
    from swarm.wire import pack
    hood = Neighbours("b1", ("b1", "b2", "b3"), ("a1",), (), micro_batches=2)
    p = StageProtocol(hood, 12, inputs_ok, 1, outer=OuterSettings(sync_every=4, compression="topk8", overlap=True))
    p.admit("b2", header(Gather(7, 2).to_frame()))   # b3's part, asked of b1
    cases = [("a1", Gather(7, 2).to_frame(), "is not a replica"),
             ("b2", Gather(7, 3).to_frame(), "part 3 is no part of 3 replicas"),
             ("b2", pack("gather", {"step": 7, "part": "2"}, {})[0], "part '2' is no part"),
             ("b2", pack("gather", {"step": 7, "part": 2}, {"g": torch.zeros(2)})[0], "carries no tensors"),
             ("b2", Gather(6, 2).to_frame(), "step 6 is no overlapped sync step")]
    for sender, frame, error in cases:
        with pytest.raises(RemoteProtocolError, match=error):
            p.admit(sender, header(frame))
    waited = StageProtocol(hood, 12, inputs_ok, 1, outer=OuterSettings(sync_every=4, compression="topk8", overlap=False))
    with pytest.raises(RemoteProtocolError, match="no overlapped sync step"):   # a waited-for sync never gathers
        waited.admit("b2", header(Gather(7, 2).to_frame()))
