"""Homes behind NAT on the testbed (``swarm.testbed``: namespaces, NAT routers with iptables): two
homes train through the public peers' relays, a symmetric NAT still trains (relayed), and a planned
link cut mid-run is named within 30 s and planned around within 60 s. Minutes of real node
processes: run by ``python -m benchmarks.scenarios`` (the suite keeps tests/test_reachability.py:
the dial-back, the advertised paths, the cut-link rules of liveness and planning)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swarm.procs import kill_group, load_ready, poll_until, read_ready
from swarm.runtime.metrics import read_metrics
from swarm.testbed import Scenario, Testbed, down

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.scenario,
              pytest.mark.skipif(os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "tc", "iptables")),
                                 reason="needs root, ip, tc and iptables")]


class NatSwarm:
    """Public bootstrap peers and training nodes on a testbed: node ``i`` of the scenario runs a
    bootstrap when it is among the first ``bootstraps``, else ``node.py run``."""

    def __init__(self, bed: Testbed, work: Path, bootstraps: int, members: int, **election):
        self.bed, self.work, self.bootstraps, self.procs = bed, work, bootstraps, []
        self.metrics = work / "metrics.jsonl"
        self.election = {"join_batch_s": 25, "min_members": members, "stages": 2, "micro_batches": 2,
                         "min_epoch_s": 3600, "drift_check_s": 3600, "election_timeout_s": 30, **election}
        self.boot: list[str] = []

    def log(self, i: int) -> Path:
        return self.work / f"node{i}.log"

    def ready(self, i: int) -> Path:
        return self.work / f"node{i}.ready.json"

    def alive(self) -> None:
        dead = [i for i, p in enumerate(self.procs) if p.poll() is not None]
        if dead:
            raise AssertionError(f"node {dead[0]} exited: {self.log(dead[0]).read_text()[-3000:]}")

    def start(self) -> None:
        for i, host in enumerate(self.bed.hosts):
            argv = [sys.executable, "-m", "bootstrap.bootstrap", "--host-maddrs", f"/ip4/{host}/tcp/4000",
                    "--identity", str(self.work / f"node{i}.id"), "--ready-file", str(self.ready(i)),
                    "--initial-peers", *self.boot] if i < self.bootstraps else self.node_argv(i, host)
            self.procs.append(self.bed.start(i, argv, self.log(i), {"PYTHONPATH": str(ROOT)}))
            if i < self.bootstraps:
                info = read_ready(self.ready(i), 60, self.alive, what=f"bootstrap {i} to listen")
                self.boot.append(next(a for a in info["maddrs"] if f"/ip4/{host}/" in a))

    def node_argv(self, i: int, host: str) -> list[str]:
        cfg = {"device": "cpu", "micro_batch_size": 2,
               "network": {"host_maddrs": [f"/ip4/{host}/tcp/0"], "heartbeat_s": 1.0, "ttl_s": 20.0,
                           "startup_timeout_s": 60, "probe_interval_s": 20.0, "reach_check_s": 30.0},
               "election": self.election,
               "training": {"max_steps": 1000, "metrics_path": str(self.metrics), "threads": 1, "timeout_s": 30},
               "compression": {"mode": "off"}}
        path = self.work / f"node{i}.yaml"
        path.write_text(json.dumps(cfg))
        return [sys.executable, str(ROOT / "node.py"), "run", "--config", str(path), "--identity",
                str(self.work / f"node{i}.id"), "--ready-file", str(self.ready(i)), "--initial-peers", *self.boot]

    def peer(self, i: int) -> str:
        return read_ready(self.ready(i), 60, self.alive)["peer_id"]

    def steps(self, since: float = 0.0) -> list[dict]:
        return [r for r in read_metrics(self.metrics) if "loss" in r and r["time"] >= since]

    def train(self, n: int, timeout_s: float, since: float = 0.0) -> list[dict]:
        """The metrics rows once ``n`` distinct steps are trained (after ``since``)."""
        poll_until(lambda: len({r["step"] for r in self.steps(since)}) >= n, timeout_s,
                   f"{n} training steps (logs in {self.work})", 1.0, self.alive)
        return self.steps(since)

    def status(self) -> list[dict]:
        """``node.py status --json`` run from the first public host."""
        run = subprocess.run(["ip", "netns", "exec", self.bed.namespace(0), sys.executable, str(ROOT / "node.py"),
                              "status", "--json", "--initial-peers", *self.boot], capture_output=True, text=True,
                             timeout=90, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert run.returncode == 0, run.stderr[-2000:]
        return json.loads(run.stdout.splitlines()[-1])

    def close(self) -> None:
        for p in self.procs:
            kill_group(p)


PUBLIC = 4   # public bootstrap peers: hole punching starts once a home has 4 public observers (docs/nat.md)


def homes(nat: str, other: str) -> Scenario:
    """``PUBLIC`` public bootstrap peers (the relay's limits hold once the daemon finds itself public,
    which takes a second public peer; hole punching, four observers: docs/nat.md) and two homes, each
    behind its own router."""
    return Scenario(name=f"home-{nat}-{other}", sites={"cloud": {"nodes": PUBLIC, "cpu": 0.2},
                                               "home1": {"nodes": 1, "cpu": 0.6, "nat": nat},
                                               "home2": {"nodes": 1, "cpu": 0.6, "nat": other}},
                    inside_mbit=1000, between_mbit=50, site_mbit={"home1": 20, "home2": 20})


def train_at_home(tmp_path: Path, scenario: Scenario, steps: int, path: str) -> tuple[list[dict], dict[str, dict], list[str]]:
    """Train ``steps`` steps, then wait (bounded) until status shows both homes' link on ``path``."""
    with Testbed(scenario) as bed:
        swarm = NatSwarm(bed, tmp_path, bootstraps=PUBLIC, members=2)
        try:
            swarm.start()
            home = [swarm.peer(PUBLIC), swarm.peer(PUBLIC + 1)]
            started = time.time()
            rows = swarm.train(steps, 420)
            print(f"[{scenario.name}] {steps} steps in {time.time() - started:.0f} s after start")

            def both_checked() -> dict | None:
                members = {m["peer_id"]: m for m in swarm.status()}
                ok = all(p in members and members[p]["reachability"] and
                         members[p]["links"].get(q, {}).get("path") == path for p, q in (home, home[::-1]))
                return members if ok else None
            members = poll_until(both_checked, 120, f"both homes' reachability, and their link {path}, in status", 3.0,
                                 swarm.alive)
            for p, q in (home, home[::-1]):
                print(f"[{scenario.name}] {p[-8:]}: {members[p]['reachability']}, link to {q[-8:]} "
                      f"{members[p]['links'][q]['path']}")
            return rows, members, home
        finally:
            swarm.close()


