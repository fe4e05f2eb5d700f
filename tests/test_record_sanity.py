"""Member records and ballots are sane before they are believed: numbers finite and within physical
bounds, sizes capped, updated_at near now, liveness capped at the TTL whatever DHT expiration the writer
chose; a bad record is ignored and named in one log line; this node never fails to publish over a
peer's value (issue 22, item 2)."""
import math

import pytest
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from swarm.errors import SwarmError
from swarm.net.auth import peer_id_of
from swarm.net.membership import Membership, SwarmDHT, make_validators
from swarm.net.records import (
    MAX_BANDWIDTH_BPS,
    MAX_COUNT,
    MAX_CREDENTIAL_BYTES,
    MAX_ID_CHARS,
    MAX_LINKS,
    MAX_MADDRS,
    MAX_TFLOPS,
    MemberRecord,
    check_record,
    parse_record,
)
from swarm.refusals import short
from tests.loglines import swarm_lines


@pytest.fixture
def log_lines(caplog):
    return swarm_lines(caplog)

def record(peer: str = "A", **kw) -> MemberRecord:
    now = get_dht_time()
    fields = dict(maddrs=["/ip4/127.0.0.1/tcp/1"], device="cpu", device_name="test", tflops=1.0, memory_bytes=1 << 30,
                  versions={"swarm": "0"}, started_at=now - 10, updated_at=now, bandwidth_bps={"B": 1e8},
                  rtt_s={"B": 0.01}, stage=1, vote_epoch=3, vote_hash="ab" * 8, committed_epoch=2,
                  committed_hash="cd" * 8, role="stage 1", step=10, codec_bps=1e8, model_tflops=0.5, cpu_cores=2.0,
                  holds=[[0, 5, 10]], ready="cd" * 8, credential=b"x" * 100)
    return MemberRecord(peer_id=peer, **{**fields, **kw})


NAN, INF = math.nan, math.inf
BAD = [  # (field, value, what the refusal says)
    *[("tflops", v, "tflops") for v in (0.0, -1.0, 1e9, INF, NAN)],
    *[("model_tflops", v, "model_tflops") for v in (0.0, -1.0, MAX_TFLOPS * 1.01, INF, NAN)],
    *[("memory_bytes", v, "memory_bytes") for v in (-1, (1 << 44) + 1)],
    *[("bandwidth_bps", {"B": v}, "bandwidth_bps") for v in (-1.0, 0.0, NAN, INF, MAX_BANDWIDTH_BPS * 1.01)],
    *[("rtt_s", {"B": v}, "rtt_s") for v in (0.0, -0.1, 300.5, NAN)],
    *[("codec_bps", v, "codec_bps") for v in (0.0, 1.1e13, NAN)],
    *[("cpu_cores", v, "cpu_cores") for v in (0.0, 4097.0, INF)],
    *[(name, v, name) for name in ("step", "vote_epoch", "committed_epoch") for v in (-1, MAX_COUNT)],
    ("stage", -1, "stage"), ("stage", 4096, "stage"),
    ("holds", [[0, 5, MAX_COUNT]], "holds"), ("holds", [[0, MAX_COUNT, 1]], "holds"), ("holds", [[5, 5, 1]], "holds"),
    ("holds", [[0, 1, 1]] * 17, "holds"),
    ("started_at", INF, "started_at"), ("started_at", NAN, "started_at"), ("updated_at", NAN, "updated_at"),
    ("peer_id", "p" * (MAX_ID_CHARS + 1), "peer_id"),
    *[(name, "h" * (MAX_ID_CHARS + 1), name) for name in ("vote_hash", "committed_hash", "ready")],
    *[(name, "n" * 129, name) for name in ("device", "device_name", "role")],
    ("maddrs", ["/ip4/1.2.3.4/tcp/1"] * (MAX_MADDRS + 1), "maddrs"), ("maddrs", ["/" + "a" * 256], "maddrs entry"),
    ("versions", {f"v{i}": "1" for i in range(17)}, "versions"), ("versions", {"swarm": "9" * 129}, "versions entry"),
    ("credential", b"c" * (MAX_CREDENTIAL_BYTES + 1), "credential"),
    ("bandwidth_bps", {"k" * (MAX_ID_CHARS + 1): 1e6}, "bandwidth_bps peer id"),
    ("rtt_s", {str(i): 0.01 for i in range(MAX_LINKS + 1)}, "rtt_s"),
    ("state", "dancing", "state"),
]


