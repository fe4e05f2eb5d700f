"""One pipeline stage at work: forward and backward passes by micro-batch id, gradient accumulation,
an optimizer step per training step (``StageWorker``; transport-agnostic: tensors in, tensors out),
the one compute thread its passes run on (``PriorityRunner``), and what the stage counts
(``Counters``, read into the metrics rows; ``Timeline``: pipeline fill and drain; ``Warnings``)."""
from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from swarm.dag.stages import Stage
from swarm.errors import SwarmError
from swarm.runtime.allreduce import flatten, split
from swarm.runtime.precision import resolve
from swarm.runtime.state import OpState, restore

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Compute:
    """Where and in what a stage computes (``precision``: ``swarm.runtime.precision.resolve``)."""

    device: torch.device
    precision: str = "fp32"   # fp32 | bf16 (``resolve``)

    def autocast(self):
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def leaving(self, t: torch.Tensor) -> torch.Tensor:
        """An output as it leaves the stage: under bf16 autocast, float32 holding the bfloat16 values
        (the traced boundary, and the next stage's checks, are float32)."""
        return t.float() if self.precision == "bf16" and t.dtype == torch.bfloat16 else t


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise SwarmError(f"unknown optimizer '{name}'")


def lr_at(step: int, lr: float, warmup_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (from 0): linear warm-up, then constant."""
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr


@dataclass(frozen=True)
class LrSchedule:
    """The learning rate of each step: ``lr`` after a linear warm-up of ``warmup_steps``."""

    lr: float
    warmup_steps: int = 0

    def at(self, step: int) -> float:
        return lr_at(step, self.lr, self.warmup_steps)


class StageWorker:
    """Runs ``stage``; keeps what backward needs for at most ``max_in_flight`` micro-batches."""

    def __init__(self, stage: Stage, optimizer: str = "adam", lr: float = 1e-3, max_in_flight: int = 64,
                 loss_fn: LossFn | None = None, input_specs: list[tuple[list[int], str, bool]] | None = None,
                 max_batch: int = 1024, warmup_steps: int = 0, device: str | torch.device = "cpu",
                 precision: str = "fp32"):
        self.stage, self.loss_fn, self.max_in_flight = stage, loss_fn, max_in_flight
        self.compute = Compute(torch.device(device), resolve(precision, device))
        stage.module.to(self.device)
        self.lr_schedule = LrSchedule(lr, warmup_steps)
        self.input_specs, self.max_batch = input_specs, max_batch
        self.params = [p for p in stage.module.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(optimizer, self.params, lr) if self.params else None
        self.saved: dict[int, tuple[list, list]] = {}
        self.step_id = 0
        self.backwards = 0       # micro-batches of this step whose gradients are accumulated
        self.reduced = False     # this step's gradients are the replicas' sum
        self.skipped_steps = 0   # steps whose update was not finite: not applied
        self.skipped: str | None = None   # why the newest step was skipped (None: it was applied)

    @property
    def is_last(self) -> bool:
        return self.loss_fn is not None

    @property
    def device(self) -> torch.device:
        return self.compute.device

    def forward(self, mb: int, inputs: list[torch.Tensor], targets: torch.Tensor | None = None,
                scale: float = 1.0) -> list[torch.Tensor]:
        """Outputs of micro-batch ``mb`` (detached); the last stage returns ``[loss]`` and will
        backpropagate ``loss * scale`` (1 / micro-batches: accumulated gradients are the mean)."""
        if mb in self.saved:
            raise SwarmError(f"micro-batch {mb} of step {self.step_id} is already in flight")
        if len(self.saved) >= self.max_in_flight:
            raise SwarmError(f"more than {self.max_in_flight} micro-batches in flight")
        self._check(inputs)
        leaves = [t.detach().to(self.device).requires_grad_(t.is_floating_point()) for t in inputs]
        with self.compute.autocast():
            outputs = list(self.stage.module(*leaves))
        if self.is_last:
            if targets is None:
                raise SwarmError("the last stage needs targets")
            loss = self.loss_fn(self.compute.leaving(outputs[0]), targets.to(self.device))
            self.saved[mb] = (leaves, [loss * scale])
            return [loss.detach()]
        self.saved[mb] = (leaves, outputs)
        return [self.compute.leaving(o.detach()) for o in outputs]

    def evaluate(self, inputs: list[torch.Tensor], targets: torch.Tensor | None = None):
        """A validation micro-batch: no gradient, nothing kept, the module in eval mode for the pass (no
        dropout; BatchNorm uses, and does not update, its running statistics). The outputs, or at the
        last stage (mean loss, correct): ``correct`` counts top-1 hits for a classifier ([batch, classes]
        logits, [batch] targets), else None."""
        self._check(inputs)
        module, training = self.stage.module, self.stage.module.training
        module.eval()
        try:
            with torch.no_grad(), self.compute.autocast():
                outputs = [self.compute.leaving(o) for o in module(*[t.to(self.device) for t in inputs])]
        finally:
            module.train(training)
        if not self.is_last:
            return outputs
        if targets is None:
            raise SwarmError("the last stage needs targets")
        logits, targets = outputs[0], targets.to(self.device)
        loss = float(self.loss_fn(logits, targets))
        classes = logits.dim() == 2 and targets.dim() == 1
        return loss, int((logits.argmax(-1) == targets).sum()) if classes else None

    def _check(self, inputs: list[torch.Tensor]) -> None:
        """Inputs must look like the traced boundary (any batch size up to ``max_batch``): a peer
        cannot make this stage allocate for shapes it was never planned for."""
        self.check_inputs([(list(t.shape), str(t.dtype).removeprefix("torch.")) for t in inputs])

    def check_inputs(self, inputs: list[tuple[list[int], str]]) -> None:
        """``_check`` on (shape, dtype name) pairs: what a frame's header announces, before it is decoded."""
        if self.input_specs is None:
            return
        if len(inputs) != len(self.input_specs):
            raise SwarmError(f"stage {self.stage.io.index} takes {len(self.input_specs)} inputs, got {len(inputs)}")
        for i, ((got_shape, got), (shape, dtype, batched)) in enumerate(zip(inputs, self.input_specs)):
            if batched:
                ok = got == dtype and list(got_shape[1:]) == list(shape[1:]) and len(got_shape) and 0 < got_shape[0] <= self.max_batch
                want = f"{dtype} [batch<={self.max_batch}, {', '.join(map(str, shape[1:]))}]"
            else:
                ok, want = got == dtype and list(got_shape) == list(shape), f"{dtype} {list(shape)}"
            if not ok:
                raise SwarmError(f"input {i}: {got} {list(got_shape)} does not match the stage's {want}")

    def backward(self, mb: int, grads: list[torch.Tensor | None] | None = None) -> list[torch.Tensor | None]:
        """Gradients w.r.t. the inputs of micro-batch ``mb`` given those w.r.t. its outputs (the last
        stage needs none: it starts from its loss)."""
        if mb not in self.saved:
            raise SwarmError(f"no forward pass of micro-batch {mb} in step {self.step_id} to differentiate")
        leaves, outputs = self.saved.pop(mb)
        if self.is_last:
            outputs[0].backward()
        else:
            pairs = [(o, g) for o, g in zip(outputs, grads or []) if g is not None and o.requires_grad]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g.to(self.device, o.dtype) for o, g in pairs])
        self.backwards += 1
        return [leaf.grad if leaf.requires_grad else None for leaf in leaves]

    def drop(self, mb: int) -> None:
        """Forget micro-batch ``mb`` (its downstream failed; it may be retried elsewhere)."""
        self.saved.pop(mb, None)

    def flat_grads(self) -> torch.Tensor:
        """The accumulated gradients as one float32 CPU vector (zeros where a parameter got none)."""
        return flatten(p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params)

    def set_flat_grads(self, flat: torch.Tensor) -> None:
        """Replace the accumulated gradients by ``flat`` (the replicas' sum, from ``flat_grads`` layout)."""
        for p, piece in split(flat, self.params):
            p.grad = piece.to(p.device, p.dtype, copy=True)
        self.reduced = True

    def flat_params(self) -> torch.Tensor:
        """The parameters as one float32 CPU vector (``flat_grads`` layout)."""
        return flatten(self.params)

    def set_flat_params(self, flat: torch.Tensor) -> None:
        """Overwrite the parameters with ``flat`` (``flat_params`` layout)."""
        with torch.no_grad():
            for p, piece in split(flat, self.params):
                p.copy_(piece)

    def scale_grads(self, factor: float) -> None:
        """Multiply the accumulated gradients by ``factor`` (an inner step of one replica of ``factor``:
        its micro-batches' loss scale assumed the replicas' sum)."""
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(factor)

    def state(self) -> dict[str, torch.Tensor]:
        """The stage's parameters and buffers by the model's qualified names (on the CPU)."""
        return {k: v.detach().cpu().clone() for k, v in self.stage.module.state_dict().items()}

    def resume(self, states: dict[str, OpState], step: int) -> list[str]:
        """Start at ``step`` from op ``states``. The gradients of an unfinished step are dropped, except the
        whole gradient (``g:``) of step ``step - 1`` that ops one step behind carry: the rest of the swarm
        applied that step, so these ops apply it now. Returns them. (An outer state the states carry:
        ``runtime.outer.resume_outer``.)"""
        for p in self.params:
            p.grad = None
        behind = sorted(op for op, st in states.items() if st.step == step - 1 and any(k.startswith("g:") for k in st.tensors))
        restore(self.stage.module, self.optimizer, {
            op: st if op in behind else OpState(st.step, {k: t for k, t in st.tensors.items() if not k.startswith("g:")})
            for op, st in states.items()})
        self.step_id = step - 1 if behind else step
        if behind:
            self.step()
        return behind

    def non_finite_grads(self) -> list[str]:
        """Names of the parameters whose accumulated gradient has a NaN or an infinity."""
        names = {id(p): n for n, p in self.stage.module.named_parameters()}
        return [names.get(id(p), "?") for p in self.params if p.grad is not None and not bool(torch.isfinite(p.grad).all())]

    def step(self, advance: bool = True) -> bool:
        """Apply the accumulated gradients (one optimizer step) and start the next step (``advance``;
        else ``advance()`` does, after a sync of the replicas). A non-finite gradient is not applied:
        the step is skipped (gradients dropped, ``skipped`` says why) and the step id advances all the
        same, with the rest of the pipeline. Returns whether it was applied."""
        if self.saved:
            raise SwarmError(f"step {self.step_id} ends with {len(self.saved)} micro-batches still in flight")
        bad = self.non_finite_grads()
        self.skipped = None
        if bad:
            self.skipped = f"non-finite gradient of {len(bad)} parameters ({', '.join(bad[:3])})"
            self.skipped_steps += 1
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_schedule.at(self.step_id)
            if not bad:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if advance:
            self.advance()
        return not bad

    def advance(self) -> None:
        """Start the next step."""
        self.step_id += 1
        self.backwards, self.reduced = 0, False


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
    syncs: int = 0              # outer steps taken with the other replicas (sync_every > 1)
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


class Timeline:
    """This step's passes: when the step began, its first pass started and its last pass ended
    (``Counters.fill_s`` / ``drain_s``)."""

    def __init__(self) -> None:
        self.step_began = time.perf_counter()
        self.first_pass: float | None = None
        self.last_pass = 0.0

    def passed(self, started: float, ended: float) -> None:
        self.last_pass = ended
        if self.first_pass is None:
            self.first_pass = started

    def stepped(self, counters: Counters) -> None:
        now = time.perf_counter()
        if self.first_pass is not None:
            counters.fill_s += self.first_pass - self.step_began
            counters.drain_s += now - self.last_pass
        self.step_began, self.first_pass = now, None


class Warnings:
    """A stage's own warnings to ``log`` (a logger), each ``key`` at most once per ``interval_s``."""

    def __init__(self, log, interval_s: float = 60.0):
        self.log = log
        self.interval_s = interval_s
        self.said: dict[str, float] = {}

    def once(self, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self.said.get(key, -self.interval_s) >= self.interval_s:
            self.said[key] = now
            self.log.warning(message)
