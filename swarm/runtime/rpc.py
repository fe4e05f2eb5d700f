"""Remote autodiff between pipeline neighbours over libp2p streams (protocol ``swarm.stage.v1``).

A request and its reply are each one length-prefixed wire frame (``swarm.wire``). Kinds:

- ``forward`` {step, mb, scale}: a micro-batch's activations ``x0..`` (and ``targets`` for the last
  stage). The reply ``grads`` carries the gradient w.r.t. them (``g0..``), computed after the rest
  of the pipeline ran forward and backward, and the loss. So one ``forward`` call from the first stage
  runs the whole pipeline for one micro-batch: autodiff across machines with no shared Python object.
  Activations travel AdaTopK-compressed at the link's current ratio (``LinkPolicy``); the gradient
  comes back on the same mask, without indices. Each micro-batch goes to one replica of the next
  stage (by micro-batch id); if that replica cannot be reached it is retried on the others.
- ``step`` {step}: sent by every replica of the previous stage once its micro-batches are done. When
  all have arrived, the stage sums its gradients with its replicas (``reduce``), applies one optimizer
  step and passes ``step`` on (retrying a transient failure); the reply comes once everything
  downstream has stepped too. Only the first stage's own driver hears as soon as that stage has
  stepped, so the next step enters the pipeline right behind the step message: a request for the
  step after the current one waits (up to the time-out) until the stage has stepped. A failure to
  pass a step on fails the next one.
- ``reduce`` {step, part}: a replica's part of the flat gradient for its owner; the reply is the sum
  over all replicas (``swarm.runtime.allreduce``).

Every request names its step id (and micro-batch id); a stale step, a duplicate micro-batch, a caller
that is not a pipeline neighbour, a malformed frame get an ``error`` reply (``retry`` set where another
attempt may succeed) and change nothing.

Hostile or broken peers (docs/hostile.md, "Data plane"): a stream from a peer that is neither a
neighbour nor a replica, or from a banned peer, is refused right after its 8-byte length prefix, as is
one beyond the per-peer or overall number of requests in progress or the budget of bytes being read
(``Gate``); a frame's header is checked (sender, kind, tensor names, the traced boundary's shapes, the
decoded size) before any tensor is decoded; tensors with NaN or Inf are refused and their sender is
banned for a while (``swarm.refusals.Bans``); a next-stage replica that answers with them is routed
around; a stage whose own update is not finite skips the step. Every send has a deadline. Refusals
are logged, rate-limited (``swarm.refusals.Refusals``).
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

from swarm.compression.adatopk import ChannelScale
from swarm.compression.policy import LinkPolicy
from swarm.errors import PeerUnavailable, Poisoned, RemoteProtocolError, SwarmError
from swarm.messages import check_reply, error_frame
from swarm.net.streams import PREFIX_BYTES, Call, Gate, close_stream, serve_one, stream_caller
from swarm.refusals import Bans, Refusals, short
from swarm.runtime.allreduce import ReduceRound, parts
from swarm.runtime.worker import StageWorker
from swarm.wire import NAMES, Header, Limits, Message, decode, non_finite, pack, read_header, sizes, unpack

PROTOCOL = "swarm.stage.v1"
MAX_CACHED_REPLIES = 256    # per step: bounds the memory a confused or hostile upstream can make us hold


def stage_caller(p2p, limits: Limits = Limits(), timeout_s: float = 120.0) -> Call:
    """``call(peer, frame) -> reply frame`` of the stage protocol over libp2p (``swarm.net.streams``)."""
    return stream_caller(p2p, limits.max_frame_bytes, timeout_s, PROTOCOL)


def local_caller(me: str, servers: dict) -> Call:
    """``call`` between stage servers of one process (tests, benchmarks): the same frames, no daemon."""
    async def call(peer: str, frame: bytes) -> bytes:
        if peer not in servers:
            raise PeerUnavailable(f"peer {peer[-8:]} unreachable (not in this process)")
        return await servers[peer].answer(frame, me)
    return call


class PriorityRunner:
    """One compute thread: passes run one at a time, lower priority value first, then in arrival order
    (1F1B: backward before forward; GPipe: arrival order)."""

    def __init__(self, name: str = "stage"):
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


@dataclass(frozen=True)
class Neighbours:
    """This node's place in the plan: its stage's replicas (sorted, itself included) and those of the
    stages before and after it."""

    me: str
    replicas: tuple[str, ...]
    upstream: tuple[str, ...] = ()
    downstream: tuple[str, ...] = ()
    micro_batches: int = 0     # per first-stage replica and step: replica ``r`` sends ids ``r * M + m``

    def route(self, mb: int, banned: set[str] = frozenset()) -> list[str]:
        """Next-stage replicas to try for micro-batch ``mb``: its own first (round-robin: spreads the
        load evenly, and first-stage replica ``r`` starts ``r`` places further on, so the replicas' first
        and last micro-batches of a step go to different next-stage replicas), then the others;
        recently failed ones last."""
        n = len(self.downstream)
        first = mb + (mb // self.micro_batches if self.micro_batches else 0)
        order = [self.downstream[(first + k) % n] for k in range(n)]
        return [p for p in order if p not in banned] + [p for p in order if p in banned]


@dataclass
class Counters:
    bytes_sent: int = 0         # every frame this stage sent (requests and replies)
    act_raw: int = 0            # activations sent and their gradients received, uncompressed ...
    act_wire: int = 0           # ... and as they crossed the wire (AdaTopK's achieved ratio: raw / wire)
    errors: int = 0
    retries: int = 0
    refused: int = 0            # requests and replies refused as hostile or broken (RemoteProtocolError), of which ...
    poisoned: int = 0           # ... carried NaN or Inf (their senders banned)
    skipped_steps: int = 0      # optimizer steps not applied: the update was not finite
    compute_s: float = 0.0      # forward + backward seconds, over ...
    micro_batches: int = 0      # ... this many micro-batches
    compute_cpu_s: float = 0.0  # CPU seconds of the compute thread in those passes
    fill_s: float = 0.0         # per step: from the previous optimizer step to the first pass ...
    drain_s: float = 0.0        # ... and from the last pass to this step's optimizer step (summed), of which
    reduce_s: float = 0.0       # ... summing gradients with the replicas and applying them
    ratios: dict[str, float] = field(default_factory=dict)   # last ratio used, by next-stage peer
    delivered: dict[str, float] = field(default_factory=dict)   # TFLOP/s each next-stage peer delivered (smoothed)
    sent_to: dict[str, int] = field(default_factory=dict)    # bytes_sent by receiving peer ...
    reduce_to: dict[str, int] = field(default_factory=dict)  # ... and the all-reduce's share of them

    def sent(self, peer: str, n: int, reduce: bool = False) -> None:
        self.bytes_sent += n
        self.sent_to[peer] = self.sent_to.get(peer, 0) + n
        if reduce:
            self.reduce_to[peer] = self.reduce_to.get(peer, 0) + n


class StageServer:
    """Serves one stage of the committed plan. ``call`` reaches other peers; ``policy`` decides the
    ratio of the outgoing link (None: last stage); ``bandwidth(peer)`` is the newest measurement."""

    def __init__(self, worker: StageWorker, peers: Neighbours, call: Call | None, limits: Limits = Limits(),
                 policy: LinkPolicy | None = None, bandwidth: Callable[[str], float | None] = lambda p: None,
                 timeout_s: float = 120.0, schedule: str = "1f1b", max_requests: int = 64,
                 admit: Callable[[str], bool] | None = None, log: Callable[[str], None] = lambda line: None,
                 max_per_peer: int | None = None, read_budget: int | None = None, bans: Bans | None = None):
        self.worker, self.peers, self.call, self.limits = worker, peers, call, limits
        self.policy, self.bandwidth, self.timeout_s, self.admit = policy, bandwidth, timeout_s, admit
        self.log = log
        self.backward_first = schedule == "1f1b"
        self.compute = PriorityRunner()
        self.counters = Counters()
        self.channel_scale = ChannelScale()
        self.slots = max_requests
        self.banned: dict[str, float] = {}    # next-stage replicas that failed recently -> until (tried last)
        self.bans = bans if bans is not None else Bans()   # peers that sent NaN/Inf: refused, not routed to (the node's)
        self.next_stage: tuple[float, bool] | None = None   # (FLOPs of a micro-batch's pass at the next stage, is it the last)
        self.outstanding: dict[str, int] = {}               # calls in flight to each next-stage peer
        self.refusals = Refusals(log)
        self._said: dict[str, float] = {}     # rate limit of this stage's own warnings
        # a peer never has more than its worker's micro-batches in flight, plus step and reduce requests
        per_peer = max_per_peer or min(max_requests, worker.max_in_flight + 4)
        self.gate = Gate(per_peer, max_requests, read_budget or max(4 * limits.max_frame_bytes, 32 << 20))
        self.allowed = frozenset(peers.upstream) | frozenset(peers.replicas) - {peers.me}
        self.arrived: dict[int, set[str]] = {}
        self.replies: dict[tuple[int, int], bytes] = {}   # (step, mb) answered (retries get the same reply)
        self.draining = False                 # finish the step in progress, take no new one
        self.all_in: dict[int, asyncio.Event] = {}
        self.finishing: dict[int, asyncio.Task] = {}
        self.rounds: dict[int, ReduceRound] = {}
        self.advanced = asyncio.Condition()          # notified after every optimizer step
        self.passing: asyncio.Task | None = None     # passing the newest step on downstream
        self.flat_numel = sum(p.numel() for p in worker.params)
        self.step_began, self.first_pass, self.last_pass = time.perf_counter(), None, 0.0   # this step's timeline
        self.stepped: Callable[[int], None] = lambda step: None   # hook after every optimizer step
        self.before_apply: Callable[[int], Awaitable[None]] | None = None   # hook before (the backup gate)

    @property
    def errors(self) -> int:
        return self.counters.errors

    async def handle(self, stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request per stream (the libp2p handler)."""
        peer = stream_info.peer_id.to_base58()
        try:
            if self.admit is not None and not self.admit(peer):
                return
            sent = await serve_one(reader, writer, lambda frame: self.answer(frame, peer), self.limits.max_frame_bytes,
                                   self.timeout_s, self.gate, peer, lambda: self._refuse_stream(peer))
            self.counters.sent(peer, sent, reduce=peer in self.peers.replicas)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, SwarmError, struct.error, OSError) as e:
            self.counters.errors += 1
            if isinstance(e, RemoteProtocolError):
                self.counters.refused += 1
            what = str(e) if isinstance(e, SwarmError) else \
                "the stream ended inside a frame" if isinstance(e, asyncio.IncompleteReadError) else \
                "no frame or hang-up in time" if isinstance(e, asyncio.TimeoutError) else type(e).__name__
            self.refusals.note(peer, "busy" if isinstance(e, PeerUnavailable) else "stream", what)
        finally:
            close_stream(writer)

    def _refuse_stream(self, peer: str) -> SwarmError | None:
        """Why a stream from ``peer`` is refused after its length prefix, the frame unread (None: read it)."""
        if self.bans.banned(peer):
            return RemoteProtocolError(f"peer {short(peer)} is banned for a while ({self.bans.until[peer][1]})")
        if peer not in self.allowed:
            return RemoteProtocolError(f"peer {short(peer)} is not a previous-stage replica or a replica of stage "
                                       f"{self.worker.stage.io.index}")
        return None

    async def answer(self, frame: bytes, sender: str) -> bytes:
        """The reply frame to a request frame from ``sender`` (authenticated peer id): never raises."""
        if self.slots <= 0:
            self.counters.errors += 1
            return error_frame(PeerUnavailable("stage busy: too many requests in progress"))
        self.slots -= 1
        kind = "frame"
        try:
            if sender != self.peers.me and (refused := self._refuse_stream(sender)) is not None:
                raise refused   # a stranger or a banned peer: not even the header is parsed
            try:
                header = read_header(frame, self.limits)
            except SwarmError as e:
                raise RemoteProtocolError(str(e)) from None
            kind = header.kind if header.kind in ("forward", "step", "reduce") else "request"
            if header.kind in ("forward", "step"):   # the first stage is driven by its own node
                self._check_sender(sender, self.peers.upstream or (self.peers.me,), "a previous-stage replica")
            elif header.kind == "reduce":
                self._check_sender(sender, tuple(p for p in self.peers.replicas if p != self.peers.me), "a replica")
            else:
                raise RemoteProtocolError(f"unknown request kind '{header.kind}'")
            step = header.meta.get("step")
            if header.kind == "step" and type(step) is int and step == self.worker.step_id - 1:
                return pack("stepped", {"step": step}, {})[0]   # a repeat whose first reply was lost
            self._expect(header)
            msg = self._decode(frame, header, sender)
            del frame
            await self._reach(step)
            if msg.kind == "forward" and self.draining and not self.replies:
                raise PeerUnavailable("stage leaving: it takes no new step")
            if msg.kind == "forward":
                return await self._forward(msg, msg.meta.get("mb"))
            return await (self._step(step, sender) if msg.kind == "step" else self._reduce(msg, sender))
        except Exception as e:
            self.counters.errors += 1
            if isinstance(e, RemoteProtocolError):
                self.counters.refused += 1
                self.refusals.note(sender, kind, str(e))
            elif not isinstance(e, SwarmError):   # a pass that failed on odd input
                self.refusals.note(sender, kind, f"stage failed: {type(e).__name__}: {str(e)[:200]}")
            return error_frame(e)
        finally:
            self.slots += 1

    def _expect(self, header: Header) -> None:
        """The tensors a request announces must be the ones its kind carries at this stage: the traced
        boundary's inputs (batch up to the micro-batch size), a reduce part of the owner's size, nothing
        for ``step``; checked on the header, before anything is decoded."""
        shapes = header.shapes()
        if header.kind == "step":
            if shapes:
                raise RemoteProtocolError("a step request carries no tensors")
        elif header.kind == "reduce":
            part = header.meta.get("part")
            if type(part) is not int or part != self.peers.replicas.index(self.peers.me):
                raise RemoteProtocolError(f"part {part!r} is not owned by this replica")
            lo, hi = parts(self.flat_numel, len(self.peers.replicas))[part]
            if shapes != {"g": ([hi - lo], "float32", "raw")}:
                raise RemoteProtocolError(f"a reduce request carries exactly one tensor 'g' (float32 [{hi - lo}], raw), "
                              f"not {str(shapes)[:120]}")
        else:
            inputs = sorted((k for k in shapes if k.startswith("x") and k[1:].isdigit()), key=lambda k: int(k[1:]))
            others = set(shapes) - set(inputs) - {"targets"}
            if others or inputs != [f"x{i}" for i in range(len(inputs))]:
                raise RemoteProtocolError(f"a forward request carries inputs x0, x1, ... without gaps (and targets), "
                              f"not {sorted(shapes)[:8]}")
            try:
                self.worker.check_inputs([(shapes[k][0], shapes[k][1]) for k in inputs])
            except SwarmError as e:
                raise RemoteProtocolError(str(e)) from None

    def _decode(self, frame: bytes, header: Header, sender: str, masks: dict | None = None) -> Message:
        """``decode``, refusing tensors with NaN or Inf (their sender is banned for a while)."""
        try:
            msg = decode(frame, header, self.limits, masks)
        except SwarmError as e:
            raise RemoteProtocolError(str(e)) from None
        bad = non_finite(msg.tensors)
        if bad is not None:
            self.bans.ban(sender, f"sent {header.kind} with NaN/Inf")
            self.counters.poisoned += 1
            raise Poisoned(f"{header.kind}: {bad}; peer {short(sender)} banned for {self.bans.ban_s:.0f} s")
        return msg

    def _say(self, key: str, line: str, interval_s: float = 60.0) -> None:
        """Log one of this stage's own warnings, at most once per ``interval_s`` per ``key``."""
        now = time.monotonic()
        if now - self._said.get(key, -interval_s) >= interval_s:
            self._said[key] = now
            self.log(line)

    async def _reach(self, step) -> None:
        """Return once ``step`` is the current step: at once, or (for the next one) after this stage
        has stepped; any other step id is an error."""
        current = self.worker.step_id
        if isinstance(step, int) and step == current + 1:
            async with self.advanced:
                try:
                    await asyncio.wait_for(self.advanced.wait_for(lambda: self.worker.step_id >= step), self.timeout_s)
                except asyncio.TimeoutError:
                    raise PeerUnavailable(f"step {step} requested, but this stage is still at step {current}") from None
            current = self.worker.step_id
        if not isinstance(step, int) or step != current:
            raise (PeerUnavailable if isinstance(step, int) and step > current else SwarmError)(
                f"step {step!r} is not the current step {current}")

    def _check_sender(self, sender: str, allowed: tuple[str, ...], what: str) -> None:
        if sender not in allowed:
            raise RemoteProtocolError(f"peer {sender[-8:]} is not {what} of stage {self.worker.stage.io.index}")

    async def _run(self, backward: bool, fn, *args):
        """``fn(*args)`` on the compute thread (1F1B: backward work first)."""
        return await self.compute.run(0 if backward and self.backward_first else 1, fn, *args)

    async def _pass(self, backward: bool, fn, *args):
        """(result, seconds) of a forward or backward pass on the compute thread, noted in the step's timeline."""
        def timed():
            started, cpu = time.perf_counter(), time.thread_time()
            result = fn(*args)
            self.last_pass = time.perf_counter()
            self.counters.compute_cpu_s += time.thread_time() - cpu
            if self.first_pass is None:
                self.first_pass = started
            return result, self.last_pass - started
        return await self._run(backward, timed)

    async def _forward(self, msg: Message, mb) -> bytes:
        if not isinstance(mb, int) or mb < 0:
            raise SwarmError(f"bad micro-batch id {mb!r}")
        key = (self.worker.step_id, mb)
        if key in self.replies:   # a retry whose first reply was lost: the same answer, nothing accumulated twice
            return self.replies[key]
        reply = await self._compute_forward(msg, mb)
        if len(self.replies) < MAX_CACHED_REPLIES:
            self.replies[key] = reply
        return reply

    async def _compute_forward(self, msg: Message, mb: int) -> bytes:
        n_inputs = len([k for k in msg.tensors if k.startswith("x")])
        inputs = [msg.tensors.get(f"x{i}") for i in range(n_inputs)]
        if any(t is None for t in inputs):
            raise SwarmError("inputs must be named x0, x1, ... without gaps")
        scale = msg.meta.get("scale", 1.0)
        if not isinstance(scale, (int, float)) or not 0 < scale <= 1:
            raise SwarmError(f"bad loss scale {scale!r}")
        targets, step = msg.tensors.get("targets"), self.worker.step_id
        outputs, forward_s = await self._pass(False, self.worker.forward, mb, inputs, targets, float(scale))
        index = self.worker.stage.io.index
        if not self.peers.downstream:
            loss = outputs[0].item()
            if not math.isfinite(loss):   # nothing to learn from: no gradient, the driver sees the loss
                await self._run(True, self.worker.drop, mb)
                self._say("loss", f"warning: stage {index}: loss {loss} on micro-batch {mb} of step {step}; "
                                  "its gradient is not applied")
                return pack("grads", {"step": step, "mb": mb, "loss": loss}, {})[0]
            grads, backward_s = await self._pass(True, self.worker.backward, mb, None)
        else:
            try:
                bad = non_finite({f"x{i}": o for i, o in enumerate(outputs)})
                if bad is not None:   # never sent: the next stage would (rightly) ban this one
                    self._say("forward", f"warning: stage {index} computed non-finite activations ({bad}) "
                                         f"in step {step}; not sent")
                    raise SwarmError(f"stage {index} computed non-finite activations ({bad})")
                sent_at = time.perf_counter()
                reply = await self._send_forward(step, mb, float(scale), outputs, targets)
                wait_s = time.perf_counter() - sent_at   # told upstream: its share of the round trip is not ours
            except BaseException:
                await self._run(True, self.worker.drop, mb)
                raise
            loss = reply.meta.get("loss")
            out_grads = [reply.tensors.get(f"g{i}") for i in range(len(outputs))]
            grads, backward_s = await self._pass(True, self.worker.backward, mb, out_grads)
        bad = non_finite({f"g{i}": g for i, g in enumerate(grads) if g is not None})
        if bad is not None:   # accumulated here (this step will be skipped), never sent upstream
            self._say("backward", f"warning: stage {index} computed non-finite input gradients ({bad}) in step {step}; not sent")
            raise SwarmError(f"stage {index} computed non-finite gradients ({bad})")
        self.counters.compute_s += forward_s + backward_s
        self.counters.micro_batches += 1
        if self.policy is not None:
            self.policy.observe_compute(forward_s + backward_s)
        reuse = {f"g{i}": msg.masks[f"x{i}"] for i in range(n_inputs) if f"x{i}" in msg.masks}
        meta = {"step": step, "mb": mb, "loss": loss, "wait_s": wait_s if self.peers.downstream else 0.0}
        return pack("grads", meta, {f"g{i}": g for i, g in enumerate(grads) if g is not None}, reuse=reuse)[0]

    async def _send_forward(self, step: int, mb: int, scale: float, outputs: list, targets) -> Message:
        """Send a micro-batch's activations to a next-stage replica, falling back to the others."""
        tensors = {f"x{i}": o for i, o in enumerate(outputs)}
        if targets is not None:
            tensors["targets"] = targets
        floats = [k for k, t in tensors.items() if t.is_floating_point()]
        raw = sum(tensors[k].numel() * tensors[k].element_size() for k in floats)
        now, last_error = time.monotonic(), None
        banned = {p for p, until in self.banned.items() if until > now}
        expect = {f"g{i}": (list(o.shape), NAMES[o.dtype]) for i, o in enumerate(outputs) if o.dtype in NAMES}
        for peer in [p for p in self.peers.route(mb, banned) if not self.bans.banned(p)]:   # poisoners: not at all
            ratio = self.policy.ratio(step, self.bandwidth(peer), raw) if self.policy else 1.0
            started = time.perf_counter()
            frame, masks = pack("forward", {"step": step, "mb": mb, "scale": scale}, tensors,
                                ratios={k: ratio for k in floats}, scales=self.channel_scale)
            encode_s = time.perf_counter() - started
            self.counters.ratios[peer] = ratio
            queued = self.outstanding[peer] = self.outstanding.get(peer, 0) + 1
            sent_at = time.perf_counter()
            try:
                reply_frame = await self.call(peer, frame)
            except PeerUnavailable as e:
                self.banned[peer], last_error = time.monotonic() + 10.0, e
                self.counters.retries += 1
                continue
            finally:
                self.outstanding[peer] -= 1
            started = time.perf_counter()
            try:
                reply = self._reply(reply_frame, peer, "grads", expect, {f"g{k[1:]}": m for k, m in masks.items()})
            except RemoteProtocolError as e:   # a broken or hostile replica: the micro-batch goes to the next one
                last_error = e
                if not isinstance(e, Poisoned):
                    self.banned[peer] = time.monotonic() + 10.0
                self.counters.retries += 1
                continue
            check_reply(reply, f"stage {self.worker.stage.io.index + 1}")
            self._observe_delivered(peer, started - sent_at, queued, reply, len(frame) + len(reply_frame))
            if ratio > 1 and self.policy is not None:
                self.policy.observe_codec(raw, encode_s + time.perf_counter() - started)
            sent, grads = sizes(frame), [k for k in reply.tensors if k.startswith("g")]
            self.counters.sent(peer, len(frame) + PREFIX_BYTES)
            self.counters.act_raw += raw + sum(reply.tensors[k].numel() * reply.tensors[k].element_size() for k in grads)
            self.counters.act_wire += sum(sent[k] for k in floats) + sum(reply.sizes[k] for k in grads)
            return reply
        raise PeerUnavailable(f"no replica of stage {self.worker.stage.io.index + 1} reachable ({last_error})")

    def _observe_delivered(self, peer: str, rtt: float, queued: int, reply: Message, nbytes: int) -> None:
        """The compute ``peer`` delivered on one call (``Counters.delivered``, TFLOP/s, smoothed): the next
        stage's FLOPs over the round trip less the transfer at the measured bandwidth and the time the
        peer says it waited for its own next stage (at most the round trip; none for a last stage),
        shared among the calls in flight to it. Queueing only makes it read low: planning allows for that."""
        if self.next_stage is None:
            return
        flops, last = self.next_stage
        wait = reply.meta.get("wait_s", 0.0)
        wait = 0.0 if last or not isinstance(wait, (int, float)) or not math.isfinite(wait) else min(max(wait, 0.0), rtt)
        bandwidth = self.bandwidth(peer)
        local = max(rtt - wait - (8 * nbytes / bandwidth if bandwidth else 0.0), 1e-6) / max(queued, 1)
        rate, old = flops / local / 1e12, self.counters.delivered.get(peer)
        self.counters.delivered[peer] = rate if old is None else 0.8 * old + 0.2 * rate

    def _reply(self, frame: bytes, peer: str, kind: str, expect: dict[str, tuple[list[int], str]],
               masks: dict | None = None) -> Message:
        """A reply of ``kind`` (or ``error``) from ``peer`` whose tensors must be among ``expect`` (name ->
        shape, dtype), checked on the header before decoding, and finite (else ``peer`` is banned);
        a refused reply is counted and logged."""
        try:
            try:
                header = read_header(frame, self.limits)
            except SwarmError as e:
                raise RemoteProtocolError(str(e)) from None
            if header.kind not in (kind, "error"):
                raise RemoteProtocolError(f"a {header.kind!r} reply where {kind!r} was expected")
            for name, (shape, dtype, _) in header.shapes().items():
                if name not in expect or (shape, dtype) != tuple(expect[name]):
                    raise RemoteProtocolError(f"{kind}: tensor '{name}' {dtype} {shape[:8]} is not one this stage expects")
            return self._decode(frame, header, peer, masks)
        except RemoteProtocolError as e:
            self.counters.refused += 1
            self.refusals.note(peer, f"{kind} reply", str(e))
            raise

    async def _step(self, step: int, sender: str) -> bytes:
        expected = set(self.peers.upstream) or {self.peers.me}
        self.arrived.setdefault(step, set()).add(sender)
        all_in = self.all_in.setdefault(step, asyncio.Event())
        if expected <= self.arrived[step] and step not in self.finishing:
            self.finishing[step] = asyncio.ensure_future(self._finish(step))
            all_in.set()
        try:   # the other previous-stage replicas may still be at work
            await asyncio.wait_for(all_in.wait(), self.timeout_s)
        except asyncio.TimeoutError:
            raise PeerUnavailable(f"step {step}: not every previous-stage replica finished in time") from None
        await asyncio.wait_for(asyncio.shield(self.finishing[step]), self.timeout_s)
        if sender != self.peers.me:   # a previous stage hears once the step reached the end of the pipeline
            await asyncio.wait_for(self.settle(), self.timeout_s)
        return pack("stepped", {"step": step}, {})[0]

    async def _finish(self, step: int) -> None:
        """All micro-batches of ``step`` are done here: sum with the replicas, step, pass it on."""
        try:
            await self.settle()   # the previous step reached every downstream stage
            self.passing = asyncio.ensure_future(self._pass_on(step))   # the next stage sums and steps meanwhile
            started = time.perf_counter()
            await self._reduce_and_apply(step)
            self.counters.reduce_s += time.perf_counter() - started
        except BaseException:
            self.finishing.pop(step, None)   # the previous stage may send ``step`` again
            raise
        finally:
            for table in (self.arrived, self.all_in, self.rounds):
                table.pop(step, None)
        self.replies = {k: r for k, r in self.replies.items() if k[0] > step}
        now = time.perf_counter()
        if self.first_pass is not None:
            self.counters.fill_s += self.first_pass - self.step_began
            self.counters.drain_s += now - self.last_pass
        self.step_began, self.first_pass = now, None
        for old in [s for s in self.finishing if s < step]:   # (the current one: late waiters may still look)
            del self.finishing[old]
        async with self.advanced:
            self.advanced.notify_all()
        self.stepped(step)

    async def _pass_on(self, step: int) -> None:
        """Send ``step`` to every next-stage replica, again after a transient failure, until the time-out."""
        async def one(peer: str) -> None:
            deadline, delay = time.monotonic() + self.timeout_s, 0.05
            while True:
                try:
                    check_reply(self._reply(await self.call(peer, pack("step", {"step": step}, {})[0]), peer, "stepped", {}),
                                f"step at stage {self.worker.stage.io.index + 1}")
                    return
                except PeerUnavailable:
                    if time.monotonic() + delay > deadline:
                        raise
                await asyncio.sleep(delay)   # back-off: the peer may be restarting
                delay = min(2 * delay, 2.0)
        await asyncio.gather(*(one(p) for p in self.peers.downstream))

    async def settle(self) -> None:
        """Wait until the newest step has been passed on to every downstream stage (raises its failure;
        a waiter that gives up does not cancel the passing)."""
        if self.passing is not None:
            await asyncio.shield(self.passing)

    async def _reduce_and_apply(self, step: int) -> None:
        replicas = self.peers.replicas
        index = self.worker.stage.io.index
        if len(replicas) > 1 and self.flat_numel:
            flat = await self._run(True, self.worker.flat_grads)
            if not bool(torch.isfinite(flat).all()):   # the replicas' sum must stay finite (and identical)
                self.log(f"warning: stage {index}: own gradient of step {step} is not finite; this replica "
                         "contributes zeros to the all-reduce")
                flat = torch.zeros_like(flat)
            bounds = parts(self.flat_numel, len(replicas))
            mine = replicas.index(self.peers.me)
            self._round(step, mine).add(self.peers.me, flat[slice(*bounds[mine])].clone())

            async def exchange(j: int) -> torch.Tensor:
                if j == mine:
                    return await asyncio.wait_for(asyncio.shield(self.rounds[step].done), self.timeout_s)
                frame = pack("reduce", {"step": step, "part": j}, {"g": flat[slice(*bounds[j])]})[0]
                self.counters.sent(replicas[j], len(frame) + PREFIX_BYTES, reduce=True)
                size = bounds[j][1] - bounds[j][0]
                try:
                    reply = self._reply(await self.call(replicas[j], frame), replicas[j], "reduced", {"g": ([size], "float32")})
                except RemoteProtocolError as e:
                    raise SwarmError(f"all-reduce: replica {replicas[j][-8:]} sent a malformed sum ({e})") from None
                total = check_reply(reply, "all-reduce").tensors.get("g")
                if total is None:
                    raise SwarmError(f"all-reduce: replica {replicas[j][-8:]} sent a malformed sum")
                return total

            sums = await asyncio.gather(*(exchange(j) for j in range(len(replicas))))
            await self._run(True, self.worker.set_flat_grads, torch.cat(sums))
        if self.before_apply is not None:
            await self.before_apply(step)
        if not await self._run(True, self.worker.step):
            self.counters.skipped_steps += 1
            self.log(f"warning: stage {index} skipped step {step}: {self.worker.skipped}")

    def _round(self, step: int, part: int) -> ReduceRound:
        if step not in self.rounds:
            bounds = parts(self.flat_numel, len(self.peers.replicas))[part]
            self.rounds[step] = ReduceRound(self.peers.replicas, bounds[1] - bounds[0])
        return self.rounds[step]

    async def _reduce(self, msg: Message, sender: str) -> bytes:
        step, part = msg.meta["step"], msg.meta.get("part")
        if type(part) is not int or part != self.peers.replicas.index(self.peers.me):
            raise SwarmError(f"part {part!r} is not owned by this replica")
        if set(msg.tensors) != {"g"}:
            raise SwarmError("a reduce request carries exactly one tensor 'g'")
        self._round(step, part).add(sender, msg.tensors["g"])
        total = await asyncio.wait_for(asyncio.shield(self.rounds[step].done), self.timeout_s)
        return pack("reduced", {"step": step, "part": part}, {"g": total})[0]

    @property
    def between_steps(self) -> bool:
        """No micro-batch of an unfinished step has been answered or is in flight here."""
        return not self.replies and not self.worker.saved and not self.arrived and (self.passing is None or self.passing.done())

    def close(self) -> None:
        if self.passing is not None:
            self.passing.cancel()
        self.compute.close()