@pytest.mark.parametrize("name,value,said", BAD, ids=[f"{n}={str(v)[:20]}" for n, v, _ in BAD])
def test_every_bound_refuses_and_says_which(name, value, said):
    wire = {**record().to_wire(), name: value}
    rec, reason = parse_record(wire)
    assert rec is None and MemberRecord.from_wire(wire) is None
    assert reason.startswith(said), reason
    assert len(reason) < 120   # a log line, whatever the sender put in


def test_the_bounds_themselves_are_sane_values():
    edge = record("p" * MAX_ID_CHARS, tflops=MAX_TFLOPS, memory_bytes=1 << 44, bandwidth_bps={"B": MAX_BANDWIDTH_BPS},
                  rtt_s={"B": 300.0}, codec_bps=1e13, cpu_cores=4096.0, step=MAX_COUNT - 1, vote_epoch=MAX_COUNT - 1,
                  committed_epoch=0, holds=[[0, MAX_COUNT - 1, MAX_COUNT - 1]], stage=0,
                  credential=b"c" * MAX_CREDENTIAL_BYTES)
    assert MemberRecord.from_wire(edge.to_wire()) == edge
    bare = record(model_tflops=None, codec_bps=None, cpu_cores=None, step=None, holds=None, credential=None, stage=None)
    assert MemberRecord.from_wire(bare.to_wire()) == bare


def test_updated_at_must_be_near_now():
    now, ttl = get_dht_time(), 30.0
    assert check_record(record(updated_at=now + ttl - 1), now, ttl) is None        # clock skew up to a TTL
    assert "in the future" in check_record(record(updated_at=now + ttl + 1), now, ttl)
    assert "in the future" in check_record(record(updated_at=1e12), now, ttl)
    assert "past the 30 s TTL" in check_record(record(updated_at=now - ttl - 1), now, ttl)
    assert check_record(record(updated_at=now - ttl - 1)) is None                  # no clock given: bounds only


def test_own_measurements_are_clamped_so_this_node_always_publishes_a_sane_record():
    own = record(tflops=INF, bandwidth_bps={"B": 5e14, "C": NAN, "D": -1.0, "E": 1e7}, rtt_s={"B": 1e4, "C": INF},
                 codec_bps=1e20, model_tflops=NAN, cpu_cores=INF, memory_bytes=1 << 50,
                 maddrs=[f"/ip4/10.0.0.{i}/tcp/1" for i in range(40)], device_name="x" * 500,
                 versions={f"v{i}": "1" for i in range(40)})
    wire = own.to_wire()
    back, reason = parse_record(wire)
    assert reason is None, reason
    assert back.tflops == MAX_TFLOPS and back.bandwidth_bps == {"B": MAX_BANDWIDTH_BPS, "E": 1e7}
    assert back.rtt_s == {"B": 300.0} and back.codec_bps == 1e13 and back.model_tflops is None and back.cpu_cores is None
    assert back.memory_bytes == 1 << 44 and len(back.maddrs) == MAX_MADDRS and len(back.versions) == 16


@pytest.fixture(scope="module")
def dhts():
    keys = [RSAPrivateKey(), RSAPrivateKey()]
    validators = [make_validators("s", k) for k in keys]
    first = SwarmDHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=validators[0])
    second = SwarmDHT(initial_peers=[str(a) for a in first.get_visible_maddrs()], start=True,
                      host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=validators[1])
    ids = [peer_id_of(k.get_public_key()) for k in keys]
    yield (first, second), [v[0] for v in validators], ids
    first.shutdown()
    second.shutdown()


def store(dht, signer, key: str, value, expiration: float) -> bool:
    """Store as a hostile writer would: any value, any expiration, past every check of ``publish``."""
    return dht.store(key, value, expiration, subkey=signer.local_public_key)


