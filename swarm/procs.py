"""Node processes seen from outside (the demo, the benchmarks, the tests): wait for a condition with
a deadline, stop a process group, read a node's ready file (``swarm.node.ready`` writes it).

A program that starts ``node.py run`` learns the node's address and part from its ready file
(``--ready-file PATH``), never from its log lines; what training did is in the metrics rows
(``training.metrics_path``). Every wait here polls: a file another process writes, or a child's exit
status, has no event to wait on, so each wait is a loop with a deadline and a short sleep.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

READY_KEYS = ("peer_id", "maddrs")   # what every ready file has; also state, role, stage, step, plan_hash, pid


def poll_until(predicate: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.2,
               check: Callable[[], None] | None = None) -> T:
    """``predicate()``'s first true value, asked every ``interval_s``. ``check()`` runs before each
    sleep and may raise (a child process that exited). Raises ``TimeoutError`` naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if check is not None:
            check()
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL, wait_s: float | None = 10.0) -> None:
    """Send ``sig`` to ``proc``'s process group (it was started with ``start_new_session``); then wait
    up to ``wait_s`` for ``proc`` to exit (None: do not wait). A group already gone is fine."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    if wait_s is not None:
        proc.wait(wait_s)


def stop_groups(procs: Iterable[subprocess.Popen], grace_s: float = 20.0) -> None:
    """SIGTERM to each running process's group, up to ``grace_s`` for all of them to exit (a node
    leaves gracefully: it hands its state over), then SIGKILL to every group, stragglers included."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            kill_group(p, signal.SIGTERM, wait_s=None)
    try:
        poll_until(lambda: all(p.poll() is not None for p in procs), grace_s, "the processes to exit")
    except TimeoutError:
        pass
    for p in procs:
        kill_group(p)


def load_ready(path: str | Path) -> dict | None:
    """The ready file's contents, or None while it is missing or not yet complete."""
    try:
        info = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and all(k in info for k in READY_KEYS) else None


def read_ready(path: str | Path, timeout_s: float = 90.0, check: Callable[[], None] | None = None,
               until: Callable[[dict], bool] = lambda info: True, what: str | None = None) -> dict:
    """A node's ready file (``node.py run --ready-file``) once it exists and ``until(info)`` holds:
    ``peer_id``, ``maddrs``, ``state``, ``role``, ``stage``, ``step``, ``plan_hash`` (the committed plan),
    ``ready`` (the plan whose stage runs there), ``pid``, ``updated_at``. ``check`` as in ``poll_until``."""
    def ready() -> dict | None:
        info = load_ready(path)
        return info if info is not None and until(info) else None
    return poll_until(ready, timeout_s, what or f"the node's ready file {path}", check=check)

