"""A stage's link to the next stage: micro-batches go to one of its replicas (``StageProtocol.route``)
at the ratio the ``LinkPolicy`` chooses, their gradients come back on the same AdaTopK masks, and a
finished step is passed on to every replica. Each call measures what the receiving peer delivered
(``Counters.delivered``: planning checks compute claims with it)."""
from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from swarm.compression.adatopk import ChannelScale
from swarm.compression.policy import LinkPolicy
from swarm.errors import PeerUnavailable, Poisoned, RemoteProtocolError
from swarm.messages import EVALUATED, GRADS, STEPPED, Evaluate, Evaluated, Forward, Grads, Step, check_reply
from swarm.net.streams import PREFIX_BYTES, Call, with_backoff
from swarm.pipeline.frames import FrameChecker
from swarm.pipeline.protocol import StageProtocol
from swarm.runtime.counters import Counters
from swarm.wire import Message


class NextStage:
    """Sends to the next stage's replicas for stage ``index`` (``call`` reaches a peer; ``policy``
    picks the outgoing ratio; ``bandwidth(peer)`` is the newest measurement)."""

    def __init__(self, index: int, call: Call | None, protocol: StageProtocol, checker: FrameChecker, counters: Counters,
                 policy: LinkPolicy | None = None, bandwidth: Callable[[str], float | None] = lambda p: None,
                 timeout_s: float = 120.0):
        self.index = index
        self.call = call
        self.protocol = protocol
        self.checker = checker
        self.counters = counters
        self.policy = policy
        self.bandwidth = bandwidth
        self.timeout_s = timeout_s
        self.channel_scale = ChannelScale()
        self.next_stage: tuple[float, bool] | None = None   # (FLOPs of a micro-batch's pass there, is it the last)
        self.outstanding: dict[str, int] = {}               # calls in flight to each next-stage peer

    def _frame(self, fwd: Forward, ratio: float) -> tuple[bytes, dict]:
        """A forward (or evaluate) frame at ``ratio``, in the packets the policy picks for it."""
        if self.channel_scale is not None:
            self.channel_scale.bits = self.policy.bits_for(ratio) if self.policy else None
        return fwd.to_frame(ratio, self.channel_scale, self.policy is not None and self.policy.half)

    async def forward(self, fwd: Forward) -> Message:
        """Send a micro-batch's activations to a next-stage replica, falling back to the others; the
        checked ``grads`` reply."""
        raw = fwd.raw_bytes()
        expect = Grads.expected(fwd.inputs)
        last_error = None
        for peer in self.protocol.route(fwd.mb, time.monotonic()):
            ratio = self.policy.ratio(fwd.step, self.bandwidth(peer), raw) if self.policy else 1.0
            started = time.perf_counter()
            frame, masks = self._frame(fwd, ratio)
            encode_s = time.perf_counter() - started
            self.counters.ratios[peer] = ratio
            queued = self.outstanding[peer] = self.outstanding.get(peer, 0) + 1
            sent_at = time.perf_counter()
            try:
                reply_frame = await self.call(peer, frame)
            except PeerUnavailable as e:
                self.protocol.unreachable(peer, time.monotonic())
                last_error = e
                self.counters.retries += 1
                continue
            finally:
                self.outstanding[peer] -= 1
            started = time.perf_counter()
            try:
                reply = self.checker.reply(reply_frame, peer, GRADS, expect, Grads.masks_for(masks))
            except RemoteProtocolError as e:   # a broken or hostile replica: the micro-batch goes to the next one
                last_error = e
                if not isinstance(e, Poisoned):
                    self.protocol.unreachable(peer, time.monotonic())
                self.counters.retries += 1
                continue
            check_reply(reply, f"stage {self.index + 1}")
            self._observe_delivered(peer, started - sent_at, queued, reply, len(frame) + len(reply_frame))
            if ratio > 1 and self.policy is not None:
                self.policy.observe_codec(raw, encode_s + time.perf_counter() - started)
            self._count(peer, fwd, frame, reply, raw)
            return reply
        raise PeerUnavailable(f"no replica of stage {self.index + 1} reachable ({last_error})")

    async def evaluate(self, ev: Evaluate) -> Evaluated:
        """Send a validation micro-batch on (at the link's current ratio) to a next-stage replica,
        falling back to the others; the last stage's ``Evaluated``. Counted as bytes sent, not as
        activations of training (nor as compute the peer delivered)."""
        last_error = None
        for peer in self.protocol.route(ev.mb, time.monotonic()):
            ratio = self.policy.ratio(ev.step, self.bandwidth(peer), ev.raw_bytes()) if self.policy else 1.0
            frame, _ = self._frame(ev, ratio)
            try:
                reply = self.checker.reply(await self.call(peer, frame), peer, EVALUATED, {})
            except PeerUnavailable as e:
                self.protocol.unreachable(peer, time.monotonic())
                last_error = e
                continue
            except RemoteProtocolError as e:
                last_error = e
                if not isinstance(e, Poisoned):
                    self.protocol.unreachable(peer, time.monotonic())
                continue
            self.counters.sent(peer, len(frame) + PREFIX_BYTES)
            return Evaluated.from_message(check_reply(reply, f"validation at stage {self.index + 1}"))
        raise PeerUnavailable(f"no replica of stage {self.index + 1} reachable for validation ({last_error})")

    def _count(self, peer: str, fwd: Forward, frame: bytes, reply: Message, raw: int) -> None:
        from swarm.wire import sizes
        sent = sizes(frame)
        floats = [k for k, t in fwd.tensors().items() if t.is_floating_point()]
        grads = list(reply.tensors)   # a grads reply carries the gradients only
        self.counters.sent(peer, len(frame) + PREFIX_BYTES)
        self.counters.act_raw += raw + sum(reply.tensors[k].numel() * reply.tensors[k].element_size() for k in grads)
        self.counters.act_wire += sum(sent[k] for k in floats) + sum(reply.sizes[k] for k in grads)

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

    async def pass_on(self, step: int, skip: bool = False) -> None:
        """Send ``step`` to every next-stage replica (``skip``: it overflowed here or upstream), again after
        a transient failure, until the time-out."""
        frame = Step(step, skip).to_frame()

        async def one(peer: str) -> None:
            async def attempt() -> None:
                reply = self.checker.reply(await self.call(peer, frame), peer, STEPPED, {})
                check_reply(reply, f"step at stage {self.index + 1}")
            await with_backoff(attempt, time.monotonic() + self.timeout_s)
        await asyncio.gather(*(one(p) for p in self.protocol.hood.downstream))
