"""This node's part of a committed plan: it materialises its stage, serves it over libp2p
(``swarm.pipeline``) and, on a first-stage node, drives training steps on its shard of the data.

A session lives on the node's transport event loop; ``start``/``stop`` are the synchronous facade
the node's heartbeat loop uses. A new plan means a new session: parameters live in the node's copy of
the whole model, so ops the node keeps keep their trained values (hand-over of moved ops: churn issue).
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import torch

from swarm.compression.adatopk import max_expansion
from swarm.compression.policy import LinkPolicy, measure_codec_rate
from swarm.config import NodeConfig
from swarm.dag.graph import Partition
from swarm.dag.stages import extract_stages, input_specs
from swarm.dag.trace import TracedModel
from swarm.data import training_data
from swarm.errors import SwarmError
from swarm.pipeline import PROTOCOL, Neighbours, StageServer, StepHooks, stage_caller, train_step
from swarm.refusals import Bans
from swarm.runtime.state import OpState, capture, op_tensors, write_checkpoint
from swarm.runtime.worker import StageWorker
from swarm.scheduler import Plan
from swarm.wire import Limits


def model_io(traced: TracedModel) -> tuple[list[int], str, list[int]]:
    """(input shape, input dtype, output shape) of the traced model (batch dimension first)."""
    dag = traced.dag
    first = next(op for op in dag.ops if op.op == "placeholder")
    output = next(op for op in dag.ops if op.op == "output")
    result = dag.ops[dag.index[output.inputs[0]]]
    return list(first.out_shapes[0]), first.out_dtypes[0].removeprefix("torch."), list(result.out_shapes[0])


def frame_limit(traced: TracedModel, max_batch: int, flat_numel: int) -> int:
    """The largest frame this stage can legitimately receive: a boundary's activations (or gradients)
    for ``max_batch`` samples, or a replica's share of the flat gradient, plus headroom."""
    per_sample = max(traced.dag.cut_bytes()) / traced.dag.batch_size
    return int(2 * per_sample * max_batch + 4 * flat_numel + (1 << 20))


