"""Member records: typed, owner-only, small; hostile writes refused; the bandwidth estimate rule."""
import time

import pytest
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from swarm.net.auth import peer_id_of
from swarm.net.membership import Membership, MembershipView, SwarmDHT, make_validators
from swarm.net.records import DEFAULT_BANDWIDTH_BPS, MAX_LINKS, MemberRecord


def record(peer: str, **kw) -> MemberRecord:
    fields = dict(maddrs=[], device="cpu", device_name="test", tflops=1.0, memory_bytes=1 << 30,
                  versions={"swarm": "0"}, started_at=time.time(), updated_at=time.time())
    return MemberRecord(peer_id=peer, **{**fields, **kw})


def test_wire_round_trip_and_malformed_records_are_ignored():
    rec = record("A", bandwidth_bps={"B": 1e6}, rtt_s={"B": 0.01}, stage=2)
    assert MemberRecord.from_wire(rec.to_wire()) == rec
    for broken in ({**rec.to_wire(), "tflops": "fast"}, {**rec.to_wire(), "memory_bytes": 1.5},
                   {**rec.to_wire(), "state": "dancing"}, {k: v for k, v in rec.to_wire().items() if k != "peer_id"},
                   {**rec.to_wire(), "bandwidth_bps": {str(i): 1.0 for i in range(MAX_LINKS + 1)}}, "garbage", None):
        assert MemberRecord.from_wire(broken) is None


def test_records_keep_only_the_newest_links():
    rec = record("A", bandwidth_bps={f"p{i}": float(i) for i in range(MAX_LINKS + 8)})
    wire = rec.to_wire()["bandwidth_bps"]
    assert len(wire) == MAX_LINKS and "p0" not in wire and f"p{MAX_LINKS + 7}" in wire


def test_bandwidth_rule():
    view = MembershipView({"A": record("A", bandwidth_bps={"B": 10e6, "C": 50e6}),
                           "B": record("B", bandwidth_bps={"A": 8e6}),
                           "C": record("C"), "D": record("D")}, time.time())
    assert view.bandwidth("A", "B") == 8e6                  # the smaller measured direction
    assert view.bandwidth("B", "C") == 8e6                  # unmeasured: weaker median access link
    assert view.bandwidth("C", "D") == DEFAULT_BANDWIDTH_BPS  # nothing known
    assert set(view.bandwidth_matrix()["A"]) == {"B", "C", "D"}


@pytest.fixture
def two_dhts():
    keys = [RSAPrivateKey(), RSAPrivateKey()]
    validators = [make_validators("t", k) for k in keys]
    first = SwarmDHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=validators[0])
    second = SwarmDHT(initial_peers=[str(a) for a in first.get_visible_maddrs()], start=True,
                      host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=validators[1])
    yield (first, second), validators
    first.shutdown()
    second.shutdown()


def test_hostile_writes_are_refused(two_dhts):
    (first, second), validators = two_dhts
    first_id = peer_id_of(validators[0][0]._private_key.get_public_key())  # the signer's peer id
    assert Membership(first, validators[0][0], "t").publish(record(first_id))
    expires = get_dht_time() + 30
    own_subkey, other_subkey = validators[1][0].local_public_key, validators[0][0].local_public_key
    assert not second.store("t_members", {"peer_id": 5}, expires, subkey=own_subkey)               # wrong shape
    assert not second.store("t_members", record("forged").to_wire(), expires, subkey=other_subkey)  # not the owner
    assert not second.store("t_members", "flat value", expires)                                     # no subkey
    # well-formed and signed by its owner, but claiming another peer's id: stored, yet ignored by readers
    assert Membership(second, validators[1][0], "t").publish(record(first_id, tflops=99.0))
    view = Membership(second, validators[1][0], "t").view()
    assert list(view.members) == [first_id] and view.members[first_id].tflops == 1.0
