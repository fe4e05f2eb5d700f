"""This node's part of a committed plan: it materialises its stage, serves it over libp2p
(``swarm.pipeline``) and, on a first-stage node, drives training steps on its shard of the data.

A session lives on the node's event loop; ``start``/``stop``/``drain`` are the synchronous facade the
node's heartbeat uses. A new plan means a new session: the ops a node keeps keep their trained
values, and moved ops are handed over by op (``swarm.churn``).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import torch

from swarm.compression.adatopk import max_expansion
from swarm.compression.policy import LinkPolicy
from swarm.config import NodeConfig
from swarm.dag.graph import Partition
from swarm.dag.stages import extract_stages, frame_limit, input_specs, model_io
from swarm.dag.trace import TracedModel
from swarm.data import ByteCorpus, training_data, validation_data
from swarm.errors import SwarmError
from swarm.events import Events, append_row
from swarm.export import write_spec
from swarm.loop import NodeLoop
from swarm.pipeline import PROTOCOL, Neighbours, StageServer, StepHooks, stage_caller
from swarm.pipeline.driver import Drive, Validation
from swarm.refusals import Bans, CallableLogger
from swarm.runtime.memory import MemoryGauge
from swarm.runtime.metrics import validation_row
from swarm.runtime.outer import outer_tensors, resume_outer, tensor_digest
from swarm.runtime.state import OpState, capture, op_tensors, write_checkpoint
from swarm.runtime.worker import StageWorker
from swarm.scheduler import Plan
from swarm.wire import Limits

logger = logging.getLogger(__name__)
__all__ = ["TrainingSession", "frame_limit", "model_io"]


def _limits(traced: TracedModel, cfg: NodeConfig, worker: StageWorker) -> Limits:
    """What a legitimate peer sends this stage at most: raw frames below the frame limit, and
    AdaTopK packets that decode to no more than the hardest configured ratio allows."""
    limit = frame_limit(traced, cfg.micro_batch_size, sum(p.numel() for p in worker.params))
    comp = cfg.compression
    hardest = max(comp.ratio if comp.mode == "fixed" else comp.cap(), 1.0)
    return Limits(max_frame_bytes=limit, max_decoded_bytes=limit, max_expand=max_expansion(hardest))


def _neighbours(plan: Plan, me: str, index: int) -> Neighbours:
    last = index == len(plan.stages) - 1
    return Neighbours(me, tuple(sorted(plan.stages[index].peers)),
                      tuple(sorted(plan.stages[index - 1].peers)) if index else (),
                      () if last else tuple(sorted(plan.stages[index + 1].peers)), plan.micro_batches)


def checkpoint(directory: str, states: dict[str, OpState], stage: int, step: int, keep: int, model: tuple[str, str]) -> Path:
    """``write_checkpoint``, with the model's spec (``model.json``) beside it for ``node.py export``."""
    path = write_checkpoint(directory, states, stage, step, keep)
    write_spec(directory, *model)
    return path


class _Checkpoints:
    """Writes the stage's checkpoint every ``checkpoint_every_steps`` (first replica only), off the
    event loop; one warning while writes keep failing."""

    def __init__(self, log, model: tuple[str, str]) -> None:
        self.log, self.model = log, model   # (model, granularity): the spec written beside the state
        self.failing = False

    def write(self, loop: asyncio.AbstractEventLoop, directory: str, states: dict[str, OpState], stage: int,
              step: int, keep: int) -> None:
        written = loop.run_in_executor(None, checkpoint, directory, states, stage, step, keep, self.model)

        def report(f) -> None:
            if f.cancelled():
                return
            if f.exception() is not None and not self.failing:
                self.log.warning(f"checkpoint not written: {f.exception()} (not repeated until one is written)")
            elif f.exception() is None and self.failing:
                self.log.info(f"checkpoint of step {step} written again")
            self.failing = f.exception() is not None
        written.add_done_callback(report)