def test_a_bad_record_is_ignored_and_named_in_one_log_line(dhts, log_lines):
    (first, second), signers, ids = dhts
    lines = log_lines
    reader = Membership(first, signers[0], "s", ttl_s=30.0)
    assert Membership(first, signers[0], "s", ttl_s=30.0).publish(record(ids[0]))
    assert store(second, signers[1], "s_members", record(ids[1], tflops=INF).to_wire() | {"tflops": INF}, get_dht_time() + 30)
    for _ in range(3):
        assert set(reader.view().members) == {ids[0]}
    refused = [line for line in lines if short(ids[1]) in line]
    assert refused == [f"refused record from {short(ids[1])}: tflops inf out of range"], lines
    assert reader.refusals.total("record") == 3          # every refusal is counted, one is logged
    # the liar's bandwidth claim to every member: ignored the same way (it ended every node before)
    lines.clear()
    reader = Membership(first, signers[0], "s", ttl_s=30.0)
    assert store(second, signers[1], "s_members", record(ids[1]).to_wire() | {"bandwidth_bps": {ids[0]: -1.0}},
                 get_dht_time() + 30)
    assert set(reader.view().members) == {ids[0]}
    assert lines == [f"refused record from {short(ids[1])}: bandwidth_bps -1 out of range"]


def test_liveness_is_capped_at_the_ttl_from_updated_at_whatever_the_dht_expiration(dhts, log_lines):
    (first, second), signers, ids = dhts
    lines = log_lines
    ttl = 5.0
    reader = Membership(first, signers[0], "s", ttl_s=ttl)
    year = get_dht_time() + 365 * 86400
    # stored once with a one-year expiration, updated_at a TTL and a bit ago: its writer is gone
    assert store(second, signers[1], "s_members", record(ids[1], updated_at=get_dht_time() - ttl - 1).to_wire(), year)
    assert ids[1] not in reader.view().members
    assert len(lines) == 1 and lines[0].startswith(f"refused record from {short(ids[1])}: updated_at ")
    assert lines[0].endswith(f"s old, past the {ttl:g} s TTL")
    # updated_at far in the future would keep it live for ever: refused too
    assert store(second, signers[1], "s_members", record(ids[1], updated_at=1e12).to_wire(), year + 1)
    reader.refusals.interval_s = 0.0
    assert ids[1] not in reader.view().members and "in the future" in lines[-1]
    # the same long expiration with a fresh updated_at counts, until updated_at + ttl
    assert store(second, signers[1], "s_members", record(ids[1], updated_at=get_dht_time()).to_wire(), year + 2)
    assert ids[1] in reader.view().members


def test_ballots_out_of_schema_bounds_are_ignored_and_logged(dhts, log_lines):
    (first, second), signers, ids = dhts
    lines = log_lines
    reader = Membership(first, signers[0], "s")
    reader.refusals.interval_s = 0.0
    good = {"epoch": 4, "plan_hash": "ab" * 8, "proposer": ids[1], "members": sorted(ids), "plan": "{}"}
    expires = get_dht_time() + 60
    for i, (bad, said) in enumerate((({"epoch": 1 << 60}, "epoch"), ({"epoch": -1}, "epoch"), ({"plan_hash": "h" * 65}, "plan_hash"),
                      ({"members": sorted(f"{i:04}" for i in range(1025))}, "members has more than 1024 entries"),
                      ({"members": ["m" * 65]}, "members entry longer"), ({"proposer": ids[0]}, "proposer is not its signer"),
                      ({"members": list(reversed(sorted(ids)))}, "members not sorted"))):
        assert store(second, signers[1], "s_ballots", good | bad, expires + i)   # each newer than the last
        assert reader.ballots() == {}
        assert lines[-1].startswith(f"refused ballot from {short(ids[1])}: {said}"), lines[-1]
    assert store(second, signers[1], "s_ballots", good, expires + 10)
    assert reader.ballots() == {ids[1]: good}


def test_publishing_refuses_out_of_range_values_with_a_swarm_error(dhts):
    (first, _), signers, ids = dhts
    membership = Membership(first, signers[0], "s")
    with pytest.raises(SwarmError, match="cannot publish a ballot: epoch 1844.* out of range"):
        membership.publish_ballot(1 << 64, "ab" * 8, ids[0], [ids[0]], "{}")   # an OverflowError in the DHT before
    with pytest.raises(SwarmError, match="cannot publish a ballot: epoch"):
        membership.publish_ballot(MAX_COUNT, "ab" * 8, ids[0], [ids[0]], "{}")
    with pytest.raises(SwarmError, match="member record is out of bounds: vote_epoch"):
        membership.publish(record(ids[0], vote_epoch=1 << 64))
    assert membership.publish_ballot(MAX_COUNT - 1, "ab" * 8, ids[0], [ids[0]], "{}")
    assert membership.ballots()[ids[0]]["epoch"] == MAX_COUNT - 1
