"""Liveness from the network (issue 22, item 4): a member that answers no direct probe for a TTL is
gone, fresh record or not; an answering member stays, busy or not."""
import time

import pytest
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from swarm.liveness import MIN_FAILURES, Liveness
from swarm.net.auth import peer_id_of
from swarm.net.membership import MemberRecord, MembershipView, SwarmDHT, make_validators
from swarm.node import NodeLoop, ProbeSchedule
from swarm.refusals import short
from tests.loglines import swarm_lines
from tests.swarmproc import wait_until


@pytest.fixture
def log_lines(caplog):
    return swarm_lines(caplog)

def test_a_peer_that_never_answers_is_gone_a_ttl_after_it_was_first_seen(log_lines):
    lines = log_lines
    live = Liveness(ttl_s=9.0, me="me")
    live.observe(["me", "ghost", "honest"], now=100.0)
    assert live.due(["me", "ghost", "honest"], 100.0) == ["ghost", "honest"]   # never me
    for t in (100.0, 103.0, 106.0):
        assert sorted(live.due(["ghost", "honest"], t)) == ["ghost", "honest"]   # every ttl / 3
        for peer in ("ghost", "honest"):
            live.pinged(peer, t)
        assert live.due(["ghost", "honest"], t + 1) == []
        live.failed("ghost", t + 3)
        live.answered("honest", t + 0.1)
        live.observe(["me", "ghost", "honest"], t + 2)
    assert live.gone_among(["ghost", "honest", "me"], 108.9) == set()          # silent for less than a TTL
    assert live.gone_among(["ghost", "honest", "me"], 109.0) == {"ghost"}
    assert lines == ["member ghost answers no probe for 9 s: treated as gone"]
    assert live.gone_among(["ghost"], 112.0) == {"ghost"} and len(lines) == 1   # logged once
    live.answered("ghost", 112.5)                                               # it comes back
    assert not live.gone("ghost", 113.0) and lines[-1] == "member ghost answers probes again"


def test_silence_without_failed_pings_is_not_death():
    """A prober stalled for longer than a TTL (pings never sent, or still in flight) declares nobody gone."""
    live = Liveness(ttl_s=3.0, me="me")
    live.observe(["p"], 0.0)
    live.pinged("p", 0.0)
    assert not live.gone("p", 60.0)
    for _ in range(MIN_FAILURES - 1):
        live.failed("p", 61.0)
    assert not live.gone("p", 61.0)
    live.failed("p", 62.0)
    assert live.gone("p", 62.0)
    assert not live.gone("me", 1e9) and not live.gone("stranger", 1e9)


def test_a_peer_out_of_the_view_for_a_ttl_is_forgotten_and_fresh_when_it_returns():
    live = Liveness(ttl_s=3.0)
    for t in (0.0, 1.0, 2.0):
        live.observe(["p"], t)
        live.failed("p", t)
    assert live.gone("p", 3.0)
    live.observe([], 5.0)                  # its record went away: 3 s out of the view is not more than a TTL
    assert "p" in live.first_seen
    live.observe([], 5.5)
    assert "p" not in live.first_seen      # forgotten
    live.observe(["p"], 7.0)               # a restarted node with the same id
    assert not live.gone("p", 9.0) and live.silent_s("p", 9.0) == 2.0


def member(peer: str, unreachable: list[str] | None = None) -> MemberRecord:
    now = get_dht_time()
    return MemberRecord(peer, [], "cpu", "test", 1.0, 1 << 30, {"swarm": "0"}, now, now, unreachable=unreachable)


@pytest.fixture(scope="module")
def two_nodes():
    """Two DHTs on loopback, each serving probes the way ``run_node`` does."""
    validators = [make_validators("l", RSAPrivateKey()) for _ in range(2)]
    first = SwarmDHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=validators[0])
    second = SwarmDHT(initial_peers=[str(a) for a in first.get_visible_maddrs()], start=True,
                      host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=validators[1])
    loops = [NodeLoop(), NodeLoop()]
    p2ps = [loop.call_sync(dht.replicate_p2p()) for loop, dht in zip(loops, (first, second), strict=True)]
    probes = [ProbeSchedule(loop, p2p, 600.0) for loop, p2p in zip(loops, p2ps, strict=True)]
    yield probes, [p.p2p.peer_id.to_base58() for p in probes], None
    for p, loop in zip(probes, loops, strict=True):
        p.close()
        loop.call_sync(p.p2p.shutdown(), 5)
        loop.close()
    first.shutdown()
    second.shutdown()


def test_a_busy_node_answers_a_zero_byte_probe_and_stays_busy(two_nodes):
    (a, b), (_, b_id), _ = two_nodes
    b.links.busy = True   # as during a bandwidth probe, in either role
    try:
        elapsed = a.loop.call_sync(a.links.ping(PeerID.from_base58(b_id), 5.0))
        assert 0 < elapsed < 5.0
        assert b.links.busy                  # an empty probe must not end the other probe's hold
        with pytest.raises(Exception):  # noqa: B017 # a sized probe is still turned away while busy
            a.loop.call_sync(a.links.probe_once(PeerID.from_base58(b_id), 1024, 5.0))
    finally:
        b.links.busy = False


def test_a_fresh_record_whose_peer_answers_no_probe_is_gone_within_two_ttls(two_nodes, log_lines):
    (a, b), (a_id, b_id), _ = two_nodes
    lines = log_lines
    ttl = 3.0
    ghost = peer_id_of(RSAPrivateKey().get_public_key())   # a valid peer id nobody serves
    b.links.busy = True                                    # the answering peer is busy the whole time
    seen: list[set[str]] = []

    def alive() -> bool:   # records fresh every time; b cannot reach the ghost either (as its record would say)
        view = MembershipView({a_id: member(a_id), b_id: member(b_id, [ghost]), ghost: member(ghost)}, time.time())
        seen.append(set(a.alive(view, a_id, ttl).members))
        return ghost not in seen[-1]

    start = time.monotonic()
    try:
        wait_until(alive, 2 * ttl, interval_s=0.1, what="the ghost treated as gone")
    finally:
        b.links.busy = False
    assert time.monotonic() - start >= ttl * 0.9          # not before it was silent for a TTL
    assert all({a_id, b_id} <= members for members in seen)   # the answering peer and this node never left
    gone_lines = [line for line in lines if "treated as gone" in line]
    assert len(gone_lines) == 1 and gone_lines[0].startswith(f"member {short(ghost)} answers no probe for "), lines
    assert a.liveness.answered_at.get(b_id) is not None and not a.liveness.failures.get(b_id)