class TrainingSession:
    """Runs ``plan``'s stage for peer ``me`` (a node outside the plan's stages gets no session).
    ``before_apply(step)`` is awaited before every optimizer step (the backup gate); ``own``: the ops
    whose ``states`` are this node's own (None: all; the others came from another peer)."""

    def __init__(self, plan: Plan, me: str, traced: TracedModel, cfg: NodeConfig, p2p, loop: NodeLoop | asyncio.AbstractEventLoop,
                 bandwidth: Callable[[str], float | None] = lambda p: None, start_step: int = 0,
                 admit: Callable[[str], bool] | None = None, log: Callable[[str], None] | None = None,
                 device: str = "cpu", states: dict[str, OpState] | None = None, bans: Bans | None = None,
                 before_apply: Callable[[int], Awaitable[None]] | None = None, own: set[str] | None = None):
        self.index = plan.role(me)["stage"]
        if self.index is None:
            raise SwarmError("this node has no stage in the plan")
        self.plan, self.cfg, self.p2p, self.loop = plan, cfg, p2p, NodeLoop.wrap(loop)
        self.log = CallableLogger(log) if log is not None else logger
        training, last = cfg.training, self.index == len(plan.stages) - 1
        stage = extract_stages(traced, Partition(tuple(s.first_op for s in plan.stages), len(traced.dag.ops)))[self.index]
        io = model_io(traced)
        self.data, loss_fn = training_data(training.data, *io, loss=training.loss)
        self.validation = validation_data(training.data, *io, batches=-(-training.eval_samples // cfg.micro_batch_size),
                                          batch_size=cfg.micro_batch_size) if self.index == 0 and training.eval_every_steps else None
        self.worker = StageWorker(stage, cfg.optimizer, training.lr, max_in_flight=4 * plan.micro_batches,
                                  loss_fn=loss_fn if last else None, input_specs=input_specs(traced.dag, stage.io),
                                  max_batch=cfg.micro_batch_size, warmup_steps=training.lr_warmup_steps, device=device,
                                  precision=cfg.precision, recompute=plan.stages[self.index].recompute)
        self.gauge.reset()   # the peak counts from the stage's start
        self.owned = op_tensors(traced.dag, traced.gm)
        mine = {op: st for op, st in (states or {}).items() if op in self.ops}
        self.completed = self.worker.resume(mine, start_step)
        outer_state = resume_outer(mine, stage.module, self.worker.params, own)
        limits = _limits(traced, cfg, self.worker)
        hood = _neighbours(plan, me, self.index)
        policy = None if last else LinkPolicy.from_config(cfg.compression, plan.links[self.index], plan.bottleneck_s,
                                                          min(len(hood.replicas), len(hood.downstream)),
                                                          half=self.worker.compute.half)
        self.server = StageServer(self.worker, hood, stage_caller(p2p, limits, training.timeout_s), limits, policy,
                                  bandwidth, training.timeout_s, training.schedule, admit=admit, log=log, bans=bans,
                                  hooks=StepHooks(self._stepped, before_apply), events=Events(training.metrics_path, me),
                                  outer=training.outer(plan.sync_every), outer_state=outer_state)
        self.server.sync.last_step = training.max_steps - 1 if training.max_steps else None
        if not last:   # what the next stage's holders deliver is measured on every call (planning checks claims with it)
            nxt, dag = plan.stages[self.index + 1], traced.dag
            flops = sum(op.flops for op in dag.ops[nxt.first_op:nxt.stop_op]) * cfg.micro_batch_size / dag.batch_size
            self.server.link.next_stage = (float(flops), self.index + 1 == len(plan.stages) - 1)
        self.shard = (hood.replicas.index(me), len(hood.replicas)) if self.index == 0 else (0, 1)   # (rank, world)
        self.drive: Drive | None = None     # the first stage's loop (says why training failed, if it did)
        self.checkpoints = _Checkpoints(self.log, (cfg.model, cfg.granularity))

    @property
    def ops(self) -> list[str]:
        """This stage's ops that hold tensors (what is captured, handed over, backed up)."""
        return [op for op in self.worker.stage.io.ops if op in self.owned]

    @property
    def failed(self) -> str | None:
        return self.drive.failed if self.drive is not None else None

    @property
    def me(self) -> str:
        return self.server.peers.me

    @property
    def val_loss(self) -> float | None:
        """The newest validation loss this (first-stage) replica measured, if any."""
        return self.drive.validated.loss if self.drive is not None and self.drive.validated is not None else None

    @property
    def policy(self) -> LinkPolicy | None:
        return self.server.link.policy

    @property
    def step(self) -> int:
        return self.worker.step_id

    @property
    def done(self) -> bool:
        return self.cfg.training.max_steps is not None and self.step >= self.cfg.training.max_steps

    def start(self) -> None:
        self.loop.call_sync(self._start())

    def stop(self) -> None:
        self.loop.call_sync(self._stop())

    async def _start(self) -> None:
        await self.p2p.add_binary_stream_handler(PROTOCOL, self.server.handle)
        if self.index == 0 and not self.done:
            m, mbs = self.plan.micro_batches, self.cfg.micro_batch_size
            rank, world = self.shard
            training = self.cfg.training
            self.drive = Drive(self.server, lambda step: self.data.batch(step, m * mbs, rank, world), m,
                               self.plan.in_flight(training.schedule), self.shard, training.timeout_s * 2,
                               lambda: self.done, lambda step, s, loss, val: self._record(step, s, loss, m * mbs * world, val),
                               self.log, validation=(self.validation or [])[rank::world], eval_every=training.eval_every_steps,
                               last_step=training.max_steps - 1 if training.max_steps else None)
            self.drive.task = asyncio.ensure_future(self.drive.run())

    def drain(self, timeout_s: float):
        """Finish the step in progress and take no new one (a graceful leave: no step half-applied).
        Returns a future that is done once the stage is between steps (or after ``timeout_s``)."""
        return self.loop.submit(self._drain(timeout_s))

    async def _drain(self, timeout_s: float) -> None:
        self.server.draining = True
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self.server.between_steps:
            await asyncio.sleep(0.05)   # the step in progress completes at the pace of the whole pipeline
        if self.drive is not None and self.drive.task is not None:
            self.drive.task.cancel()

    async def _stop(self) -> None:
        if self.drive is not None and self.drive.task is not None:
            self.drive.task.cancel()
            await asyncio.gather(self.drive.task, return_exceptions=True)
        await self.p2p.remove_binary_stream_handler(PROTOCOL)
        self.server.close()
        # the pass running now finishes before the stage's state is read (a step is applied whole or not at all)
        await asyncio.get_running_loop().run_in_executor(None, self.server.compute.thread.join, 20.0)

    async def capture(self, ops: list[str]) -> dict[str, OpState]:
        """The state of ``ops`` as it is between two passes (on the compute thread)."""
        return await self.server.compute.run(0, self.final_state, ops)

    def final_state(self, ops: list[str] | None = None, pending: bool = False) -> dict[str, OpState]:
        """The state of this stage's ops (call only when no pass runs: stopped, or on the compute thread);
        ``pending``: with the gradient of the step in progress if this stage has all of it."""
        return capture(self.worker.stage.module, self.worker.optimizer, self.owned, ops or self.ops, self.worker.step_id,
                       grads=pending and self._whole_gradient(), outer=self._outer_tensors())

    def outer_digests(self) -> dict[str, str]:
        """At the start, for a stage whose replicas sync rarely: digests of the anchor it resumed (``anchor``)
        and of the parameters it starts from (``params``); {} for any other stage."""
        state = self.server.sync.state
        if state is None:
            return {}
        return {"anchor": state.digest(), "params": tensor_digest(self.worker.flat_params())}

    def _outer_tensors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return outer_tensors(self.server.sync.state, self.worker.stage.module, self.worker.params)

    def _whole_gradient(self) -> bool:
        """Every micro-batch of the current step went backward here (summed over the replicas)."""
        w = self.worker
        expected = self.plan.micro_batches * len(self.plan.stages[0].peers)
        return not w.saved and (w.reduced or (len(self.server.peers.replicas) == 1 and w.backwards == expected))

    def _stepped(self, step: int) -> None:
        training = self.cfg.training
        if self.index:
            self._record(step, None)
        if training.save_dir and training.max_steps is not None and step + 1 == training.max_steps:
            self.save(Path(training.save_dir))
        if training.checkpoint_dir and self.server.peers.replicas[0] == self.me and (step + 1) % training.checkpoint_every_steps == 0:
            # between steps: nothing runs on this stage now
            self.checkpoints.write(self.loop.loop, training.checkpoint_dir, self.final_state(), self.index, self.worker.step_id,
                                   training.keep_checkpoints)

    def _record(self, step: int, seconds: float | None, loss: float | None = None, samples: int = 0,
                val: Validation | None = None) -> None:
        c = self.server.counters
        row = {"step": step, "stage": self.index, "peer": self.me, "plan_hash": self.plan.hash, "time": time.time(),
               "sync_every": self.plan.sync_every, "syncs": c.syncs,
               "anchor": self.server.sync.state.digest() if self.server.sync.state is not None else None,
               "bytes_sent": c.bytes_sent, "act_raw": c.act_raw, "act_wire": c.act_wire, "retries": c.retries,
               "compute_s": c.compute_s, "micro_batches": c.micro_batches, "compute_cpu_s": c.compute_cpu_s,
               "fill_s": c.fill_s, "drain_s": c.drain_s, "reduce_s": c.reduce_s, "cpu_s": time.process_time(),
               "ratio": max(c.ratios.values(), default=1.0), "sent_to": dict(c.sent_to), "reduce_to": dict(c.reduce_to),
               **self.memory_row()}
        if loss is not None:
            row.update(loss=loss, samples=samples, step_s=seconds, samples_per_s=samples / seconds if seconds else None)
            if val is not None:
                row.update(validation_row(val, text=isinstance(self.data, ByteCorpus)))
            if step % 10 == 0 or step + 1 == self.cfg.training.max_steps or val is not None:
                measured = f", validation loss {val.loss:.4f}" if val is not None else ""
                self.log.info(f"step {step} loss {loss:.4f}{measured} {row['samples_per_s']:.1f} samples/s, sent "
                              f"{c.bytes_sent / 1e6:.1f} MB, link ratio {row['ratio']:g}")
        if self.cfg.training.metrics_path:
            append_row(self.cfg.training.metrics_path, row)

    @property
    def gauge(self) -> MemoryGauge:
        """What counts against this node's memory cap on the stage's device."""
        return MemoryGauge(self.worker.device)

    def memory_row(self) -> dict:
        """What the stage computes in and holds: its precision, whether it recomputes, its memory now,
        at its peak, its cap and the plan's prediction (bytes); a peak over the cap is said in one line."""
        planned, limit, gauge = self.plan.stages[self.index].memory_bytes, self.cfg.memory_limit_bytes, self.gauge
        peak = gauge.peak()
        over = gauge.over(limit, planned, self.index, peak)
        if over:
            self.server.warn.once("memory", over)
        return {"precision": self.worker.compute.precision, "recompute": self.worker.compute.recompute,
                "memory_used_bytes": gauge.used(), "memory_peak_bytes": peak,
                "memory_limit_bytes": limit, "memory_planned_bytes": planned}

    def save(self, directory: Path) -> Path:
        """The stage's parameters and buffers (tensors only) as ``stage<k>-<peer>.pt``, written to a
        temporary name and renamed: a reader never sees a half-written file; and the model's spec
        (``model.json``: what ``node.py export`` rebuilds the module from). Replicas that sync rarely
        save their anchor: the parameters they agree on."""
        directory.mkdir(parents=True, exist_ok=True)
        write_spec(directory, self.cfg.model, self.cfg.granularity)
        path = directory / f"stage{self.index}-{self.me[-8:]}.pt"
        tmp = path.with_name(path.name + ".tmp")
        try:
            state = {**self.worker.state(), **{n: a for n, (a, _) in self._outer_tensors().items()}}
            torch.save({"step": self.step, "stage": self.index, "state": state}, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path