def test_two_homes_behind_nat_train_through_the_public_peers(tmp_path):
    rows, members, home = train_at_home(tmp_path, homes("cone", "cone"), 10, "direct")
    assert {r["peer"] for r in rows} <= set(home)   # the homes train; the public peers only relay and bootstrap
    for p, q in (home, home[::-1]):
        # behind a cone NAT, hole punching (DCUtR) upgrades the relayed connection to a direct one
        assert members[p]["reachability"] == "nat", members[p]
        assert members[p]["links"][q]["path"] == "direct", members[p]
        # what the member says of itself agrees with its links: relayed exactly when a link is
        assert (members[p]["reachability"] == "relayed") == ("relayed" in members[p]["paths"].values())


def test_behind_a_symmetric_nat_the_relay_carries_training(tmp_path):
    rows, members, home = train_at_home(tmp_path, homes("cone", "symmetric"), 10, "relayed")
    assert len({r["step"] for r in rows}) >= 10
    for p, q in (home, home[::-1]):
        assert members[p]["links"][q]["path"] == "relayed", members[p]   # no hole punching through symmetric NAT
        assert members[p]["reachability"] == "relayed"


def test_a_cut_planned_link_is_named_within_30_s_and_planned_around_within_60_s(tmp_path):
    scenario = Scenario(name="cut", sites={"lab": {"nodes": 4, "cpu": [0.3, 0.5, 0.5, 0.5]}})
    with Testbed(scenario) as bed:
        swarm = NatSwarm(bed, tmp_path, bootstraps=1, members=3, join_batch_s=10, max_replicas=1)
        try:
            swarm.start()
            peers = {swarm.peer(i): i for i in (1, 2, 3)}
            swarm.train(3, 300)
            info = {i: read_ready(swarm.ready(i), 30, swarm.alive, until=lambda r: r["role"] is not None)
                    for i in (1, 2, 3)}
            plan = info[1]["plan_hash"]
            stage = {r["stage"]: i for i, r in info.items() if r["stage"] is not None}
            a, b = stage[0], stage[1]
            for src, dst in ((a, b), (b, a)):   # drop everything between the two planned neighbours
                for chain, flag in (("OUTPUT", "-d"), ("INPUT", "-s")):
                    subprocess.run(["ip", "netns", "exec", bed.namespace(src), "iptables", "-A", chain, flag,
                                    bed.hosts[dst], "-j", "DROP"], check=True)
            cut = time.time()
            tails = {a: swarm.peer(b)[-8:], b: swarm.peer(a)[-8:]}
            named = poll_until(lambda: [i for i in (a, b) if re.search(f"cannot reach member {tails[i]}",
                                                                         swarm.log(i).read_text())] or None,
                               30, "a log line naming the cut-off neighbour", 0.5, swarm.alive)
            print(f"[cut] named by node {named} after {time.time() - cut:.1f} s")

            def replanned() -> dict | None:
                now = {i: load_ready(swarm.ready(i)) for i in (1, 2, 3)}
                return now if all(r and r["plan_hash"] not in (None, plan) and r["plan_hash"] == now[1]["plan_hash"]
                                  for r in now.values()) else None
            now = poll_until(replanned, 60 - (time.time() - cut), "a new plan committed by all three members",
                             1.0, swarm.alive)
            print(f"[cut] new plan {now[1]['plan_hash']} after {time.time() - cut:.1f} s")
            held = {r["stage"]: i for i, r in now.items() if r["stage"] is not None}
            assert {held.get(0), held.get(1)} != {a, b}, now   # the cut link is no pipeline link any more
            rows = swarm.train(3, 180, since=cut)
            assert any(r["plan_hash"] == now[1]["plan_hash"] for r in rows)   # training goes on under it
            assert set(peers) >= {r["peer"] for r in rows}
        finally:
            swarm.close()
    down()
