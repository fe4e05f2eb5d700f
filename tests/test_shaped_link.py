"""Bandwidth measured over a link shaped by tc htb (needs root, iproute2 and tc; skipped otherwise)."""
import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest

from swarm.estimator.profile import load_or_measure
from tests.swarmproc import Proc, p2pd_pids, wait_until

RATE_MBIT = 20
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"),
                                reason="needs root with ip and tc")


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@pytest.fixture
def shaped_pair():
    """Two namespaces joined by a veth pair, each direction shaped to RATE_MBIT by htb; always removed."""
    tag = uuid.uuid4().hex[:6]
    ns = [f"swt{tag}a", f"swt{tag}b"]
    veth = [f"vt{tag}a", f"vt{tag}b"]
    ips = ["10.213.7.1", "10.213.7.2"]
    try:
        for n in ns:
            sh("ip", "netns", "add", n)
        sh("ip", "link", "add", veth[0], "netns", ns[0], "type", "veth", "peer", "name", veth[1], "netns", ns[1])
        for n, v, ip in zip(ns, veth, ips):
            sh("ip", "-n", n, "addr", "add", f"{ip}/24", "dev", v)
            sh("ip", "-n", n, "link", "set", v, "up")
            sh("ip", "-n", n, "link", "set", "lo", "up")
            sh("ip", "netns", "exec", n, "tc", "qdisc", "add", "dev", v, "root", "handle", "1:", "htb", "default", "10")
            sh("ip", "netns", "exec", n, "tc", "class", "add", "dev", v, "parent", "1:", "classid", "1:10", "htb",
               "rate", f"{RATE_MBIT}mbit", "ceil", f"{RATE_MBIT}mbit")
        yield ns, ips
    finally:
        for n in ns:
            subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=30)


def test_shaped_link_bandwidth_within_25_percent(tmp_path, shaped_pair):
    (ns_a, ns_b), (ip_a, ip_b) = shaped_pair
    load_or_measure("cpu")
    before = p2pd_pids()
    procs = []

    def node(ns, ip, name, *peers):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(json.dumps({"device": "cpu", "network": {"host_maddrs": [f"/ip4/{ip}/tcp/0"], "heartbeat_s": 1.0,
                                                                 "ttl_s": 10.0, "probe_interval_s": 2.0},
                                   "training": {"max_steps": 0}}))   # probes only: no training traffic
        proc = Proc("-c", "import os,sys; os.execvp('ip', ['ip','netns','exec',sys.argv[1],sys.executable,'node.py',*sys.argv[2:]])",
                    ns, "run", "--config", str(cfg), "--identity", str(tmp_path / f"{name}.id"), "--initial-peers", *peers)
        procs.append(proc)
        return proc

    try:
        a = node(ns_a, ip_a, "a")
        addr = a.wait_for(rf"(/ip4/{ip_a}/tcp/\d+/p2p/\w+)", 60).group(1)
        node(ns_b, ip_b, "b", addr).wait_for("listening", 60)

        def measured():
            res = subprocess.run(["ip", "netns", "exec", ns_b, sys.executable, "node.py", "status", "--initial-peers", addr,
                                  "--json"], capture_output=True, text=True, timeout=60)
            members = json.loads(res.stdout) if res.returncode == 0 else []
            return members if len(members) == 2 and all(m["bandwidth_bps"] for m in members) else None

        members = wait_until(measured, 90, interval_s=2, what="both ends measured the shaped link")
        for m in members:
            (bps,) = m["bandwidth_bps"].values()
            print(f"shaped {RATE_MBIT} Mbit/s link measured at {bps / 1e6:.1f} Mbit/s")
            assert abs(bps / (RATE_MBIT * 1e6) - 1) <= 0.25, f"measured {bps / 1e6:.1f} Mbit/s on a {RATE_MBIT} Mbit/s link"
    finally:
        for p in procs:
            p.cleanup()
        wait_until(lambda: p2pd_pids() <= before, 15, what="p2pd daemons gone")
