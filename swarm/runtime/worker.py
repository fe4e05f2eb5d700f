"""One pipeline stage at work: forward and backward passes by micro-batch id, gradient accumulation,
an optimizer step per training step (``StageWorker``; transport-agnostic: tensors in, tensors out),
what it computes in (``Compute``) and its step's loss scale (``StepScale``, ``swarm.runtime.precision``),
on the one compute thread of ``swarm.runtime.runner``. What a stage counts: ``swarm.runtime.counters``."""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

from swarm.dag.stages import Stage
from swarm.errors import SwarmError
from swarm.runtime.allreduce import flatten, split
from swarm.runtime.precision import DTYPES, GROWTH_INTERVAL, HALF_PRECISIONS, INIT_SCALE, MAX_SCALE, resolve
from swarm.runtime.state import OpState, restore

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Compute:
    """Where and in what a stage computes (``precision``: ``swarm.runtime.precision.resolve``)."""

    device: torch.device
    precision: str = "fp32"   # fp32 | bf16 | fp16 (``resolve``)
    recompute: bool = False   # keep only the inputs of a micro-batch; run its forward again in backward

    def run(self, module: torch.nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """``module``'s outputs on ``inputs`` in the stage's precision; recomputed ones keep no
        activations (``torch.utils.checkpoint``: the same RNG and autocast state the second time)."""
        with self.autocast():
            if self.recompute and torch.is_grad_enabled():
                return list(torch.utils.checkpoint.checkpoint(module, *inputs, use_reentrant=False))
            return list(module(*inputs))

    @property
    def half(self) -> bool:
        """Computes in 16 bits: its float32 traffic crosses the wire as bfloat16."""
        return self.precision in HALF_PRECISIONS

    def autocast(self):
        if not self.half:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=DTYPES[self.precision])

    def leaving(self, t: torch.Tensor) -> torch.Tensor:
        """An output as it leaves the stage: under half autocast, float32 holding the half values
        (the traced boundary, and the next stage's checks, are float32)."""
        return t.float() if self.half and t.dtype == DTYPES[self.precision] else t


@dataclass
class StepScale:
    """A stage's loss scale and what becomes of its steps. ``dynamic`` (fp16 at the first stage): the
    scale it stamps on its micro-batches, halved after a skipped step, doubled after ``GROWTH_INTERVAL``
    applied ones. Every stage keeps its step's own scale (``scale``: the first micro-batch's, once
    ``taken``), whether its gradients are unscaled yet, and why the step will not be applied
    (``pending``: an overflow seen here or reported by a peer); ``skipped`` steps so far, and why the
    newest was (``newest``; None: it was applied)."""

    dynamic: bool = False
    scale: float = 1.0
    good_steps: int = 0
    taken: bool = False
    unscaled: bool = False
    pending: str | None = None
    newest: str | None = None
    skipped: int = 0

    def __post_init__(self) -> None:
        if self.dynamic and self.scale == 1.0:
            self.scale = INIT_SCALE

    def stamp(self) -> float:
        """The scale this stage's own micro-batches start with."""
        return self.scale if self.dynamic else 1.0

    def take(self, incoming: float) -> float:
        """A micro-batch of the current step arrives at ``incoming``: the factor that brings what it
        carries to the step's scale (the first arrival sets it)."""
        if not self.taken:
            self.scale, self.taken = incoming, True
        return self.scale / incoming

    def skip(self, why: str) -> None:
        """The current step will not be applied (the first reason is kept)."""
        self.pending = self.pending or why

    def close(self) -> bool:
        """The step ends: whether it is applied (none pending); the next step's scale."""
        applied, self.newest, self.pending = self.pending is None, self.pending, None
        self.skipped += not applied
        if self.dynamic:
            if not applied:
                self.scale, self.good_steps = max(1.0, self.scale / 2), 0
            else:
                self.good_steps += 1
                if self.good_steps >= GROWTH_INTERVAL:
                    self.scale, self.good_steps = min(MAX_SCALE, self.scale * 2), 0
        self.taken = self.unscaled = False
        return applied


