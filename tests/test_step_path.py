"""The path of one step on the first stage, measured: every swarm module whose functions run on the
first stage's threads (its event loop and its compute thread), from reading the batch to the
optimizer step, with the next stage answered by a stub (its code is not the first stage's).

docs/architecture.md lists the modules. The step's logic lives in at most six of them; the rest are
leaves that hold none of it: the codecs and streams the link calls through, the compute thread and the
counters (named here, so that a new module on the path shows up as a failure to be looked at), and the
model's own code (``swarm.models.*``: what is trained).
"""
from __future__ import annotations

import asyncio
import sys
import threading

import torch

from swarm.dag.stages import input_specs, model_io
from swarm.data import training_data
from swarm.errors import PeerUnavailable
from swarm.messages import Grads, Stepped
from swarm.pipeline import Neighbours, StageServer, train_step
from swarm.runtime.worker import StageWorker
from swarm.wire import unpack
from tests.test_hostile_frames import gpt_stages

STEP_LOGIC = {"swarm.data", "swarm.pipeline.driver", "swarm.pipeline.service", "swarm.pipeline.protocol",
              "swarm.pipeline.link", "swarm.runtime.worker"}
LEAVES = {"swarm.messages", "swarm.wire", "swarm.pipeline.frames", "swarm.net.streams", "swarm.refusals",
          "swarm.runtime.runner", "swarm.runtime.counters"}


def stub_next_stage(outputs_shape: list[int]):
    """``call`` of a next stage that answers every forward with zero gradients and every step with
    ``stepped``; its frames are built before the step is measured."""
    grads = {mb: Grads(0, mb, 1.0, [torch.zeros(outputs_shape)]).to_frame() for mb in range(2)}
    stepped = Stepped(0).to_frame()

    async def call(peer: str, frame: bytes) -> bytes:
        if frame[8:].find(b"forward") >= 0:
            return grads[unpack(frame).meta["mb"]]
        if frame[8:].find(b"step") >= 0:
            return stepped
        raise PeerUnavailable("stub: unexpected request")
    return call


def test_one_step_on_the_first_stage_runs_through_six_modules_of_step_logic():
    traced, (first, second) = gpt_stages(2, batch=2)
    (shape, _, _), = input_specs(traced.dag, second.io)
    corpus, _ = training_data("generated", *model_io(traced))
    seen: set[str] = set()
    lock = threading.Lock()

    def profile(frame, event, arg):
        if event == "call":
            name = frame.f_globals.get("__name__", "")
            if name.startswith("swarm"):
                with lock:
                    seen.add(name)

    async def run() -> None:
        threading.setprofile(profile)   # the compute thread starts inside StageServer: it is profiled too
        try:
            server = StageServer(StageWorker(first, max_batch=2), Neighbours("a", ("a",), (), ("b",), 2),
                                 stub_next_stage([2, *shape[1:]]))
        finally:
            threading.setprofile(None)
        sys.setprofile(profile)
        try:
            x, y = corpus.batch(0, 4, 0, 1)
            await train_step(server, x, y, micro_batches=2)
        finally:
            sys.setprofile(None)
            server.close()
        assert server.worker.step_id == 1   # the optimizer stepped

    asyncio.run(asyncio.wait_for(run(), 60))
    logic = {m for m in seen - LEAVES if not m.startswith("swarm.models.")}   # (the model's own code: what is trained)
    assert logic == STEP_LOGIC, f"step logic now runs in {sorted(logic)}"
    assert len(logic) <= 6
