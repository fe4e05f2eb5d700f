"""A stage of the committed plan served over libp2p (protocol ``swarm.stage.v1``): the adapter that
runs ``StageProtocol``'s rules with streams, the compute thread and the next-stage link.

One ``forward`` from the first stage runs the whole pipeline for one micro-batch: each stage runs
its forward pass, sends the activations on (``NextStage``), runs the backward pass on the gradient
that comes back and answers with the gradient of its own inputs: autodiff across machines with no
shared Python object. ``step`` (from every previous-stage replica) closes a step here: the replicas
sum their gradients (``reduce``), the optimizer steps, and ``step`` goes on downstream. Messages:
``swarm.messages``; rules: ``swarm.pipeline.protocol``; hostile peers: docs/hostile.md, "Data plane".
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from contextlib import contextmanager

from swarm.compression.policy import LinkPolicy
from swarm.errors import PeerUnavailable, RemoteProtocolError, SwarmError
from swarm.events import NO_EVENTS, Events
from swarm.messages import (
    EVALUATE,
    FORWARD,
    GATHER,
    REDUCE,
    STAGE_REQUESTS,
    STEP,
    ErrorReply,
    Evaluate,
    Evaluated,
    Forward,
    Grads,
    Stepped,
    error_frame,
    flag,
    grad_name,
    input_name,
)
from swarm.net.streams import Call, Gate, describe, serve_stream
from swarm.pipeline.calls import StepHooks
from swarm.pipeline.frames import FrameChecker
from swarm.pipeline.link import NextStage
from swarm.pipeline.protocol import Neighbours, StageProtocol, StepStatus
from swarm.pipeline.sync import ReplicaSync
from swarm.refusals import Bans, CallableLogger, Refusals
from swarm.runtime.counters import Counters, Timeline, Warnings
from swarm.runtime.outer import OuterSettings, OuterState
from swarm.runtime.runner import PriorityRunner
from swarm.runtime.worker import StageWorker
from swarm.wire import Limits, non_finite

logger = logging.getLogger(__name__)


class StepWaits:
    """The asyncio side of the step barrier: who waits for a step to be all in, its finish, the next
    step, the passing on downstream, and the sums of this replica's part."""

    def __init__(self) -> None:
        self.all_in: dict[int, asyncio.Event] = {}
        self.finishing: dict[int, asyncio.Task] = {}
        self.sums: dict[int, asyncio.Future] = {}     # (decoded sum, what its owner sends back)
        self.advanced = asyncio.Condition()          # notified after every optimizer step
        self.passing: asyncio.Task | None = None     # passing the newest step on downstream
        self.timeline = Timeline()

    def sum_of(self, step: int) -> asyncio.Future:
        if step not in self.sums:
            self.sums[step] = asyncio.get_running_loop().create_future()
        return self.sums[step]