def all_finite(tensors) -> bool:
    flags = [torch.isfinite(t).all() for t in tensors if t is not None]
    return bool(torch.stack(flags).all()) if flags else True


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
                 precision: str = "fp32", recompute: bool = False):
        self.stage, self.loss_fn, self.max_in_flight = stage, loss_fn, max_in_flight
        self.compute = Compute(torch.device(device), resolve(precision, device), recompute)
        self.step_scale = StepScale(dynamic=self.compute.precision == "fp16")   # and why steps are skipped
        stage.module.to(self.device)
        self.lr_schedule = LrSchedule(lr, warmup_steps)
        self.input_specs, self.max_batch = input_specs, max_batch
        self.params = [p for p in stage.module.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(optimizer, self.params, lr) if self.params else None
        self.saved: dict[int, tuple[list, list]] = {}
        self.step_id = 0
        self.backwards = 0       # micro-batches of this step whose gradients are accumulated
        self.reduced = False     # this step's gradients are the replicas' sum

    @property
    def is_last(self) -> bool:
        return self.loss_fn is not None

    @property
    def device(self) -> torch.device:
        return self.compute.device

    @property
    def skipped_steps(self) -> int:
        return self.step_scale.skipped

    @property
    def skipped(self) -> str | None:
        """Why the newest step was skipped (None: it was applied)."""
        return self.step_scale.newest

    @property
    def scaled(self) -> bool:
        """The current step's gradients carry a loss scale: a non-finite one is an overflow (the step is
        skipped by every stage), not a failure."""
        return self.compute.precision == "fp16" or self.step_scale.scale > 1

    @property
    def overflowed(self) -> bool:
        """The current step will be skipped by every stage (an overflow here or one a peer reported)."""
        return self.step_scale.pending is not None

    def forward(self, mb: int, inputs: list[torch.Tensor], targets: torch.Tensor | None = None,
                scale: float = 1.0, loss_scale: float = 1.0) -> list[torch.Tensor]:
        """Outputs of micro-batch ``mb`` (detached); the last stage returns ``[loss]`` and will
        backpropagate ``loss * scale`` (1 / micro-batches: accumulated gradients are the mean) times
        the step's loss scale (``loss_scale``: the micro-batch's, ``LossScale.take``)."""
        if mb in self.saved:
            raise SwarmError(f"micro-batch {mb} of step {self.step_id} is already in flight")
        if len(self.saved) >= self.max_in_flight:
            raise SwarmError(f"more than {self.max_in_flight} micro-batches in flight")
        self._check(inputs)
        self.step_scale.take(loss_scale)
        leaves = [t.detach().to(self.device).requires_grad_(t.is_floating_point()) for t in inputs]
        outputs = self.compute.run(self.stage.module, leaves)
        if self.is_last:
            if targets is None:
                raise SwarmError("the last stage needs targets")
            loss = self.loss_fn(self.compute.leaving(outputs[0]), targets.to(self.device))
            self.saved[mb] = (leaves, [loss * (scale * self.step_scale.scale)])
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
            with torch.no_grad():
                outputs = [self.compute.leaving(o) for o in self.compute.run(module, [t.to(self.device) for t in inputs])]
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

    def backward(self, mb: int, grads: list[torch.Tensor | None] | None = None,
                 grad_scale: float | None = None) -> list[torch.Tensor | None]:
        """Gradients w.r.t. the inputs of micro-batch ``mb`` given those w.r.t. its outputs (the last
        stage needs none: it starts from its loss), at the step's loss scale (``grads`` carry
        ``grad_scale``: brought to it first). In a scaled step a non-finite gradient here is an overflow
        (``StepScale.pending``; the caller tells its neighbours)."""
        if mb not in self.saved:
            raise SwarmError(f"no forward pass of micro-batch {mb} in step {self.step_id} to differentiate")
        leaves, outputs = self.saved.pop(mb)
        if self.is_last:
            outputs[0].backward()
        else:
            factor = self.step_scale.scale / grad_scale if grad_scale else 1.0
            pairs = [(o, g if factor == 1 else g * factor) for o, g in zip(outputs, grads or [])
                     if g is not None and o.requires_grad]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g.to(self.device, o.dtype) for o, g in pairs])
        self.backwards += 1
        out = [leaf.grad if leaf.requires_grad else None for leaf in leaves]
        if self.scaled and not self.overflowed and not all_finite([*out, *(p.grad for p in self.params)]):
            self.skip(f"gradient overflow at stage {self.stage.io.index} (loss scale {self.step_scale.scale:g})")
        return out

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

    def skip(self, why: str) -> None:
        """Every stage skips the current step (an overflow: ``why``)."""
        self.step_scale.skip(why)

    def unscale(self) -> None:
        """Take the step's loss scale out of the accumulated gradients (once per step)."""
        if not self.step_scale.unscaled and self.step_scale.scale != 1:
            self.scale_grads(1 / self.step_scale.scale)
        self.step_scale.unscaled = True

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
        self.unscale()
        bad = self.non_finite_grads()
        if bad:
            self.skip(f"non-finite gradient of {len(bad)} parameters ({', '.join(bad[:3])})")
        applied = self.step_scale.close()
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_schedule.at(self.step_id)
            if applied:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if advance:
            self.advance()
        return applied

    def advance(self) -> None:
        """Start the next step."""
        self.step_id += 1
        self.backwards, self.reduced = 0, False
