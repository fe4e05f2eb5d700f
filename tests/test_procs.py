"""swarm.procs: the one way the demo, the benchmarks and the tests wait for and stop node processes."""
import json
import signal
import subprocess
import sys
import time

import pytest

from swarm.node.ready import write_ready
from swarm.procs import kill_group, load_ready, poll_until, read_ready, stop_groups


def test_poll_until_returns_the_first_true_value_or_names_what_it_waited_for():
    values = iter([0, None, "", 7])
    assert poll_until(lambda: next(values), 5, "a value", interval_s=0.01) == 7
    with pytest.raises(TimeoutError, match=r"timed out after 0.05 s waiting for the moon"):
        poll_until(lambda: False, 0.05, "the moon", interval_s=0.01)


def test_poll_until_stops_when_the_check_raises():
    def check():
        raise RuntimeError("the child died")
    with pytest.raises(RuntimeError, match="the child died"):
        poll_until(lambda: False, 60, "anything", check=check)


def test_ready_file_is_read_once_complete(tmp_path):
    path = tmp_path / "ready.json"
    assert load_ready(path) is None
    path.write_text('{"peer_id": "Qm')   # half-written: not ready
    assert load_ready(path) is None
    write_ready(path, {"peer_id": "QmA", "maddrs": ["/ip4/127.0.0.1/tcp/1/p2p/QmA"], "role": None})
    assert read_ready(path, 1)["peer_id"] == "QmA" and list(tmp_path.iterdir()) == [path]
    with pytest.raises(TimeoutError, match="a role"):
        read_ready(path, 0.05, until=lambda info: info["role"], what="a role")
    assert json.loads(path.read_text())["maddrs"] == ["/ip4/127.0.0.1/tcp/1/p2p/QmA"]


def test_kill_group_and_stop_groups_leave_no_process():
    sleeper = subprocess.Popen(["sleep", "600"], start_new_session=True)
    kill_group(sleeper)
    assert sleeper.returncode == -signal.SIGKILL
    kill_group(sleeper)   # already gone: fine
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                 "print('up', flush=True); time.sleep(600)"], start_new_session=True, stdout=subprocess.PIPE)
    polite = subprocess.Popen(["sleep", "600"], start_new_session=True)
    assert stubborn.stdout.readline() == b"up\n"
    started = time.monotonic()
    stop_groups([stubborn, polite], grace_s=0.5)
    assert polite.returncode == -signal.SIGTERM and stubborn.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 10
