"""The node's one asyncio event loop, on its own thread, and the one bridge to it from sync code
(a utility below every layer that uses it: the node, plan adoption, a stage's session).

Everything that speaks libp2p (the probes, the state service, the stage server) runs on this loop;
the heartbeat (the main thread) hands it coroutines with ``call_sync`` (wait for the result, with a
deadline) or ``submit`` (a future to look at on a later heartbeat).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class NodeLoop:
    """An event loop running on a daemon thread (``NodeLoop()``), or one already running elsewhere
    (``NodeLoop.wrap(loop)``: then ``close`` leaves it alone)."""

    def __init__(self, name: str = "transport", loop: asyncio.AbstractEventLoop | None = None):
        self.owned = loop is None
        self.loop = loop if loop is not None else asyncio.new_event_loop()
        self.thread: threading.Thread | None = None
        if self.owned:
            self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name=name)
            self.thread.start()

    @classmethod
    def wrap(cls, loop: asyncio.AbstractEventLoop | NodeLoop) -> NodeLoop:
        return loop if isinstance(loop, NodeLoop) else cls(loop=loop)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the loop; its future (never block on it from the loop's own thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call_sync(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        """Run ``coro`` on the loop and wait for its result (``TimeoutError`` after ``timeout_s``: the
        coroutine is cancelled then)."""
        future = self.submit(coro)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def call_soon(self, callback, *args) -> None:
        """``callback(*args)`` on the loop's thread, soon."""
        self.loop.call_soon_threadsafe(callback, *args)

    def close(self, timeout_s: float = 5.0) -> None:
        """Cancel what still runs on the loop, stop it and join its thread (an owned loop only)."""
        if not self.owned or self.loop.is_closed():
            return

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.call_sync(cancel_all(), timeout_s)
        except (TimeoutError, concurrent.futures.TimeoutError, RuntimeError):
            pass   # a task that ignores cancellation: the loop stops anyway
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            if self.thread is not None:
                self.thread.join(timeout_s)
