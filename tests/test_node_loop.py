"""The node as composition root (swarm/node/): its one event loop and call_sync, signals that never
deadlock, a taken port refused before p2pd starts, the ready file, and tick = view -> elect -> adopt
-> advertise with one publish per heartbeat."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from swarm.config import NetworkConfig
from swarm.errors import ConfigError, SwarmError
from swarm.net.membership import MembershipView
from swarm.net.records import MemberRecord, MemberState
from swarm.node import Node, NodeLoop, check_ports, ready_info, stop_on_signals, write_ready
from swarm.node.connectivity import ConnectivityAdvert
from swarm.node.probes import LinkAdvert
from swarm.planning import ElectionAdvert
from tests.conftest import node_config, run_cli
from tests.swarmproc import Proc


def test_call_sync_runs_on_the_loop_thread_and_times_out_cleanly():
    loop = NodeLoop()
    try:
        async def where() -> str:
            await asyncio.sleep(0)
            return threading.current_thread().name
        assert loop.call_sync(where(), 5) == "transport"
        cancelled = threading.Event()

        async def forever():
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        with pytest.raises(TimeoutError):
            loop.call_sync(forever(), 0.2)
        assert cancelled.wait(5)   # not left running on the loop
        future = loop.submit(where())
        assert future.result(5) == "transport"
    finally:
        loop.close()
    assert not loop.thread.is_alive()


def test_repeated_sigterm_and_sigint_during_wait_never_hang():
    """The handler only sets a flag and writes a byte (no lock): hundreds of signals, from this thread
    and another, at any moment of ``wait``, and every wait still returns within its bound."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    stop_sending = threading.Event()

    def pelt():
        while not stop_sending.is_set():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.0005)

    started = time.monotonic()
    with stop_on_signals() as stop:
        assert not stop.wait(0.05) and not stop.is_set()
        sender = threading.Thread(target=pelt, daemon=True)
        sender.start()
        try:
            for i in range(300):
                if i % 3 == 0:
                    signal.raise_signal(signal.SIGINT if i % 2 else signal.SIGTERM)
                t = time.monotonic()
                assert stop.wait(0.01) is True
                assert time.monotonic() - t < 1.0
        finally:
            stop_sending.set()
            sender.join(5)
        assert stop.is_set() and stop.wait() is True   # set: even an unbounded wait returns
    assert time.monotonic() - started < 30
    assert {sig: signal.getsignal(sig) for sig in before} == before   # the previous handlers are back


def test_a_wait_returns_when_another_thread_stops_the_node():
    with stop_on_signals() as stop:
        threading.Timer(0.2, stop.set).start()
        t = time.monotonic()
        assert stop.wait(10) and time.monotonic() - t < 5
    with stop_on_signals() as stop:
        t = time.monotonic()
        assert not stop.wait(0.3) and 0.25 < time.monotonic() - t < 2


def listener(reuseport: bool, host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket()
    if reuseport:   # as libp2p does: a second such listener would share the port silently
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, 0))
    s.listen()
    return s


@pytest.mark.parametrize("reuseport", [False, True])
def test_a_taken_port_is_refused_in_one_line(reuseport):
    with listener(reuseport) as s:
        port = s.getsockname()[1]
        for host in ("127.0.0.1", "0.0.0.0"):
            maddrs = [f"/ip4/{host}/tcp/{port}"]
            with pytest.raises(ConfigError, match=rf"^cannot listen on /ip4/{host}/tcp/{port}: address already in use$"):
                check_ports(NetworkConfig(host_maddrs=maddrs))
    check_ports(NetworkConfig(host_maddrs=[f"/ip4/127.0.0.1/tcp/{port}", "/ip4/127.0.0.1/tcp/0"]))   # free again
    check_ports(NetworkConfig(host_maddrs=["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/9/quic"]))   # nothing to check


def test_the_ready_file_is_replaced_whole(tmp_path):
    path = tmp_path / "ready.json"
    record = MemberRecord("Qm1", ["/ip4/127.0.0.1/tcp/5/p2p/Qm1"], "cpu", "test", 1.0, 1 << 30, {}, 0.0,
                          role="stage 1", stage=1, step=7, committed_hash="ab" * 8, ready="ab" * 8)
    info = ready_info(record)
    assert set(info) >= {"peer_id", "maddrs", "state", "role", "stage", "step", "plan_hash", "pid", "updated_at"}
    assert info["state"] == "online" and info["stage"] == 1 and info["plan_hash"] == "ab" * 8 and info["pid"] == os.getpid()
    seen, done = [], threading.Event()

    def read():
        while not done.is_set():
            try:
                seen.append(json.loads(path.read_text()))
            except FileNotFoundError:
                pass
    reader = threading.Thread(target=read)
    reader.start()
    try:
        for step in range(300):
            write_ready(path, {**info, "step": step, "maddrs": info["maddrs"] * 50})   # big enough to be written in parts
    finally:
        done.set()
        reader.join(10)
    assert seen and all(len(s["maddrs"]) == 50 for s in seen)   # never half a file (json.loads would have raised)
    assert json.loads(path.read_text())["step"] == 299 and [p.name for p in tmp_path.iterdir()] == ["ready.json"]


@dataclass(frozen=True)
class Holding:   # a follower's advert, as HoldingAdvert
    ready: str | None
    step: int
    holds: list | None = None
    observed_tflops: dict | None = None
    distrusts: list | None = None


