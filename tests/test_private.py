"""Private swarms: members admit each other; an outsider can neither join, read, write nor call RPCs."""
import asyncio
import functools
import json

import pytest
from hivemind.p2p import PeerID
from hivemind.utils.crypto import RSAPrivateKey

from swarm.config import NetworkConfig
from swarm.estimator.profile import load_or_measure
from swarm.net.auth import CredentialChecker, issue_credential, load_identity, peer_id_of
from swarm.net.membership import MemberRecord, Membership, make_validators
from swarm.net.private import init_swarm
from swarm.net.probe import LinkProber
from tests.conftest import node_config, run_cli
from tests.swarmproc import Proc, wait_until


def test_credentials_bind_peer_authority_and_expiry(tmp_path):
    files = init_swarm(str(tmp_path / "lab"), "lab", n_members=1)
    identity = load_identity(files.members[0].identity_path, create=False)
    cred = json.loads(open(files.members[0].credential_path).read())
    checker = CredentialChecker(cred["authority"])
    other_authority = RSAPrivateKey()
    good = issue_credential(load_authority_key(tmp_path / "lab"), "lab", identity.public_key, 1)
    assert checker.valid(good.token) and good.peer_id == identity.peer_id
    assert not checker.valid(issue_credential(other_authority, "lab", identity.public_key, 1).token)
    assert not checker.valid(good.token, now=good.expires_at + 1)
    forged = type(good.token)()
    forged.CopyFrom(good.token)
    forged.username = load_identity(str(tmp_path / "other.id")).peer_id  # someone else's peer id, same signature
    assert not checker.valid(forged)
    assert checker.valid_bytes(b"\xff garbage") is None


def load_authority_key(root):
    from swarm.net.auth import load_authority
    return load_authority(str(root / "authority.key"))


@pytest.mark.scenario   # 90 s of node processes: run by `python -m benchmarks.scenarios` (the suite keeps
# the credential checks above, tests/test_election_hostile.py and the private demo of tests/test_training.py)
def test_private_swarm_admits_members_and_refuses_an_outsider(tmp_path, swarm_procs):
    load_or_measure("cpu")
    files = init_swarm(str(tmp_path / "lab"), "lab", n_members=3)
    boot_m, a_m, b_m = files.members
    boot = Proc("-m", "bootstrap.bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
                "--identity", boot_m.identity_path, "--credentials", boot_m.credential_path,
                ready_file=tmp_path / "boot.ready.json")
    swarm_procs.append(boot)
    bootstrap = boot.maddr(30)
    assert bootstrap.endswith(boot_m.peer_id)  # the identity's peer id is the one p2pd uses

    cfg = node_config(tmp_path, probe_interval_s=1.0)
    nodes = []
    for m in (a_m, b_m):
        nodes.append(Proc("node.py", "run", "--config", cfg, "--initial-peers", bootstrap,
                          "--identity", m.identity_path, "--credentials", m.credential_path,
                          ready_file=tmp_path / f"{m.peer_id[-8:]}.ready.json"))
        swarm_procs.append(nodes[-1])
    a_maddr = nodes[0].maddr(60)
    nodes[1].ready(60)

    def members_status(*extra):
        return run_cli("status", "--config", cfg, "--initial-peers", bootstrap, "--json", *extra, timeout=60)

    def measured_each_other():  # the probe RPC admits members
        res = members_status("--identity", a_m.identity_path, "--credentials", a_m.credential_path)
        records = {m["peer_id"]: m for m in json.loads(res.stdout)} if res.returncode == 0 else {}
        return set(records) == {a_m.peer_id, b_m.peer_id} and b_m.peer_id in records[a_m.peer_id]["bandwidth_bps"]

    wait_until(measured_each_other, 90, interval_s=2, what="members see and measure each other")

    # an outsider cannot join (no credential, or a credential of another swarm) nor read the member table
    foreign = init_swarm(str(tmp_path / "foreign"), "lab", n_members=1).members[0]
    for extra in ([], ["--credentials", foreign.credential_path]):
        res = run_cli("run", "--config", node_config(tmp_path, startup_timeout_s=5), "--initial-peers", bootstrap,
                      "--identity", foreign.identity_path, *extra, timeout=60)
        assert res.returncode == 2 and "no bootstrap peer reachable" in res.stderr and "Traceback" not in res.stderr
        res = members_status("--identity", foreign.identity_path, *extra)
        assert res.returncode == 2 and "Traceback" not in res.stderr

    # an outsider that starts its own DHT anyway can neither write nor read records, nor call RPCs
    net = NetworkConfig(host_maddrs=["/ip4/127.0.0.1/tcp/0"], startup_timeout_s=10)
    outsider_key = RSAPrivateKey()
    validators = make_validators(net.prefix, outsider_key)
    outsider = start_dht_anyway(net, [bootstrap, a_maddr], validators)
    try:
        membership = Membership(outsider, validators[0], net.prefix)
        own = MemberRecord(peer_id=peer_id_of(outsider_key.get_public_key()), maddrs=[], device="cpu",
                           device_name="x", tflops=1.0, memory_bytes=1, versions={}, started_at=0.0)
        membership.publish(own, timeout_s=10)  # well-formed and signed, but members refuse the store
        assert set(membership.view().members).isdisjoint({a_m.peer_id, b_m.peer_id})  # and it reads nothing
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError, OSError)):
            outsider.run_coroutine(functools.partial(_probe, peer=a_m.peer_id), return_future=True).result(30)
    finally:
        outsider.shutdown()
    res = members_status("--identity", b_m.identity_path, "--credentials", b_m.credential_path)
    assert {m["peer_id"] for m in json.loads(res.stdout)} == {a_m.peer_id, b_m.peer_id}  # the outsider's record is not there


def start_dht_anyway(net, peers, validators):
    from swarm.net.membership import SwarmDHT
    return SwarmDHT(initial_peers=peers, start=True, host_maddrs=net.host_maddrs, record_validators=validators,
                    client_mode=False, ensure_bootstrap_success=False, startup_timeout=net.startup_timeout_s)


async def _probe(dht, node, peer: str):
    return await LinkProber(node.p2p).probe_once(PeerID.from_base58(peer), 1000, timeout_s=20)
