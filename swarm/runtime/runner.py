"""The one compute thread a stage's passes run on (``PriorityRunner``): passes in priority order, each
awaited from the event loop. A scheduling primitive: it knows nothing of steps."""
from __future__ import annotations

import asyncio
import heapq
import itertools
import threading


class PriorityRunner:
    """One compute thread: passes run one at a time, lower priority value first, then in arrival order
    (1F1B: backward before forward; GPipe: arrival order)."""

    def __init__(self, name: str = "stage", backward_first: bool = True):
        self.backward_first = backward_first
        self.queue: list = []
        self.seq = itertools.count()
        self.ready = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._loop, daemon=True, name=name)
        self.thread.start()

    async def run(self, priority: int, fn, *args):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self.ready:
            heapq.heappush(self.queue, (priority, next(self.seq), fn, args, loop, future))
            self.ready.notify()
        return await future

    async def work(self, backward: bool, fn, *args):
        """``fn(*args)`` on the compute thread: a backward pass (or the step's work) first under 1F1B."""
        return await self.run(0 if backward and self.backward_first else 1, fn, *args)

    def _loop(self) -> None:
        while True:
            with self.ready:
                while not self.queue and not self.closed:
                    self.ready.wait()
                if self.closed:
                    return
                _, _, fn, args, loop, future = heapq.heappop(self.queue)
            try:
                outcome = (fn(*args), None)
            except BaseException as e:  # handed to the awaiting coroutine
                outcome = (None, e)
            loop.call_soon_threadsafe(_settle, future, *outcome)
            del fn, args, loop, future, outcome   # hold nothing of this pass (its tensors, its error) until the next

    def close(self) -> None:
        """Run no further pass (the one running finishes: ``thread.join`` waits for it)."""
        with self.ready:
            self.closed = True
            self.ready.notify()


def _settle(future: asyncio.Future, result, error) -> None:
    if not future.done():
        future.set_exception(error) if error is not None else future.set_result(result)
