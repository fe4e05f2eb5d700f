"""Helpers for multi-process tests: start node processes, read their ready files and their output
with deadlines, and make sure nothing (process, p2pd daemon) outlives the test. The waiting and
killing is ``swarm.procs``'s, as in the demo and the benchmarks."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from swarm.procs import kill_group, poll_until, read_ready

ROOT = Path(__file__).resolve().parent.parent
MADDR = r"(/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+)"  # a loopback multiaddr as nodes print it


def p2pd_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-x", "p2pd"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


class Proc:
    """One child process in its own session; its output is read line by line with deadlines. A node
    given a ``ready_file`` (``node.py run --ready-file``) tells its address and part there (``ready``)."""

    def __init__(self, *args: str, ready_file: str | Path | None = None, env: dict[str, str] | None = None):
        self.ready_file = Path(ready_file) if ready_file else None
        if self.ready_file:
            self.ready_file.unlink(missing_ok=True)
            args = (*args, "--ready-file", str(self.ready_file))
        self.popen = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
        self.lines: list[str] = []
        self.new_line = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            with self.new_line:
                self.lines.append(line)
                self.new_line.notify_all()

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match:
        deadline = time.monotonic() + timeout_s
        regex = re.compile(pattern)
        with self.new_line:
            while True:
                for line in self.lines:
                    if m := regex.search(line):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.new_line.wait(left)
        raise AssertionError(f"no line matching {pattern!r} within {timeout_s} s; output so far: {''.join(self.lines)[-2000:]}")

    def _check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise AssertionError(f"the process exited with code {self.popen.returncode}; output: {''.join(self.lines)[-2000:]}")

    def ready(self, timeout_s: float = 90, until=lambda info: True, what: str | None = None) -> dict:
        """The node's ready file once it exists and ``until(info)`` holds (peer_id, maddrs, state, role, ...)."""
        assert self.ready_file, "started without a ready_file"
        return read_ready(self.ready_file, timeout_s, check=self._check_alive, until=until, what=what)

    def maddr(self, timeout_s: float = 90) -> str:
        """The node's loopback multiaddr (with its /p2p/ peer id), from its ready file."""
        maddrs = self.ready(timeout_s)["maddrs"]
        return next((a for a in maddrs if re.fullmatch(MADDR, a)), maddrs[0])

    def peer_id(self, timeout_s: float = 90) -> str:
        return self.ready(timeout_s)["peer_id"]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def cleanup(self) -> None:
        kill_group(self.popen)


def wait_until(predicate, timeout_s: float, interval_s: float = 0.5, what: str = "condition"):
    """``swarm.procs.poll_until`` with the tests' default interval; a timeout is a failed assertion
    (``AssertionError`` naming ``what``: some tests catch it to report a failure of their own)."""
    try:
        return poll_until(predicate, timeout_s, what, interval_s=interval_s)
    except TimeoutError as e:
        raise AssertionError(str(e)) from None