class TrainingSession:
    """Runs ``plan``'s stage for peer ``me`` (a node outside the plan's stages gets no session)."""

    def __init__(self, plan: Plan, me: str, traced: TracedModel, cfg: NodeConfig, p2p, loop: asyncio.AbstractEventLoop,
                 bandwidth: Callable[[str], float | None] = lambda p: None, start_step: int = 0,
                 admit: Callable[[str], bool] | None = None, log: Callable[[str], None] = print, device: str = "cpu",
                 states: dict[str, OpState] | None = None, bans: Bans | None = None,
                 before_apply: Callable[[int], Awaitable[None]] | None = None):
        role = plan.role(me)
        if role["stage"] is None:
            raise SwarmError("this node has no stage in the plan")
        self.plan, self.me, self.cfg, self.p2p, self.loop, self.log = plan, me, cfg, p2p, loop, log
        self.index, self.training = role["stage"], cfg.training
        spec = plan.stages[self.index]
        partition = Partition(tuple(s.first_op for s in plan.stages), len(traced.dag.ops))
        stage = extract_stages(traced, partition)[self.index]
        last = self.index == len(plan.stages) - 1
        in_shape, in_dtype, out_shape = model_io(traced)
        self.data, loss_fn = training_data(self.training.data, in_shape, in_dtype, out_shape)
        mbs = cfg.micro_batch_size
        self.worker = StageWorker(stage, cfg.optimizer, self.training.lr, max_in_flight=4 * plan.micro_batches,
                                  loss_fn=loss_fn if last else None, input_specs=input_specs(traced.dag, stage.io),
                                  max_batch=mbs, warmup_steps=self.training.lr_warmup_steps, device=device)
        self.owned = op_tensors(traced.dag, traced.gm)
        self.ops = [op for op in stage.io.ops if op in self.owned]
        self.completed = self.worker.resume({op: st for op, st in (states or {}).items() if op in self.ops}, start_step)
        limit = frame_limit(traced, mbs, sum(p.numel() for p in self.worker.params))
        comp = cfg.compression   # what a legitimate peer decodes to at most: raw frames are below the frame limit
        hardest = max(comp.ratio if comp.mode == "fixed" else comp.max_ratio, 1.0)
        limits = Limits(max_frame_bytes=limit, max_decoded_bytes=limit, max_expand=max_expansion(hardest))
        replicas = tuple(sorted(spec.peers))
        upstream = tuple(sorted(plan.stages[self.index - 1].peers)) if self.index else ()
        downstream = () if last else tuple(sorted(plan.stages[self.index + 1].peers))
        policy = None
        if not last:
            link, comp = plan.links[self.index], cfg.compression
            policy = LinkPolicy(comp.mode, link.bytes, plan.bottleneck_s, min(len(replicas), len(downstream)),
                                link.bandwidth_bps, comp.ratio, comp.max_ratio, comp.warmup_steps,
                                codec_s_per_byte=1 / measure_codec_rate() if comp.mode == "auto" else None)
        self.policy = policy
        self.server = StageServer(self.worker, Neighbours(me, replicas, upstream, downstream, plan.micro_batches),
                                  stage_caller(p2p, limits, self.training.timeout_s), limits, policy, bandwidth,
                                  self.training.timeout_s, self.training.schedule, admit=admit, log=log, bans=bans,
                                  hooks=StepHooks(self._stepped, before_apply))
        if not last:   # what the next stage's holders deliver is measured on every call (planning checks claims with it)
            nxt, dag = plan.stages[self.index + 1], traced.dag
            flops = sum(op.flops for op in dag.ops[nxt.first_op:nxt.stop_op]) * mbs / dag.batch_size
            self.server.link.next_stage = (float(flops), self.index + 1 == len(plan.stages) - 1)
        self.rank, self.world = (replicas.index(me), len(replicas)) if self.index == 0 else (0, 1)
        self.driver: asyncio.Task | None = None
        self.failed: str | None = None
        self.started_at = time.time()

    @property
    def step(self) -> int:
        return self.worker.step_id

    @property
    def done(self) -> bool:
        return self.training.max_steps is not None and self.step >= self.training.max_steps

    def start(self) -> None:
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(30)

    async def _start(self) -> None:
        await self.p2p.add_binary_stream_handler(PROTOCOL, self.server.handle)
        if self.index == 0 and not self.done:
            self.driver = asyncio.ensure_future(self._drive())

    def drain(self, timeout_s: float):
        """Finish the step in progress and take no new one (a graceful leave: no step half-applied).
        Returns a future that is done once the stage is between steps (or after ``timeout_s``)."""
        return asyncio.run_coroutine_threadsafe(self._drain(timeout_s), self.loop)

    async def _drain(self, timeout_s: float) -> None:
        self.server.draining = True
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self.server.between_steps:
            await asyncio.sleep(0.05)   # the step in progress completes at the pace of the whole pipeline
        if self.driver is not None:
            self.driver.cancel()

    async def _stop(self) -> None:
        if self.driver is not None:
            self.driver.cancel()
            await asyncio.gather(self.driver, return_exceptions=True)
        await self.p2p.remove_binary_stream_handler(PROTOCOL)
        self.server.close()
        # the pass running now finishes before the stage's state is read (a step is applied whole or not at all)
        await asyncio.get_running_loop().run_in_executor(None, self.server.compute.thread.join, 20.0)

    async def _drive(self) -> None:
        """The first stage's training loop: one optimizer step per iteration on this replica's shard."""
        m, mbs = self.plan.micro_batches, self.cfg.micro_batch_size
        in_flight = m if self.training.schedule == "gpipe" else self.plan.in_flight()
        failures, done, started = 0, {}, time.perf_counter()
        while not self.done and not self.server.draining:
            step = self.step
            x, y = self.data.batch(step, m * mbs, self.rank, self.world)
            try:
                loss = await train_step(self.server, x, y, m, in_flight, self.rank, self.world,
                                        deadline_s=self.training.timeout_s * 2, done=done, settle=False)
            except SwarmError as e:   # a peer died or fell behind: retry the step until a new plan replaces us
                self.failed, failures = str(e), failures + 1
                if failures == 1:
                    self.log(f"warning: step {step} failed ({e}); retrying until the swarm re-plans")
                await asyncio.sleep(min(1.0 * failures, 5.0))   # back-off between attempts
                continue
            if not math.isfinite(loss):
                self.failed = f"loss became {loss} at step {step}"
                self.log(f"error: training stopped: {self.failed}")
                return
            failures, self.failed, done = 0, None, {}
            self._record(step, time.perf_counter() - started, loss=loss, samples=m * mbs * self.world)
            started = time.perf_counter()
        if self.done:
            try:
                await self.server.settle()   # the last step reached every stage
            except SwarmError as e:
                self.log(f"warning: the last step did not reach every stage ({e})")
            self.log(f"training finished at step {self.step} (max_steps)")

    async def capture(self, ops: list[str]) -> dict[str, OpState]:
        """The state of ``ops`` as it is between two passes (on the compute thread)."""
        return await self.server.compute.run(0, self.final_state, ops)

    def final_state(self, ops: list[str] | None = None, pending: bool = False) -> dict[str, OpState]:
        """The state of this stage's ops (call only when no pass runs: stopped, or on the compute thread);
        ``pending``: with the gradient of the step in progress if this stage has all of it."""
        return capture(self.worker.stage.module, self.worker.optimizer, self.owned, ops or self.ops, self.worker.step_id,
                       grads=pending and self._whole_gradient())

    def _whole_gradient(self) -> bool:
        """Every micro-batch of the current step went backward here (summed over the replicas)."""
        w = self.worker
        expected = self.plan.micro_batches * len(self.plan.stages[0].peers)
        return not w.saved and (w.reduced or (len(self.server.peers.replicas) == 1 and w.backwards == expected))

    def _stepped(self, step: int) -> None:
        if self.index:
            self._record(step, None)
        if self.training.save_dir and self.training.max_steps is not None and step + 1 == self.training.max_steps:
            self.save(Path(self.training.save_dir))
        every, first = self.training.checkpoint_every_steps, self.server.peers.replicas[0] == self.me
        if self.training.checkpoint_dir and first and (step + 1) % every == 0:
            states = self.final_state()   # between steps: nothing runs on this stage now
            written = self.loop.run_in_executor(None, write_checkpoint, self.training.checkpoint_dir, states,
                                                self.index, self.worker.step_id)

            def report(f, step: int = self.worker.step_id) -> None:   # one warning while writes keep failing
                if f.cancelled():
                    return
                failing = getattr(self, "_checkpoint_failing", False)
                if f.exception() is not None and not failing:
                    self.log(f"warning: checkpoint not written: {f.exception()} (not repeated until one is written)")
                elif f.exception() is None and failing:
                    self.log(f"checkpoint of step {step} written again")
                self._checkpoint_failing = f.exception() is not None
            written.add_done_callback(report)

    def _record(self, step: int, seconds: float | None, loss: float | None = None, samples: int = 0) -> None:
        c = self.server.counters
        row = {"step": step, "stage": self.index, "peer": self.me, "plan_hash": self.plan.hash, "time": time.time(),
               "bytes_sent": c.bytes_sent, "act_raw": c.act_raw, "act_wire": c.act_wire, "retries": c.retries,
               "compute_s": c.compute_s, "micro_batches": c.micro_batches, "compute_cpu_s": c.compute_cpu_s,
               "fill_s": c.fill_s, "drain_s": c.drain_s, "reduce_s": c.reduce_s, "cpu_s": time.process_time(),
               "ratio": max(c.ratios.values(), default=1.0), "sent_to": dict(c.sent_to), "reduce_to": dict(c.reduce_to)}
        if loss is not None:
            row.update(loss=loss, samples=samples, step_s=seconds, samples_per_s=samples / seconds if seconds else None)
            if step % 10 == 0 or step + 1 == self.training.max_steps:
                self.log(f"step {step} loss {loss:.4f} {row['samples_per_s']:.1f} samples/s, sent "
                         f"{c.bytes_sent / 1e6:.1f} MB, link ratio {row['ratio']:g}")
        if self.training.metrics_path:
            with open(self.training.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def save(self, directory: Path) -> Path:
        """The stage's parameters and buffers (tensors only) as ``stage<k>-<peer>.pt``, written to a
        temporary name and renamed: a reader never sees a half-written file."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"stage{self.index}-{self.me[-8:]}.pt"
        tmp = path.with_name(path.name + ".tmp")
        try:
            torch.save({"step": self.step, "stage": self.index, "state": self.worker.state()}, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path
