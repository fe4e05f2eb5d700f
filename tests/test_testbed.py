"""The geo testbed (root only): sites in namespaces with per-destination rates and CPU quotas, and a
teardown that leaves nothing behind: on a normal exit, on Ctrl-C, and after a killed run."""
import os
import shutil
import signal
import subprocess
import sys

import pytest

from swarm.procs import poll_until
from swarm.testbed import CGROUP, Scenario, Testbed, down, leftovers
from tests.swarmproc import ROOT, Proc

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("tc"), reason="needs root, ip and tc")

SERVER = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", 5201)); s.listen(1)
print("ready", flush=True)
c, _ = s.accept(); n = 0; t = None
while True:
    b = c.recv(1 << 16)
    if not b: break
    t = t or time.perf_counter(); n += len(b)
print(f"got {n} bytes in {time.perf_counter() - t:.3f} s", flush=True)
"""


def send(bed: Testbed, i: int, host: str, n_bytes: int) -> None:
    code = f"import socket; s = socket.create_connection(('{host}', 5201)); s.sendall(bytes({n_bytes})); s.close()"
    subprocess.run(["ip", "netns", "exec", bed.namespace(i), sys.executable, "-c", code], check=True, timeout=60)


def test_sites_get_their_rates_and_cpu_quotas_and_nothing_is_left(tmp_path):
    scenario = Scenario(sites={"near": {"nodes": 2, "cpu": [1.0, 0.25]}, "far": {"nodes": 1}},
                        inside_mbit=1000, between_mbit=20)
    with Testbed(scenario) as bed:
        assert (CGROUP / "1" / "cpu.cfs_quota_us").read_text().strip() == "25000"
        classes = subprocess.run(["ip", "netns", "exec", bed.namespace(0), "tc", "class", "show", "dev", "swtb0n"],
                                 capture_output=True, text=True).stdout
        assert "rate 1Gbit" in classes and "rate 20Mbit" in classes
        server = bed.start(2, [sys.executable, "-c", SERVER], tmp_path / "server.log")
        try:   # the server's own output says it listens (a test program, not a node)
            poll_until(lambda: "ready" in (tmp_path / "server.log").read_text(), 20, "the server to listen", 0.1)
        except TimeoutError:
            pass   # as before: the send below fails if it never listened
        send(bed, 0, bed.hosts[2], 2_500_000)   # near -> far at 20 Mbit/s: ~1 s
        server.wait(30)
        got = (tmp_path / "server.log").read_text().split()
        mbit = 8 * int(got[got.index("got") + 1]) / float(got[got.index("in") + 1]) / 1e6
        assert 15 <= mbit <= 25, mbit
        quota = bed.start(1, [sys.executable, "-c", "from swarm.estimator.profile import cpu_quota_cores; "
                                                    "print(cpu_quota_cores())"], tmp_path / "quota.log",
                          {"PYTHONPATH": str(ROOT)})
        assert quota.wait(60) == 0 and (tmp_path / "quota.log").read_text().split() == ["0.25"]   # a node sees its quota
        sleeper = bed.start(1, ["sleep", "600"], tmp_path / "sleep.log")
    assert sleeper.poll() is not None and leftovers() == []


def test_teardown_after_ctrl_c_and_after_a_killed_run():
    config = ROOT / "configs" / "scenarios" / "geo.yaml"
    bed = Proc("-m", "swarm.testbed", "up", str(config))
    try:
        bed.wait_for("testbed up", 60)
        assert len(leftovers()) == 14   # 6 namespaces, 6 veth ends, the bridge, the cgroup
        os.kill(bed.popen.pid, signal.SIGINT)
        assert bed.popen.wait(60) == 130 and leftovers() == []

        killed = Proc("-m", "swarm.testbed", "up", str(config))
        killed.wait_for("testbed up", 60)
        killed.kill(signal.SIGKILL)      # no chance to clean up ...
        killed.popen.wait(10)
        assert leftovers()
        assert subprocess.run([sys.executable, "-m", "swarm.testbed", "down"], cwd=ROOT).returncode == 0
        assert leftovers() == []         # ... `down` (and every `up`) removes what it left
    finally:
        bed.cleanup()
        down()