class StageServer:
    """Serves one stage of the committed plan (``peers``: its place in the plan; ``call`` reaches other
    peers; ``policy`` chooses the outgoing link's ratio, None at the last stage)."""

    def __init__(self, worker: StageWorker, peers: Neighbours, call: Call | None, limits: Limits = Limits(),
                 policy: LinkPolicy | None = None, bandwidth: Callable[[str], float | None] = lambda p: None,
                 timeout_s: float = 120.0, schedule: str = "1f1b", max_requests: int = 64,
                 admit: Callable[[str], bool] | None = None, max_per_peer: int | None = None,
                 read_budget: int | None = None, bans: Bans | None = None, hooks: StepHooks | None = None,
                 log: Callable[[str], None] | None = None, events: Events = NO_EVENTS,
                 outer: OuterSettings | None = None, outer_state: OuterState | None = None):
        self.worker = worker
        self.timeout_s = timeout_s
        self.admit = admit
        self.protocol = StageProtocol(peers, sum(p.numel() for p in worker.params), worker.check_inputs,
                                      worker.stage.io.index, bans, outer=outer)
        self.compute = PriorityRunner(backward_first=schedule == "1f1b")
        self.counters = Counters()
        self.warn = Warnings(CallableLogger(log) if log is not None else logger)   # (log: tests capture lines)
        self.refusals = Refusals(log, events=events)
        self.checker = FrameChecker(limits, self.protocol.bans, self.counters, self.refusals)
        self.link = NextStage(worker.stage.io.index, call, self.protocol, self.checker, self.counters, policy,
                              bandwidth, timeout_s)
        self.slots = max_requests
        # a peer never has more than its worker's micro-batches in flight, plus step and reduce requests
        per_peer = max_per_peer or min(max_requests, worker.max_in_flight + 4)
        self.gate = Gate(per_peer, max_requests, read_budget or max(4 * limits.max_frame_bytes, 32 << 20))
        self.steps = StepWaits()
        self.hooks = hooks or StepHooks()
        self.sync = ReplicaSync(self, outer_state)   # the replicas' end of a step (and the outer state)

    @property
    def peers(self) -> Neighbours:
        return self.protocol.hood

    @property
    def bans(self) -> Bans:
        return self.protocol.bans

    @property
    def limits(self) -> Limits:
        return self.checker.limits

    @property
    def errors(self) -> int:
        return self.counters.errors

    @property
    def draining(self) -> bool:
        return self.protocol.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.protocol.draining = value

    # the network side
    async def handle(self, stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request per stream (the libp2p handler)."""
        sent = await serve_stream(stream_info, reader, writer, answer=self.answer, limit=self.limits.max_frame_bytes,
                                  timeout_s=self.timeout_s, gate=self.gate, refuse=self.protocol.refuse_stream,
                                  admit=self.admit, failed=self._stream_failed)
        if sent is not None:
            peer = stream_info.peer_id.to_base58()
            self.counters.sent(peer, sent, reduce=peer in self.peers.replicas)

    def _stream_failed(self, peer: str, e: BaseException) -> None:
        self.counters.errors += 1
        if isinstance(e, RemoteProtocolError):
            self.counters.refused += 1
        self.refusals.note(peer, "busy" if isinstance(e, PeerUnavailable) else "stream", describe(e))

    async def answer(self, frame: bytes, sender: str) -> bytes:
        """The reply frame to a request frame from ``sender`` (authenticated peer id): never raises."""
        kind = "frame"
        try:
            with self._slot():
                if sender != self.peers.me and (refused := self.protocol.refuse_stream(sender)) is not None:
                    raise refused
                header = self.checker.header(frame)
                kind = header.kind if header.kind in STAGE_REQUESTS else "request"
                self.protocol.admit(sender, header)
                step = header.meta.get("step")
                if self.protocol.step_status(header.kind, step, self.worker.step_id) is StepStatus.REPEAT:
                    return Stepped(step).to_frame()   # a repeat whose first reply was lost
                msg = self.checker.decode(frame, header, sender)
                del frame
                if msg.kind in (REDUCE, GATHER) and self.protocol.overlapped:   # a sync in the background: no step to reach
                    if not self.protocol.sync_window(step, self.worker.step_id):
                        raise self.protocol.not_current(step, self.worker.step_id)
                else:
                    await self.reach(step)
                if msg.kind == FORWARD:
                    return await self._remote_forward(Forward.from_message(msg))
                if msg.kind == EVALUATE:
                    self.protocol.take_forward()
                    return (await self.evaluate(Evaluate.from_message(msg))).to_frame()
                if msg.kind == GATHER:
                    return await self.sync.gather(msg)
                if msg.kind == STEP:
                    return await self._step(step, sender, flag(msg.meta, "skip"))
                return await self.sync.reduce(msg, sender)
        except Exception as e:
            self.counters.errors += 1
            if isinstance(e, RemoteProtocolError):
                self.counters.refused += 1
                self.refusals.note(sender, kind, str(e))
            elif not isinstance(e, SwarmError):   # a pass that failed on odd input
                self.refusals.note(sender, kind, f"stage failed: {type(e).__name__}: {str(e)[:200]}")
            return error_frame(e)

    @contextmanager
    def _slot(self):
        """One of the ``max_requests`` places for requests this stage serves at once (the first stage's
        own work takes one too); none free: ``PeerUnavailable``."""
        if self.slots <= 0:
            raise PeerUnavailable("stage busy: too many requests in progress")
        self.slots -= 1
        try:
            yield
        finally:
            self.slots += 1

    async def own(self, work):
        """Await the first stage's own ``work`` (a micro-batch, closing a step) as a request of its own:
        it holds a slot while it runs, a failure counts as this stage's error, and one that is not a
        ``SwarmError`` (a pass that failed on odd input) becomes one naming it, as a peer's would."""
        try:
            with self._slot():
                return await work
        except Exception as e:
            self.counters.errors += 1
            if isinstance(e, SwarmError):
                raise
            raise SwarmError(ErrorReply.of(e).message) from e
        finally:
            work.close()   # (not awaited when no slot was free)

    async def reach(self, step) -> None:
        """Return once ``step`` is the current step: at once, or (for the next one) after this stage
        has stepped; any other step id is an error."""
        current = self.worker.step_id
        if self.protocol.step_status(FORWARD, step, current) is StepStatus.NEXT:
            async with self.steps.advanced:
                try:
                    await asyncio.wait_for(self.steps.advanced.wait_for(lambda: self.worker.step_id >= step), self.timeout_s)
                except asyncio.TimeoutError:
                    raise PeerUnavailable(f"step {step} requested, but this stage is still at step {current}") from None
            current = self.worker.step_id
        if self.protocol.step_status(FORWARD, step, current) is not StepStatus.CURRENT:
            raise self.protocol.not_current(step, current)

    async def _remote_forward(self, fwd: Forward) -> bytes:
        self.protocol.take_forward()
        cached = self.protocol.cached(self.worker.step_id, fwd.mb)
        if cached is not None:   # a retry whose first reply was lost: the same answer, nothing accumulated twice
            return cached
        reply = (await self.micro_batch(fwd)).to_frame(fwd.masks, fwd.grad_bits)
        self.protocol.remember(self.worker.step_id, fwd.mb, reply)
        return reply

    # one micro-batch at this stage
    async def micro_batch(self, fwd: Forward) -> Grads:
        """Forward ``fwd`` here, through the rest of the pipeline, and backward: the gradient of this
        stage's inputs (and the loss, from the last stage)."""
        step, index, last = self.worker.step_id, self.worker.stage.io.index, not self.peers.downstream
        outputs, forward_s = await self._pass(False, self.worker.forward, fwd.mb, fwd.inputs, fwd.targets, fwd.scale,
                                              fwd.loss_scale)
        wait_s = 0.0
        if last:
            loss = outputs[0].item()
            if not math.isfinite(loss):   # nothing to learn from: no gradient, the driver sees the loss
                await self.compute.work(True, self.worker.drop, fwd.mb)
                self.warn.once("loss", f"stage {index}: loss {loss} on micro-batch {fwd.mb} of step {step}; "
                                          "its gradient is not applied")
                return Grads(step, fwd.mb, loss, [])
            grads, backward_s = await self._pass(True, self.worker.backward, fwd.mb, None)
        else:
            try:
                bad = non_finite({input_name(i): o for i, o in enumerate(outputs)})
                if bad is not None:   # never sent: the next stage would (rightly) ban this one
                    self.warn.once("forward", f"stage {index} computed non-finite activations ({bad}) in step {step}; not sent")
                    raise SwarmError(f"stage {index} computed non-finite activations ({bad})")
                sent_at = time.perf_counter()
                reply = await self.link.forward(Forward(step, fwd.mb, fwd.scale, outputs, fwd.targets,
                                                        loss_scale=fwd.loss_scale))
                wait_s = time.perf_counter() - sent_at   # told upstream: its share of the round trip is not ours
            except BaseException:
                await self.compute.work(True, self.worker.drop, fwd.mb)
                raise
            loss = reply.meta.get("loss")
            down = Grads.from_message(reply, len(outputs))
            if down.overflow:
                self.worker.skip(f"gradient overflow downstream of stage {index}")
            grads, backward_s = await self._pass(True, self.worker.backward, fwd.mb, down.grads, down.scale)
        if self.worker.overflowed:   # nothing to send: every stage skips this step (the verdict goes up with the reply)
            self.counters.compute_s += forward_s + backward_s
            self.counters.micro_batches += 1
            return Grads(step, fwd.mb, loss, [None] * len(grads), wait_s, self.worker.step_scale.scale, overflow=True)
        bad = non_finite({grad_name(i): g for i, g in enumerate(grads) if g is not None})
        if bad is not None:   # accumulated here (this step will be skipped), never sent upstream
            self.warn.once("backward", f"stage {index} computed non-finite input gradients ({bad}) in step {step}; not sent")
            raise SwarmError(f"stage {index} computed non-finite gradients ({bad})")
        self.counters.compute_s += forward_s + backward_s
        self.counters.micro_batches += 1
        if self.link.policy is not None:
            self.link.policy.observe_compute(forward_s + backward_s)
        return Grads(step, fwd.mb, loss, grads, wait_s, self.worker.step_scale.scale)

    async def evaluate(self, ev: Evaluate) -> Evaluated:
        """A validation micro-batch forward here and through the rest of the pipeline: the last stage's
        loss (and top-1 hits). No gradient, no optimizer state, no step counted."""
        step, last = self.worker.step_id, not self.peers.downstream
        count = int(ev.inputs[0].shape[0]) if ev.inputs and ev.inputs[0].dim() else 0
        out = await self.compute.work(False, self.worker.evaluate, ev.inputs, ev.targets)
        if last:
            loss, correct = out
            return Evaluated(step, ev.mb, loss, correct, count)
        bad = non_finite({input_name(i): o for i, o in enumerate(out)})
        if bad is not None:
            raise SwarmError(f"stage {self.worker.stage.io.index} computed non-finite activations ({bad}) on validation data")
        return await self.link.evaluate(Evaluate(step, ev.mb, 1.0, out, ev.targets))

    async def _pass(self, backward: bool, fn, *args):
        """(result, seconds) of a forward or backward pass on the compute thread, noted in the step's timeline."""
        def timed():
            started, cpu = time.perf_counter(), time.thread_time()
            result = fn(*args)
            ended = time.perf_counter()
            self.counters.compute_cpu_s += time.thread_time() - cpu
            self.steps.timeline.passed(started, ended)
            return result, ended - started
        return await self.compute.work(backward, timed)

    # closing a step
    async def _step(self, step: int, sender: str, skip: bool = False) -> bytes:
        if skip and step == self.worker.step_id and step not in self.protocol.finishing:
            self.worker.skip(f"gradient overflow upstream (stage {self.worker.stage.io.index - 1}, {sender[-8:]})")
        all_in = self.steps.all_in.setdefault(step, asyncio.Event())
        if self.protocol.arrive(step, sender):
            self.steps.finishing[step] = asyncio.ensure_future(self._finish(step))
            all_in.set()
        try:   # the other previous-stage replicas may still be at work
            await asyncio.wait_for(all_in.wait(), self.timeout_s)
        except asyncio.TimeoutError:
            raise PeerUnavailable(f"step {step}: not every previous-stage replica finished in time") from None
        await asyncio.wait_for(asyncio.shield(self.steps.finishing[step]), self.timeout_s)
        if sender != self.peers.me:   # a previous stage hears once the step reached the end of the pipeline
            await asyncio.wait_for(self.settle(), self.timeout_s)
        return Stepped(step).to_frame()

    async def close_step(self, step: int) -> None:
        """The first stage's own driver is done with ``step``: returns once this stage has stepped."""
        await self._step(step, self.peers.me)

    async def _finish(self, step: int) -> None:
        """All micro-batches of ``step`` are done here: sum with the replicas, step, pass it on."""
        try:
            await self.settle()   # the previous step reached every downstream stage
            # the next stage sums and steps meanwhile (told whether the step overflowed)
            self.steps.passing = asyncio.ensure_future(self.link.pass_on(step, self.worker.overflowed))
            started = time.perf_counter()
            await self._reduce_and_apply(step)
            self.counters.reduce_s += time.perf_counter() - started
        except BaseException:
            self.protocol.abandon(step)
            self.steps.finishing.pop(step, None)   # the previous stage may send ``step`` again
            raise
        finally:
            self.steps.all_in.pop(step, None)
            if len(self.peers.replicas) > 1:
                self.sync.forget(step)   # (an overlapped sync's tables: when its exchange ends)
        self.protocol.finished(step)
        self.steps.timeline.stepped(self.counters)
        for old in [s for s in self.steps.finishing if s < step]:   # (the current one: late waiters may still look)
            del self.steps.finishing[old]
        async with self.steps.advanced:
            self.steps.advanced.notify_all()
        if self.hooks.stepped is not None:
            self.hooks.stepped(step)

    async def _reduce_and_apply(self, step: int) -> None:
        """The optimizer step of ``step``, with the replicas' sum before it or their sync after it."""
        replicated = len(self.peers.replicas) > 1
        sync = await self.sync.before_step(step) if replicated else None
        if self.hooks.before_apply is not None:
            await self.hooks.before_apply(step)
        if not await self.compute.work(True, self.worker.step, sync is None):
            self.counters.skipped_steps += 1
            self.warn.log.warning(f"stage {self.worker.stage.io.index} skipped step {step}: {self.worker.skipped}")
        if sync is not None:   # the replicas meet after this inner step, within it
            await self.sync.after_step(step, sync)
            self.worker.advance()
        if replicated:
            await self.sync.flush(step)

    async def settle(self) -> None:
        """Wait until the newest step has been passed on to every downstream stage (raises its failure;
        a waiter that gives up does not cancel the passing)."""
        if self.steps.passing is not None:
            await asyncio.shield(self.steps.passing)

    @property
    def between_steps(self) -> bool:
        """No micro-batch of an unfinished step has been answered or is in flight here."""
        passing = self.steps.passing is not None and not self.steps.passing.done()
        return self.protocol.between_steps(bool(self.worker.saved), passing)

    def close(self) -> None:
        if self.steps.passing is not None:
            self.steps.passing.cancel()
        self.sync.close()
        self.compute.close()
