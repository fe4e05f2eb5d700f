import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.swarmproc import Proc, p2pd_pids, wait_until

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Device profiles go to a temporary cache, never the user's."""
    os.environ["SWARM_CACHE_DIR"] = str(tmp_path_factory.mktemp("swarm-cache"))


def config_error(tmp_path, text: str) -> str:
    """The error a node config of ``text`` gets: one line (asserted), returned for the caller to read."""
    from swarm.config import NodeConfig, load
    from swarm.errors import SwarmError

    path = tmp_path / "node.yaml"
    path.write_text(text)
    with pytest.raises(SwarmError) as e:
        load(NodeConfig, str(path))
    assert "\n" not in str(e.value)
    return str(e.value)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python node.py ARGS`` from the repository root; bounded in time."""
    return subprocess.run([sys.executable, str(ROOT / "node.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, so fixtures can tell whether the test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def swarm_procs(request):
    """Processes started by a test; all are killed afterwards and no p2pd may survive them.
    When the test failed, the tail of each process's output is printed (pytest shows it with the failure)."""
    before = p2pd_pids()
    procs: list[Proc] = []
    yield procs
    for p in procs:
        p.cleanup()
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        for i, p in enumerate(procs):
            print(f"----- process {i}: {' '.join(p.popen.args[1:4])} (exit {p.popen.returncode}) -----")
            print("".join(p.lines[-60:]))
    wait_until(lambda: p2pd_pids() <= before, 15, what="all p2pd daemons of the test gone")


def node_config(tmp_path, election: dict | None = None, **network) -> str:
    path = tmp_path / "node.yaml"
    net = {"host_maddrs": ["/ip4/127.0.0.1/tcp/0"], "heartbeat_s": 1.0, "ttl_s": 5.0, "startup_timeout_s": 20, **network}
    # these nodes test membership and election: they take their stage but train no step
    cfg = {"device": "cpu", "network": net, "training": {"max_steps": 0}, **({"election": election} if election else {})}
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return str(path)