def test_tick_reads_the_view_elects_adopts_and_publishes_once(tmp_path):
    """With stand-ins for the DHT and the components: the record is what their adverts say, published
    once per heartbeat, and the ready file follows it."""
    calls, published = [], []
    me = MemberRecord("me", ["/ip4/127.0.0.1/tcp/5"], "cpu", "test", 1.0, 1 << 30, {}, 0.0)
    plan = SimpleNamespace(hash="p" * 16, members=("me",))

    class Membership:
        def view(self):
            calls.append("view")
            return MembershipView({"me": published[-1]} if published else {}, time.time())

        def publish(self, record, timeout_s=10.0):
            calls.append("publish")
            published.append(record)
            return True

    class Elector:
        plan = None
        advert = ElectionAdvert()

        def electorate(self, view):
            return view

        def step(self, view):
            calls.append("elect")
            self.plan = plan
            return ElectionAdvert(3, plan.hash, 3, plan.hash, "stage 0", 0)

    class Follower:
        def follow(self, committed, view):
            calls.append("adopt")
            assert committed is plan
            return Holding(plan.hash, 12)

        def codec(self):
            return None

    class Probes:
        def alive(self, view, me, ttl_s):
            return view

        def step(self, peers):
            calls.append("probe")

        def advert(self):
            return LinkAdvert({"b": 1e8}, {"b": 0.01})

        def unreachable(self):
            return []

    class Connectivity:
        paths: dict = {}

        def step(self, view, me):
            calls.append("reach")

        def advert(self, members):
            return ConnectivityAdvert(["/ip4/127.0.0.1/tcp/5/p2p/me"], "public", None)

    node = Node(SimpleNamespace(), NetworkConfig(heartbeat_s=0.5, ttl_s=8.0), str(tmp_path / "ready.json"))
    node.membership, node.record, node.elector, node.follower, node.probes = Membership(), me, Elector(), Follower(), Probes()
    node.connectivity = Connectivity()
    node.tick()   # our own record is not in the DHT yet: no election
    assert calls == ["view", "probe", "reach", "publish"]
    calls.clear()
    wait = node.tick()
    assert calls == ["view", "probe", "reach", "elect", "adopt", "publish"]
    r = published[-1]
    assert (r.vote_hash, r.committed_epoch, r.role, r.stage, r.ready, r.step) == (plan.hash, 3, "stage 0", 0, plan.hash, 12)
    assert r.bandwidth_bps == {"b": 1e8} and r.state == MemberState.ONLINE and me.stage is None   # merged copies
    assert r.reachability == "public" and r.maddrs == ["/ip4/127.0.0.1/tcp/5/p2p/me"]
    assert wait == 0.5   # the view has not seen the commit yet
    assert node.tick() == 2.0 and len(published) == 3   # steady: a quarter of the TTL
    info = json.loads((tmp_path / "ready.json").read_text())
    assert (info["role"], info["stage"], info["step"], info["plan_hash"], info["state"]) == ("stage 0", 0, 12, plan.hash, "online")


def test_a_second_node_on_a_taken_port_fails_and_the_ready_file_tells_a_nodes_life(tmp_path, swarm_procs):
    """A bootstrap peer (p2pd binds with SO_REUSEPORT) holds a port: a node asked to listen there exits
    with the one-line error instead of sharing it; a node with a ready file says who and where it is,
    and that it went offline after SIGTERM."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    boot = Proc("-m", "bootstrap.bootstrap", "--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}",
                "--identity", str(tmp_path / "boot.id"), ready_file=tmp_path / "boot.ready.json")
    swarm_procs.append(boot)
    bootstrap = boot.maddr(30)
    res = run_cli("run", "--config", node_config(tmp_path), "--initial-peers", bootstrap,
                  "--identity", str(tmp_path / "n.id"), "--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}", timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"cannot listen on /ip4/127.0.0.1/tcp/{port}: address already in use" in res.stderr
    alone = node_config(tmp_path, election={"join_batch_s": 1})   # a plan of one without the 20 s join batch
    node = Proc("node.py", "run", "--config", alone, "--initial-peers", bootstrap,
                "--identity", str(tmp_path / "m.id"), ready_file=tmp_path / "m.ready")
    swarm_procs.append(node)
    info = node.ready(90)
    assert info["peer_id"].startswith("Qm") and info["maddrs"] and info["state"] == "online" and info["pid"] == node.popen.pid
    node.ready(60, until=lambda i: i["role"] is not None, what="the node's role in a plan")   # alone: a plan of one
    node.kill(signal.SIGTERM)
    assert node.popen.wait(60) == 0
    assert json.loads((tmp_path / "m.ready").read_text())["state"] == "offline"


def test_run_node_turns_a_bad_start_into_one_error(tmp_path):
    """Failures in ``start`` leave nothing running (the DHT never started: the port check comes first)."""
    with listener(True) as s:
        net = NetworkConfig(host_maddrs=[f"/ip4/127.0.0.1/tcp/{s.getsockname()[1]}"], initial_peers=[])
        node = Node(SimpleNamespace(), net)
        with pytest.raises(SwarmError, match="address already in use"):
            node.start()
        node.close()
        assert node.dht is None and node.loop is None
