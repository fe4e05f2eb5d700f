"""Remote autodiff between pipeline neighbours over libp2p streams (protocol ``swarm.stage.v1``).

A request and its reply are each one length-prefixed wire frame (``swarm.wire``). ``forward`` carries
a micro-batch's activations (and, for the last stage, its targets) to the next stage; the reply is the
gradient w.r.t. those activations, computed after the rest of the pipeline has run forward and
backward on it. So one ``forward`` call from the first stage runs the whole pipeline for one
micro-batch and brings its gradient back: autodiff across machines with no shared Python object.
The first stage keeps several micro-batches in flight, which pipelines the stages. ``step`` applies
the accumulated gradients, stage after stage. Every request names its step id and micro-batch id;
a stale step, a duplicate micro-batch or a malformed frame gets an ``error`` reply and changes nothing.
"""
from __future__ import annotations

import asyncio
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from swarm.errors import SwarmError
from swarm.runtime.worker import StageWorker
from swarm.wire import Limits, pack, unpack

PROTOCOL = "swarm.stage.v1"
_LEN = struct.Struct(">Q")


async def read_frame(reader: asyncio.StreamReader, limit: int, timeout_s: float) -> bytes:
    (n,) = _LEN.unpack(await asyncio.wait_for(reader.readexactly(_LEN.size), timeout_s))
    if n > limit:
        raise SwarmError(f"frame of {n} bytes announced (limit {limit})")
    return await asyncio.wait_for(reader.readexactly(n), timeout_s)


def write_frame(writer: asyncio.StreamWriter, frame: bytes) -> None:
    writer.write(_LEN.pack(len(frame)) + frame)


class StageServer:
    """Serves one stage: ``forward`` (returns input gradients), ``step``. ``next_call`` sends a frame
    to the next stage and returns its reply (None for the last stage)."""

    def __init__(self, worker: StageWorker, next_call: Callable | None, limits: Limits = Limits(),
                 timeout_s: float = 120.0, admit: Callable[[str], bool] | None = None):
        self.worker, self.next_call, self.limits, self.timeout_s, self.admit = worker, next_call, limits, timeout_s, admit
        self.compute = ThreadPoolExecutor(1, thread_name_prefix="stage")   # one pass at a time, in order of arrival
        self.errors = 0

    async def handle(self, stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.admit is not None and not self.admit(stream_info.peer_id.to_base58()):
                return
            frame = await read_frame(reader, self.limits.max_frame_bytes, self.timeout_s)
            reply = await self.answer(frame)
            write_frame(writer, reply)
            await writer.drain()
            # closing first can cut the reply's tail in the daemons: wait until the caller has read it
            # all and hung up (it closes right after reading)
            await asyncio.wait_for(reader.read(1), self.timeout_s)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, SwarmError, struct.error):
            self.errors += 1
        finally:
            writer.close()

    async def answer(self, frame: bytes) -> bytes:
        """The reply frame to a request frame: never raises."""
        try:
            msg = unpack(frame, self.limits)
            step, mb = msg.meta.get("step"), msg.meta.get("mb")
            if not isinstance(step, int) or step != self.worker.step_id:
                raise SwarmError(f"step {step!r} is not the current step {self.worker.step_id}")
            if msg.kind == "forward":
                return await self._forward(msg, mb)
            if msg.kind == "step":
                return await self._step(step)
            raise SwarmError(f"unknown request kind '{msg.kind}'")
        except SwarmError as e:
            self.errors += 1
            return pack("error", {"message": str(e)[:500]}, {})[0]
        except Exception as e:  # a pass that fails on odd input must not take the stage down
            self.errors += 1
            return pack("error", {"message": f"stage failed: {type(e).__name__}: {str(e)[:300]}"}, {})[0]

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.compute, fn, *args)

    async def _forward(self, msg, mb) -> bytes:
        if not isinstance(mb, int) or mb < 0:
            raise SwarmError(f"bad micro-batch id {mb!r}")
        names = sorted(k for k in msg.tensors if k.startswith("x"))
        inputs = [msg.tensors[f"x{i}"] for i in range(len(names))]
        scale = float(msg.meta.get("scale", 1.0))
        targets = msg.tensors.get("targets")
        step = self.worker.step_id
        outputs = await self._run(self.worker.forward, mb, inputs, targets, scale)
        if self.next_call is None:
            loss = outputs[0].item()
            grads = await self._run(self.worker.backward, mb, None)
        else:
            tensors = {f"x{i}": o for i, o in enumerate(outputs)}
            if targets is not None:
                tensors["targets"] = targets
            reply = unpack(await self.next_call(pack("forward", {"step": step, "mb": mb, "scale": scale}, tensors)[0]),
                           self.limits)
            if reply.kind == "error":
                await self._run(self.worker.drop, mb)
                raise SwarmError(f"next stage: {reply.meta.get('message')}")
            loss = reply.meta.get("loss")
            out_grads = [reply.tensors.get(f"g{i}") for i in range(len(outputs))]
            grads = await self._run(self.worker.backward, mb, out_grads)
        return pack("grads", {"step": step, "mb": mb, "loss": loss},
                    {f"g{i}": g for i, g in enumerate(grads) if g is not None})[0]

    async def _step(self, step: int) -> bytes:
        await self._run(self.worker.step)
        if self.next_call is not None:
            reply = unpack(await self.next_call(pack("step", {"step": step}, {})[0]), self.limits)
            if reply.kind == "error":
                raise SwarmError(f"next stage: {reply.meta.get('message')}")
        return pack("stepped", {"step": step}, {})[0]


def stream_caller(p2p, peer, limits: Limits = Limits(), timeout_s: float = 120.0):
    """``call(frame) -> reply frame`` over a new libp2p stream to ``peer`` per request."""
    async def call(frame: bytes) -> bytes:
        _, reader, writer = await p2p.call_binary_stream_handler(peer, PROTOCOL)
        try:
            write_frame(writer, frame)
            await writer.drain()
            return await read_frame(reader, limits.max_frame_bytes, timeout_s)
        finally:
            writer.close()
    return call


async def train_step(first: StageServer, inputs: torch.Tensor, targets: torch.Tensor, micro_batches: int,
                     in_flight: int = 4) -> float:
    """One optimizer step driven by the first stage: micro-batches go down the pipeline concurrently
    (at most ``in_flight``), their gradients come back, then every stage steps. Returns the mean loss."""
    step = first.worker.step_id
    gate = asyncio.Semaphore(in_flight)

    async def one(mb: int, x: torch.Tensor, y: torch.Tensor) -> float:
        async with gate:
            reply = unpack(await first.answer(pack("forward", {"step": step, "mb": mb, "scale": 1 / micro_batches},
                                                   {"x0": x, "targets": y})[0]), first.limits)
            if reply.kind == "error":
                raise SwarmError(reply.meta.get("message", "pipeline error"))
            return float(reply.meta["loss"])

    losses = await asyncio.gather(*(one(m, x, y) for m, (x, y) in enumerate(zip(inputs.chunk(micro_batches),
                                                                                 targets.chunk(micro_batches)))))
    reply = unpack(await first.answer(pack("step", {"step": step}, {})[0]), first.limits)
    if reply.kind == "error":
        raise SwarmError(reply.meta.get("message", "step failed"))
    return sum(losses) / len(losses)