async def train_step(first: StageServer, inputs: torch.Tensor, targets: torch.Tensor, micro_batches: int,
                     in_flight: int = 4, rank: int = 0, world: int = 1, deadline_s: float = 300.0,
                     done: dict[int, float] | None = None, settle: bool = True) -> float:
    """One optimizer step driven by a first-stage replica: its ``micro_batches`` go down the pipeline
    concurrently (at most ``in_flight``), their gradients come back, then every stage steps. Losses
    are scaled by ``1 / (micro_batches * world)``: the replicas' summed gradients are the global mean.
    A micro-batch that failed with a retryable error is sent again until ``deadline_s``; ``done``
    (micro-batch id -> loss) carries what already went through over calls for the same step, so a
    retried step never sends a finished micro-batch twice. With ``settle`` it returns once every stage
    has stepped, else once this stage has (the next step may follow the step message down the pipeline).
    Returns the mean loss of this replica's micro-batches."""
    step, me = first.worker.step_id, first.peers.me
    done = {} if done is None else done
    gate = asyncio.Semaphore(in_flight)
    deadline = time.monotonic() + deadline_s

    async def one(m: int, x: torch.Tensor, y: torch.Tensor) -> float:
        mb, delay = rank * micro_batches + m, 0.05
        if mb in done:
            return done[mb]
        frame = pack("forward", {"step": step, "mb": mb, "scale": 1 / (micro_batches * world)}, {"x0": x, "targets": y})[0]
        while True:
            async with gate:
                try:
                    loss = float(check_reply(unpack(await first.answer(frame, me), first.limits), "pipeline").meta["loss"])
                    done[mb] = loss
                    return loss
                except PeerUnavailable:
                    if time.monotonic() + delay > deadline:
                        raise
            await asyncio.sleep(delay)   # back-off before the next attempt (a peer restarting, a plan being adopted)
            delay = min(2 * delay, 2.0)

    losses = await asyncio.gather(*(one(m, x, y) for m, (x, y) in enumerate(zip(inputs.chunk(micro_batches),
                                                                                 targets.chunk(micro_batches)))))
    check_reply(unpack(await first.answer(pack("step", {"step": step}, {})[0], me), first.limits), "step")
    if settle:
        await first.settle()
    return sum(losses) / len(losses)
