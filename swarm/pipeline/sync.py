"""How a stage server's replicas meet at the end of a step (``ReplicaSync``): the butterfly all-reduce
of ``StageProtocol``'s reduce rounds, over the server's link, carrying either the gradients of every
step (synchronous replicas) or, every ``H`` steps, the encoded pseudo-gradients of an outer step
(``swarm.runtime.outer``, docs/sync.md), waited for or overlapped with the next inner steps.
``ReplicaSync`` owns this replica's outer state (anchor, momentum, residuals) and the exchange in
flight; a server with replicas calls ``before_step`` and ``after_step`` around its optimizer step, and
``reduce`` for a peer's part (a stage without replicas never runs this module).

Replicas must agree on every outer step they apply, or their anchors part for good. An overlapped
sync's part whose reply is lost (the owner summed it, the answer did not arrive) is asked for again,
up to ``PART_TRIES`` times within the exchange's deadline, and the owner keeps each finished sum until
its next sync's exchange ends, so the asker gets the sum the others applied instead of dropping it.
A part whose owner is gone for good (it answered some replicas, then died) is asked of the other
replicas (``Gather``): each keeps every part's sum as the owner sent it until its next sync's exchange
ends and answers from that, so the part lands on all of them if it reached any. An answer waits only
for the replica's own call to the owner, never for its own asking, so two replicas asking each other
cannot deadlock: where no replica got the part, all drop the outer step alike.
"""
from __future__ import annotations

import asyncio

import torch

from swarm.errors import PeerUnavailable, RemoteProtocolError, SwarmError
from swarm.messages import PART, REDUCED, Gather, Reduce, Reduced, check_reply, flag
from swarm.net.streams import PREFIX_BYTES, describe
from swarm.runtime.outer import OuterCodec, OuterSettings, OuterState
from swarm.wire import Message

PART_TRIES = 3    # calls for one part of an overlapped sync (a lost reply is asked for again)


