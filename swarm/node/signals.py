"""Stopping on SIGINT/SIGTERM without a lock in the signal handler.

The handler only sets a plain flag and writes one byte to a socket pair; the main thread waits on
that socket (``select`` with a bounded timeout that re-checks the flag). No ``threading.Event``: its
``set`` takes the lock its ``wait`` holds, and a handler that runs on the main thread inside that
``wait`` deadlocks (seen once in 13 SIGTERMs).
"""
from __future__ import annotations

import select
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

WAIT_SLICE_S = 0.5   # the longest a wait sleeps before it looks at the flag again


class StopFlag:
    """Set once (from a signal handler, or any thread); ``wait`` returns when it is set."""

    def __init__(self):
        self._set = False
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def set(self) -> None:
        """Async-signal-safe: an assignment and a non-blocking one-byte send (a full socket is fine)."""
        self._set = True
        try:
            self._writer.send(b"\0")
        except OSError:   # full (BlockingIOError) or closed: the flag alone is enough
            pass

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        """Until set, or ``timeout`` seconds (None: no limit); returns whether it is set."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._set:
            left = WAIT_SLICE_S if deadline is None else min(WAIT_SLICE_S, deadline - time.monotonic())
            if left <= 0:
                break
            try:
                readable, _, _ = select.select([self._reader], [], [], left)
            except (OSError, ValueError):   # closed under us: fall back to the flag
                time.sleep(min(left, 0.05))
                continue
            if readable:
                try:
                    while self._reader.recv(64):
                        pass
                except OSError:
                    pass
        return self._set

    def close(self) -> None:
        self._reader.close()
        self._writer.close()


@contextmanager
def stop_on_signals(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[StopFlag]:
    """A ``StopFlag`` set by SIGINT/SIGTERM; the previous handlers come back afterwards."""
    stop = StopFlag()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in signals}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop.close()
