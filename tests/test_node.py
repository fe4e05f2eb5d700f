"""Real node processes on loopback: membership, TTL expiry, persistent identity, clean exits."""
import json
import random
import signal
import socket

import pytest

from swarm.config import NetworkConfig
from swarm.estimator.profile import load_or_measure
from swarm.net.membership import Membership, make_validators
from swarm.node import start_dht
from swarm.procs import load_ready
from tests.conftest import node_config, run_cli
from tests.swarmproc import Proc, p2pd_pids, wait_until


def start_node(procs, tmp_path, name, bootstrap):
    proc = Proc("node.py", "run", "--config", node_config(tmp_path), "--initial-peers", bootstrap,
                "--identity", str(tmp_path / f"{name}.id"), ready_file=tmp_path / f"{name}.ready.json")
    procs.append(proc)
    return proc


@pytest.mark.scenario   # 90 s of node processes: run by `python -m benchmarks.scenarios` (the suite keeps
# tests/test_liveness.py's TTL rules on two real DHTs and test_node_loop's identity and ready-file checks)
def test_six_nodes_membership_ttl_and_identity(tmp_path, swarm_procs):
    load_or_measure("cpu")  # measured once here; nodes read the cache
    boot = Proc("-m", "bootstrap.bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--identity", str(tmp_path / "boot.id"),
                ready_file=tmp_path / "boot.ready.json")
    swarm_procs.append(boot)
    bootstrap = boot.maddr(30)
    names = [f"n{i}" for i in range(6)]
    random.Random(7).shuffle(names)
    nodes = {name: start_node(swarm_procs, tmp_path, name, bootstrap) for name in names}
    peer_ids = {name: p.peer_id(60) for name, p in nodes.items()}

    net = NetworkConfig(initial_peers=[bootstrap], host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    from hivemind.utils.crypto import RSAPrivateKey
    validators = make_validators(net.prefix, RSAPrivateKey())
    observer = start_dht(net, [bootstrap], validators, identity=None, client_mode=True)
    try:
        membership = Membership(observer, validators[0], net.prefix)
        wait_until(lambda: set(membership.view().members) == set(peer_ids.values()), 60, what="all 6 nodes visible")
        view = membership.view()
        assert all(r.tflops > 0 and r.device == "cpu" and r.versions["swarm"] for r in view.members.values())
        assert all(r.precision == "fp32" and r.memory_limit_bytes is None for r in view.members.values())

        status = run_cli("status", "--initial-peers", bootstrap, "--json", timeout=60)
        assert status.returncode == 0, status.stderr
        assert {m["peer_id"] for m in json.loads(status.stdout)} == set(peer_ids.values())
        assert all(m["precision"] == "fp32" and "memory_peak_bytes" in m for m in json.loads(status.stdout))
        table = run_cli("status", "--initial-peers", bootstrap, timeout=60)   # and the table says it per member
        assert table.returncode == 0 and "mem GB used/cap" in table.stdout and table.stdout.count(" fp32 ") == 6, table.stdout

        victim = names[2]
        nodes[victim].kill(signal.SIGKILL)
        wait_until(lambda: peer_ids[victim] not in membership.view().members, 30, what="killed node expired")
        assert len(membership.view().members) == 5

        again = start_node(swarm_procs, tmp_path, victim, bootstrap)
        assert again.peer_id(60) == peer_ids[victim]
        wait_until(lambda: peer_ids[victim] in membership.view().members, 30, what="restarted node visible")

        leaver = names[4]
        nodes[leaver].kill(signal.SIGTERM)
        assert nodes[leaver].popen.wait(timeout=60) == 0   # network.leave_timeout_s: the hand-over's bound
        assert load_ready(nodes[leaver].ready_file)["state"] == "offline"   # its last word, before it exited
        wait_until(lambda: peer_ids[leaver] not in membership.view().members, 10, what="leaver gone before its TTL")
    finally:
        observer.shutdown()


def test_unreachable_bootstrap_fails_in_one_line(tmp_path, swarm_procs):
    before = p2pd_pids()
    res = run_cli("run", "--config", node_config(tmp_path, startup_timeout_s=5), "--identity", str(tmp_path / "x.id"),
                  "--initial-peers", "/ip4/127.0.0.1/tcp/9/p2p/QmbpBtjbbHJgp6dXBPmtZQLmj6YgAGu9LSccs5L7DCbWKB", timeout=60)
    assert res.returncode == 2 and "no bootstrap peer reachable" in res.stderr
    assert "Traceback" not in res.stderr and len([line for line in res.stderr.splitlines() if line.startswith("error")]) == 1
    assert p2pd_pids() <= before


@pytest.mark.parametrize("flag, value, message", [
    ("--initial-peers", "/ip4/1.2.3/tcp/1", "invalid multiaddr in initial peers"),
    ("--initial-peers", "/ip4/127.0.0.1/tcp/1", "lacks /p2p/<peer id>"),
    ("--host-maddrs", "/ip9/x", "invalid multiaddr in host_maddrs"),
])
def test_bad_multiaddrs(tmp_path, flag, value, message):
    args = ["run", "--config", node_config(tmp_path), "--identity", str(tmp_path / "y.id")]
    if flag != "--initial-peers":
        args += ["--initial-peers"]
    res = run_cli(*args, flag, value, timeout=60)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr


def test_port_in_use_and_unreadable_identity(tmp_path, swarm_procs):
    before = p2pd_pids()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = run_cli("run", "--config", node_config(tmp_path), "--initial-peers", "--identity", str(tmp_path / "z.id"),
                      "--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}", timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "address already in use" in res.stderr or "cannot start the DHT" in res.stderr
    bad = tmp_path / "garbage.id"
    bad.write_bytes(b"not a key")
    res = run_cli("run", "--config", node_config(tmp_path), "--initial-peers", "--identity", str(bad), timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "garbage.id" in res.stderr, res.stderr
    assert p2pd_pids() <= before


def test_unreadable_identity_file_as_non_root(tmp_path):
    ident = tmp_path / "locked.id"
    ident.write_bytes(b"x")
    ident.chmod(0)
    res = run_cli("run", "--config", node_config(tmp_path), "--initial-peers", "--identity", str(ident), timeout=60)
    assert res.returncode == 2 and "locked.id" in res.stderr and "Traceback" not in res.stderr


def test_bandwidth_is_measured_over_the_swarm_transport(tmp_path, swarm_procs):
    load_or_measure("cpu")
    cfg = node_config(tmp_path, probe_interval_s=1.0)
    first = Proc("node.py", "run", "--config", cfg, "--initial-peers", "--identity", str(tmp_path / "a.id"),
                 ready_file=tmp_path / "a.ready.json")
    swarm_procs.append(first)
    addr = first.maddr(60)
    second = Proc("node.py", "run", "--config", cfg, "--initial-peers", addr, "--identity", str(tmp_path / "b.id"),
                  ready_file=tmp_path / "b.ready.json")
    swarm_procs.append(second)
    second.ready(60)

    def both_measured():
        res = run_cli("status", "--initial-peers", addr, "--json", timeout=60)
        members = json.loads(res.stdout) if res.returncode == 0 else []
        return members if len(members) == 2 and all(m["bandwidth_bps"] for m in members) else None

    members = wait_until(both_measured, 60, what="both nodes measured each other")
    ids = {m["peer_id"] for m in members}
    for m in members:
        (other, bps), = m["bandwidth_bps"].items()
        assert other in ids - {m["peer_id"]}
        assert bps > 200e6  # unshaped loopback through p2pd: ~1-3 Gbit/s here
        assert 0 < m["rtt_s"][other] < 0.1


def test_probe_rejects_oversized_and_stalled_streams():
    import asyncio
    import struct

    from swarm.net.membership import SwarmDHT
    from swarm.net.probe import PROBE, LinkProber

    a = SwarmDHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    b = SwarmDHT(initial_peers=[str(x) for x in a.get_visible_maddrs()], start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])

    async def scenario():
        pa, pb = await a.replicate_p2p(), await b.replicate_p2p()
        await LinkProber(pa).serve()
        _, reader, writer = await pb.call_binary_stream_handler(pa.peer_id, PROBE)
        writer.write(struct.pack(">Q", 1 << 40))  # claims a terabyte
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed without an answer
        bandwidth, rtt = await LinkProber(pb).measure(pa.peer_id, target_s=0.2)  # the server still serves
        assert bandwidth > 0 and rtt > 0

    try:
        asyncio.run(scenario())
    finally:
        a.shutdown()
        b.shutdown()