def _settle(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


class ReplicaSync:
    """The replicas' end of a step, for ``server`` (a ``StageServer``: its protocol, worker, compute
    thread, link, counters and step waits)."""

    def __init__(self, server, state: OuterState | None = None):
        self.server = server
        self.state = state                                    # the outer state (sync_every > 1), once anchored
        self.last_step: int | None = None                     # max_steps - 1: the exchange in flight lands there
        self.encoders: dict[int, tuple] = {}                  # step -> (codec, outer state or None) of a sync
        self.exchange: tuple[int, asyncio.Task] | None = None   # an overlapped sync's exchange: (step, task)
        self.got: dict[int, dict[int, asyncio.Future]] = {}   # step -> part -> its owner's sum as it came here (None: not)

    @property
    def replicas(self) -> tuple[str, ...]:
        return self.server.peers.replicas

    def _warn(self, message: str) -> None:
        self.server.warn.log.warning(f"stage {self.server.worker.stage.io.index}: {message}")

    def outer_state(self, settings: OuterSettings) -> OuterState:
        """This replica's outer state (anchored at the current parameters when there is none yet)."""
        worker = self.server.worker
        if self.state is None:
            self.state = OuterState(settings, worker.flat_params())
        elif self.state.settings != settings:   # resumed from op states: their anchor and momentum, these settings
            self.state = OuterState(settings, self.state.anchor, self.state.momentum)
        return self.state

    async def before_step(self, step: int) -> OuterCodec | None:
        """Before the optimizer step of ``step`` (a stage with replicas): sum the gradients with the
        replicas (synchronous), or scale this replica's own for an inner step. Returns the codec of the
        sync that follows the step (``after_step``), or None."""
        worker, protocol, work = self.server.worker, self.server.protocol, self.server.compute.work
        codec = protocol.exchange(step) if protocol.flat_numel else None
        if protocol.outer is None:   # synchronous replicas: sum the gradients, then step
            if codec is not None:
                await work(True, worker.unscale)   # the replicas sum true gradients, whatever scales they carried
                flat = await work(True, worker.flat_grads)
                if worker.overflowed:   # every replica skips the step: the sum only has to stay finite
                    flat = torch.zeros_like(flat)
                elif not bool(torch.isfinite(flat).all()):   # the replicas' sum must stay finite (and identical)
                    self._warn(f"own gradient of step {step} is not finite; this replica contributes zeros to the all-reduce")
                    flat = torch.zeros_like(flat)
                await work(True, worker.set_flat_grads, await self.all_reduce(step, codec, flat, skip=worker.overflowed))
            return None
        self.outer_state(protocol.outer)   # anchored before the first inner step (where the replicas agree)
        await work(True, worker.scale_grads, len(self.replicas))   # an inner step on its own micro-batches
        return codec

    async def flush(self, step: int) -> None:
        """At the last step (``last_step``): the overlapped exchange in flight lands now (bounded by the
        server's timeout) instead of one sync late, so the saved and exported anchor holds every synced
        period; when ``step`` is that sync's own, every replica ends on the new anchor."""
        if step != self.last_step or self.exchange is None or self.state is None:
            return
        synced = self.exchange[0]
        average = await self._exchanged("it is not in the final anchor")
        self.exchange = None
        if average is None:
            return
        anchor = self.state.apply(average)
        if synced == step:
            await self.server.compute.work(True, self.server.worker.set_flat_params, anchor)

    async def _exchanged(self, lost: str) -> torch.Tensor | None:
        """The average of the exchange in flight (awaited, bounded by the server's timeout), or None
        when there is none or it failed (warned: what is ``lost``)."""
        if self.exchange is None:
            return None
        before, task = self.exchange
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.server.timeout_s)
        except (asyncio.TimeoutError, SwarmError) as e:
            why = "timed out" if isinstance(e, asyncio.TimeoutError) else describe(e)
            self._warn(f"the replicas' exchange of step {before} did not complete ({why}); {lost}")
            return None

    async def after_step(self, step: int, codec: OuterCodec) -> None:
        """The sync after the inner step of ``step`` (the step id advances after it)."""
        outer = self.server.protocol.outer
        await (self._late_sync if outer.overlap else self._outer_step)(step, outer, codec)

    async def _delta(self, step: int, state: OuterState) -> torch.Tensor:
        delta = state.pseudo_gradient(await self.server.compute.work(True, self.server.worker.flat_params))
        if not bool(torch.isfinite(delta).all()):
            self._warn(f"pseudo-gradient of step {step} is not finite; this replica contributes zeros to the outer step")
            delta = torch.zeros_like(delta)
        return delta

    async def _outer_step(self, step: int, outer: OuterSettings, codec: OuterCodec) -> None:
        """A sync after the inner step of ``step``: average the pseudo-gradients, apply the outer
        optimizer to the anchor, continue from it (identical on every replica)."""
        state = self.outer_state(outer)
        total = await self.all_reduce(step, codec, await self._delta(step, state), state)
        await self.server.compute.work(True, self.server.worker.set_flat_params, state.apply(total / len(self.replicas)))
        self.server.counters.syncs += 1

    async def _late_sync(self, step: int, outer: OuterSettings, codec: OuterCodec) -> None:
        """An overlapped sync after the inner step of ``step``: the previous sync's exchange (done by now,
        or awaited, bounded) steps the anchor; this sync's exchange starts and runs while the next
        inner steps do (``OuterState.apply_late``)."""
        state = self.outer_state(outer)
        delta = await self._delta(step, state)
        previous = await self._exchanged("its outer step is dropped")
        await self.server.compute.work(True, self.server.worker.set_flat_params, state.apply_late(previous, delta))
        self.exchange = (step, asyncio.ensure_future(self._exchange_late(step, codec, delta, state)))
        self.server.counters.syncs += 1

    async def _exchange_late(self, step: int, codec: OuterCodec, delta: torch.Tensor, state: OuterState) -> torch.Tensor:
        """The replicas' average of ``delta`` (an overlapped sync of ``step``); its round closes after."""
        try:
            return await self.all_reduce(step, codec, delta, state) / len(self.replicas)
        finally:
            self.forget(step, True)

    def forget(self, step: int, sync_done: bool = False) -> None:
        """``step``'s sums go (an overlapped sync's only once its exchange ended, ``sync_done``, with its
        round, and then those of earlier syncs: its own stays for late askers until the next sync's
        exchange ends; the protocol drops every other round when the step is finished)."""
        sums = self.server.steps.sums
        if sync_done:   # this sync's sum stays for a replica asking again; the earlier ones go
            self.server.protocol.close_round(step)
            for s in [s for s in sums if s < step]:
                sums.pop(s)
            for s in [s for s in self.got if s < step]:
                self.got.pop(s)
            self.encoders.pop(step, None)
        elif not self.server.protocol.overlapped:
            sums.pop(step, None)
            self.got.pop(step, None)
            self.encoders.pop(step, None)

    async def all_reduce(self, step: int, codec: OuterCodec, flat: torch.Tensor, state: OuterState | None = None,
                         skip: bool = False):
        """The sum of ``flat`` over the replicas (butterfly; parts encoded by ``codec``, with the error
        feedback of ``state`` when it has one), identical on every replica. ``skip``: this replica's step
        overflowed; where any replica's did, the worker skips the step (``StageWorker.skip``)."""
        bounds, mine = self.server.protocol.bounds(), self.server.protocol.own_part
        if state is None:
            payloads = [{PART: flat[lo:hi].clone()} for lo, hi in bounds]
            own = payloads[mine][PART]
        else:   # encoding a large vector takes a while: off the event loop (torch releases the GIL)
            encoded = await asyncio.to_thread(lambda: [state.own.encode(flat[lo:hi], lo, hi) for lo, hi in bounds])
            payloads, own = [payload for payload, _ in encoded], encoded[mine][1]
        self.encoders[step] = (codec, state)
        self.contribute(step, self.server.peers.me, own, skip)
        sums = await asyncio.gather(*(self._part(step, j, payloads[j], codec, hi - lo, skip) for j, (lo, hi) in enumerate(bounds)))
        if any(skipped for _, skipped in sums):
            self.server.worker.skip("gradient overflow at a replica")
        return torch.cat([total for total, _ in sums])

    async def _part(self, step: int, j: int, payload: dict[str, torch.Tensor], codec: OuterCodec, numel: int,
                    skip: bool = False) -> tuple[torch.Tensor, bool]:
        """The sum over all replicas of part ``j`` (this replica's own: as the others' contributions
        arrive; another's: from its owner, decoded), and whether any replica's step overflowed."""
        server = self.server
        if j == server.protocol.own_part:
            total, _, skipped = await asyncio.wait_for(asyncio.shield(server.steps.sum_of(step)), server.timeout_s)
            return total, skipped
        got = self._got(step, j)
        try:
            tensors, skipped = await self._from_owner(step, j, payload, codec, numel, skip)
        except PeerUnavailable as e:
            _settle(got, None)
            if not server.protocol.overlapped or len(self.replicas) < 3:
                raise
            tensors, skipped = await self._gather(step, j, codec, numel, e)
        except BaseException:
            _settle(got, None)
            raise
        _settle(got, tensors)
        return codec.decode(tensors, numel), skipped

    async def _from_owner(self, step: int, j: int, payload: dict[str, torch.Tensor], codec: OuterCodec,
                          numel: int, skip: bool = False) -> tuple[dict[str, torch.Tensor], bool]:
        """Part ``j``'s encoded sum from its owner, for this replica's contribution ``payload`` (asked
        again, ``PART_TRIES``, in an overlapped sync), and the owner's overflow verdict."""
        server, owner = self.server, self.replicas[j]
        frame = Reduce(step, j, payload, skip).to_frame()
        tries = PART_TRIES if server.protocol.overlapped else 1
        for attempt in range(1, tries + 1):
            server.counters.sent(owner, len(frame) + PREFIX_BYTES, reduce=True)
            try:
                answer = await server.link.call(owner, frame)
                break
            except PeerUnavailable as e:
                if attempt == tries:
                    raise
                self._warn(f"all-reduce of step {step}: replica {owner[-8:]} did not answer ({describe(e)}); "
                           f"asking again ({attempt + 1} of {tries})")
        return self._summed(answer, owner, codec, numel)

    def _got(self, step: int, j: int) -> asyncio.Future:
        return self.got.setdefault(step, {}).setdefault(j, asyncio.get_running_loop().create_future())

    def _summed(self, answer: bytes, peer: str, codec: OuterCodec, numel: int) -> tuple[dict[str, torch.Tensor], bool]:
        """The tensors of ``peer``'s reply with a part's sum (checked: kind, shapes, an error reply), and
        its ``skip``."""
        try:
            reply = check_reply(self.server.checker.reply(answer, peer, REDUCED, codec.shapes(numel)), "all-reduce")
            return reply.tensors, flag(reply.meta, "skip")
        except RemoteProtocolError as e:
            raise RemoteProtocolError(f"all-reduce: replica {peer[-8:]} sent a malformed sum ({e})") from None

    async def _gather(self, step: int, j: int, codec: OuterCodec, numel: int,
                      why: SwarmError) -> tuple[dict[str, torch.Tensor], bool]:
        """Part ``j``'s sum from another replica, its owner being gone (``why``)."""
        owner, me = self.replicas[j], self.server.peers.me
        others = [r for r in self.replicas if r not in (owner, me)]
        self._warn(f"all-reduce of step {step}: replica {owner[-8:]} did not answer ({describe(why)}); "
                   f"asking {len(others)} other replicas for its part's sum")
        frame = Gather(step, j).to_frame()

        async def ask(peer: str) -> tuple[dict[str, torch.Tensor], bool]:
            self.server.counters.sent(peer, len(frame) + PREFIX_BYTES, reduce=True)
            return self._summed(await self.server.link.call(peer, frame), peer, codec, numel)
        answers = await asyncio.gather(*(ask(r) for r in others), return_exceptions=True)
        for answer in answers:
            if isinstance(answer, tuple):
                return answer
            if not isinstance(answer, SwarmError):
                raise answer
        raise PeerUnavailable(f"replica {owner[-8:]} did not answer ({describe(why)}) and no other replica got its part: "
                              + "; ".join(describe(a) for a in answers)[:300])

    async def gather(self, msg: Message) -> bytes:
        """Another replica asks for part ``part``'s sum as its owner sent it here (``Gather``): answered
        once this replica's own call to the owner ended (bounded), or refused when it got none."""
        step, part = msg.meta["step"], msg.meta["part"]
        wait = self.server.steps.sum_of(step) if part == self.server.protocol.own_part else self._got(step, part)
        done = await asyncio.wait_for(asyncio.shield(wait), self.server.timeout_s)
        if done is None:
            raise PeerUnavailable(f"this replica got no sum of part {part} of step {step} from its owner either")
        return Reduced(step, part, done[1] if part == self.server.protocol.own_part else done).to_frame()

    def contribute(self, step: int, peer: str, part: torch.Tensor, skip: bool = False) -> None:
        """``peer``'s contribution to this replica's part (``skip``: its step overflowed); once all are in,
        the part's sum future holds (sum, payload sent back, any replica overflowed)."""
        protocol = self.server.protocol
        total = protocol.contribute(step, peer, part, skip)
        future = self.server.steps.sum_of(step)
        if total is not None and not future.done():
            codec, state = self.encoders.get(step, (None, None))
            skipped = protocol.rounds[step].skip
            if state is None:   # the sum as it is (raw gradients)
                future.set_result((total, {PART: total}, skipped))
            else:               # the sum encoded once, with this owner's error feedback: what everyone decodes
                lo, hi = protocol.bounds()[protocol.own_part]
                payload, sent = state.owned.encode(total, lo, hi)
                future.set_result((sent, payload, skipped))

    async def reduce(self, msg: Message, sender: str) -> bytes:
        """A replica's part for this replica to sum: the reply is the sum, once every replica's is in."""
        step, part = msg.meta["step"], msg.meta["part"]
        lo, hi = self.server.protocol.bounds()[part]
        done = self.server.steps.sums.get(step)
        if done is None or not done.done():   # else: asked again for a sum this owner has finished
            self.contribute(step, sender, self.server.protocol.exchange(step).decode(msg.tensors, hi - lo),
                            flag(msg.meta, "skip"))
        _, payload, skipped = await asyncio.wait_for(asyncio.shield(self.server.steps.sum_of(step)), self.server.timeout_s)
        return Reduced(step, part, payload, skipped).to_frame()

    def close(self) -> None:
        if self.exchange is not None:
            self.exchange[1].cancel()
