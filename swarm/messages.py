"""The messages of swarm's protocols, typed: the one place that knows message kinds and tensor names.

Every message is one wire frame (``swarm.wire``, docs/wire.md: byte format unchanged) of a ``kind``,
scalar ``meta`` and named tensors. Stage protocol ``swarm.stage.v1`` (docs/runtime.md):

- ``Forward`` {step, mb, scale, lscale}: a micro-batch's activations ``x0, x1, ...`` and, for the
  stages after the first, its ``targets``. Answered by ``Grads`` {step, mb, loss, wait_s, lscale,
  overflow}: the gradient with respect to those inputs, ``g0, g1, ...`` (sent on the forward's AdaTopK
  masks), at loss scale ``lscale``; ``overflow``: none, because a gradient of this step overflowed here
  or further down (the step is skipped everywhere: ``swarm.runtime.precision``).
- ``Evaluate`` {step, mb}: a validation micro-batch, as ``Forward`` carries it (inputs, and targets
  after the first stage), run forward only: no gradient, nothing kept, the module in eval mode.
  Answered by ``Evaluated`` {step, mb, loss, correct, count}: the last stage's mean loss over the
  micro-batch, and for classifiers how many of its ``count`` samples were right (else null).
- ``Step`` {step, skip}: every previous-stage replica is done with the step (``skip``: it overflowed
  upstream). Answered by ``Stepped``.
- ``Reduce`` {step, part, skip}: a replica's part ``g`` of the flat gradient, for the part's owner.
  Answered by ``Reduced`` {step, part, skip}: the sum ``g`` over all replicas (``skip``: some replica's
  step overflowed: all skip it).
- ``Gather`` {step, part}, no tensors: an overlapped sync's part whose owner is gone, asked of another
  replica. Answered by the ``Reduced`` that replica got from the owner (or an error: it got none).

State protocol ``swarm.state.v1`` (docs/churn.md):

- ``Fetch`` {op}: answered by ``State`` {op, step} with the op's tensors (``p:``, ``b:``, ``o:``,
  ``g:`` prefixed names of ``swarm.runtime.state``).
- ``Snapshot`` {op, step} with the op's tensors (no ``g:``): answered by ``Kept`` {op, step}.

Any request may be answered by ``ErrorReply`` {message, retry}. ``retry`` tells the caller that
another attempt (later, or on another replica) may succeed (``PeerUnavailable``); otherwise the
request was refused (``RemoteProtocolError``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from swarm.compression.adatopk import BITS, ChannelScale
from swarm.errors import PeerUnavailable, RemoteProtocolError, SwarmError
from swarm.runtime.precision import MAX_SCALE
from swarm.wire import Header, Message, pack

FORWARD, GRADS, STEP, STEPPED = "forward", "grads", "step", "stepped"
EVALUATE, EVALUATED = "evaluate", "evaluated"
REDUCE, REDUCED, GATHER, ERROR = "reduce", "reduced", "gather", "error"
FETCH, STATE, SNAPSHOT, KEPT = "fetch", "state", "snapshot", "kept"
STAGE_REQUESTS = (FORWARD, EVALUATE, STEP, REDUCE, GATHER)
CARRIES_INPUTS = (FORWARD, EVALUATE)   # requests with a micro-batch's inputs (x0, x1, ..., targets)
STATE_REQUESTS = (FETCH, SNAPSHOT)
TARGETS = "targets"
PART = "g"   # the one tensor of a reduce request and its reply
HALF_BITS = 16   # a forward's ``gbits`` asking for its gradients as bfloat16 (it went uncompressed, as bfloat16)


def input_name(i: int) -> str:
    return f"x{i}"


def grad_name(i: int) -> str:
    return f"g{i}"


def check_scale(value, what: str = "loss scale") -> float:
    """``value`` as a loss scale (``swarm.runtime.precision``): a power of two in [1, ``MAX_SCALE``] (else ``RemoteProtocolError``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 1 <= value <= MAX_SCALE or math.frexp(value)[0] != 0.5:
        raise RemoteProtocolError(f"bad {what} {value!r} (a power of two from 1 to 2^24)")
    return float(value)


def flag(meta: dict, key: str) -> bool:
    """A boolean meta field (absent: False); anything else is refused."""
    value = meta.get(key, False)
    if type(value) is not bool:
        raise RemoteProtocolError(f"'{key}' must be true or false, not {value!r}")
    return value


def input_names(header: Header) -> list[str] | None:
    """The names of a forward request's inputs, in order, if they are ``x0, x1, ...`` without gaps
    beside at most ``targets`` (None otherwise)."""
    shapes = header.shapes()
    inputs = sorted((k for k in shapes if k.startswith("x") and k[1:].isdigit()), key=lambda k: int(k[1:]))
    if set(shapes) - set(inputs) - {TARGETS} or inputs != [input_name(i) for i in range(len(inputs))]:
        return None
    return inputs


@dataclass
class Forward:
    KIND = FORWARD
    step: int
    mb: int
    scale: float
    inputs: list[torch.Tensor]
    targets: torch.Tensor | None = None
    masks: dict[str, torch.Tensor] = field(default_factory=dict)   # AdaTopK kept positions, by input name
    grad_bits: int | None = None   # gradients come back as ATK2 packets of values this wide (16: bfloat16; None: as is)
    loss_scale: float = 1.0        # the loss scale its step started with at the first stage

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {input_name(i): x for i, x in enumerate(self.inputs)}
        if self.targets is not None:
            out[TARGETS] = self.targets
        return out

    def to_frame(self, ratio: float = 1.0, scales: ChannelScale | None = None,
                 half: bool = False) -> tuple[bytes, dict[str, torch.Tensor]]:
        """(frame, masks used by name): floating-point tensors AdaTopK-compressed at ``ratio`` (> 1),
        their gradients asked back in packets of the link's bits (``scales.bits``, meta ``gbits``);
        uncompressed and ``half``: float32 tensors go as bfloat16, their gradients too (``gbits`` 16)."""
        tensors = self.tensors()
        ratios = {k: ratio for k, t in tensors.items() if t.is_floating_point()}
        meta = {"step": self.step, "mb": self.mb, "scale": self.scale}
        if self.loss_scale != 1:
            meta["lscale"] = self.loss_scale
        if ratio > 1 and scales is not None and scales.bits is not None:
            meta["gbits"] = scales.bits
        halves = frozenset(k for k, t in tensors.items() if t.dtype == torch.float32) if half and ratio <= 1 else frozenset()
        if halves:
            meta["gbits"] = HALF_BITS
        return pack(self.KIND, meta, tensors, ratios=ratios, scales=scales, half=halves)

    @classmethod
    def from_message(cls, msg: Message) -> Forward:
        n = len([k for k in msg.tensors if k.startswith("x")])
        inputs = [msg.tensors.get(input_name(i)) for i in range(n)]
        if any(t is None for t in inputs):
            raise RemoteProtocolError("inputs must be named x0, x1, ... without gaps")
        mb, scale = msg.meta.get("mb"), msg.meta.get("scale", 1.0)
        if not isinstance(mb, int) or isinstance(mb, bool) or mb < 0:
            raise RemoteProtocolError(f"bad micro-batch id {mb!r}")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0 < scale <= 1:
            raise RemoteProtocolError(f"bad loss scale {scale!r}")
        masks = {k: m for k, m in msg.masks.items()}
        bits = msg.meta.get("gbits")
        if bits is not None and (type(bits) is not int or bits not in (*BITS, HALF_BITS)):
            raise RemoteProtocolError(f"bad gradient bits {bits!r} (supported: {', '.join(map(str, (*BITS, HALF_BITS)))})")
        return cls(msg.meta["step"], mb, float(scale), inputs, msg.tensors.get(TARGETS), masks, bits,
                   check_scale(msg.meta.get("lscale", 1.0)))

    def raw_bytes(self) -> int:
        """Bytes of the floating-point tensors uncompressed (the activations a codec works on)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values() if t.is_floating_point())


class Evaluate(Forward):
    """A validation micro-batch (``Forward``'s layout; ``scale`` unused, 1)."""

    KIND = EVALUATE


@dataclass(frozen=True)
class Evaluated:
    step: int
    mb: int
    loss: float
    correct: int | None = None   # classifiers: samples whose top class is the target
    count: int = 0               # samples in the micro-batch

    def to_frame(self) -> bytes:
        return pack(EVALUATED, {"step": self.step, "mb": self.mb, "loss": self.loss, "correct": self.correct,
                                "count": self.count}, {})[0]

    @classmethod
    def from_message(cls, msg: Message) -> Evaluated:
        loss, correct, count = msg.meta.get("loss"), msg.meta.get("correct"), msg.meta.get("count")
        if not isinstance(loss, (int, float)) or isinstance(loss, bool):
            raise RemoteProtocolError(f"evaluated: bad loss {loss!r}")
        if type(count) is not int or count < 0 or (correct is not None and (type(correct) is not int or not 0 <= correct <= count)):
            raise RemoteProtocolError(f"evaluated: bad counts {correct!r} of {count!r}")
        return cls(msg.meta.get("step"), msg.meta.get("mb"), float(loss), correct, count)


@dataclass
class Grads:
    step: int
    mb: int
    loss: float | None
    grads: list[torch.Tensor | None]
    wait_s: float = 0.0   # seconds of the round trip this stage spent waiting on its next stage
    scale: float = 1.0    # the loss scale the gradients carry
    overflow: bool = False   # no gradients: the step overflowed here or downstream

    def to_frame(self, forward_masks: dict[str, torch.Tensor] | None = None, bits: int | None = None) -> bytes:
        """The reply frame; each gradient goes back on its input's AdaTopK mask (no indices), in ATK2
        packets of ``bits`` (None: ATK1)."""
        masks = forward_masks or {}
        reuse = {grad_name(i): masks[input_name(i)] for i in range(len(self.grads)) if input_name(i) in masks}
        meta = {"step": self.step, "mb": self.mb, "loss": self.loss, "wait_s": self.wait_s}
        if self.scale != 1:
            meta["lscale"] = self.scale
        if self.overflow:
            meta["overflow"] = True
        grads = {grad_name(i): g for i, g in enumerate(self.grads) if g is not None}
        halves = frozenset(k for k in grads if k not in reuse) if bits == HALF_BITS else frozenset()
        return pack(GRADS, meta, grads, reuse=reuse, reuse_bits=None if bits == HALF_BITS else bits, half=halves)[0]

    @classmethod
    def from_message(cls, msg: Message, n_inputs: int) -> Grads:
        overflow = flag(msg.meta, "overflow")
        return cls(msg.meta.get("step"), msg.meta.get("mb"), msg.meta.get("loss"),
                   [None] * n_inputs if overflow else [msg.tensors.get(grad_name(i)) for i in range(n_inputs)],
                   msg.meta.get("wait_s", 0.0), check_scale(msg.meta.get("lscale", 1.0)), overflow)

    @staticmethod
    def expected(outputs: list[torch.Tensor]) -> dict[str, tuple[list[int], str]]:
        """name -> (shape, dtype name) of the gradients a reply to these outputs may carry."""
        from swarm.wire import NAMES
        return {grad_name(i): (list(o.shape), NAMES[o.dtype]) for i, o in enumerate(outputs) if o.dtype in NAMES}

    @staticmethod
    def masks_for(forward_masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The masks a ``Grads`` reply is decoded with: the forward's, renamed to the gradients."""
        return {grad_name(int(k[1:])): m for k, m in forward_masks.items() if k.startswith("x")}


@dataclass(frozen=True)
class Step:
    step: int
    skip: bool = False   # the step overflowed upstream: not applied anywhere

    def to_frame(self) -> bytes:
        return pack(STEP, {"step": self.step, **({"skip": True} if self.skip else {})}, {})[0]


@dataclass(frozen=True)
class Stepped:
    step: int

    def to_frame(self) -> bytes:
        return pack(STEPPED, {"step": self.step}, {})[0]


@dataclass
class Reduce:
    """A replica's contribution to part ``part`` of a sync: its gradient part (one float32 tensor
    ``g``, synchronous replicas) or its encoded pseudo-gradient part (``swarm.runtime.outer``)."""

    step: int
    part: int
    g: torch.Tensor | dict[str, torch.Tensor]
    skip: bool = False   # this replica's step overflowed (the reply: some replica's did)

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return self.g if isinstance(self.g, dict) else {PART: self.g}

    def meta(self) -> dict:
        return {"step": self.step, "part": self.part, **({"skip": True} if self.skip else {})}

    def to_frame(self) -> bytes:
        return pack(REDUCE, self.meta(), self.tensors)[0]


@dataclass
class Reduced(Reduce):
    """The owner's answer: the sum of the part over all replicas (encoded like the contributions)."""

    def to_frame(self) -> bytes:
        return pack(REDUCED, self.meta(), self.tensors)[0]


@dataclass(frozen=True)
class Gather:
    """Ask a replica for the sum of part ``part`` of an overlapped sync as its owner sent it there."""

    step: int
    part: int

    def to_frame(self) -> bytes:
        return pack(GATHER, {"step": self.step, "part": self.part}, {})[0]


@dataclass(frozen=True)
class Fetch:
    op: str

    def to_frame(self) -> bytes:
        return pack(FETCH, {"op": self.op}, {})[0]


@dataclass
class State:
    op: str
    step: int
    tensors: dict[str, torch.Tensor]

    def to_frame(self) -> bytes:
        return pack(STATE, {"op": self.op, "step": self.step}, self.tensors)[0]


@dataclass
class Snapshot:
    op: str
    step: int
    tensors: dict[str, torch.Tensor]

    def to_frame(self) -> bytes:
        return pack(SNAPSHOT, {"op": self.op, "step": self.step}, self.tensors)[0]


@dataclass(frozen=True)
class Kept:
    op: str
    step: int

    def to_frame(self) -> bytes:
        return pack(KEPT, {"op": self.op, "step": self.step}, {})[0]


@dataclass(frozen=True)
class ErrorReply:
    message: str
    retry: bool = False

    def to_frame(self) -> bytes:
        return pack(ERROR, {"message": self.message, "retry": self.retry}, {})[0]

    @classmethod
    def of(cls, e: BaseException) -> ErrorReply:
        if isinstance(e, SwarmError):
            return cls(str(e)[:500], isinstance(e, PeerUnavailable))
        # a pass that fails on odd input must not take the stage down
        return cls(f"stage failed: {type(e).__name__}: {str(e)[:300]}")


def error_frame(e: BaseException) -> bytes:
    """The ``error`` reply naming ``e`` (``retry`` set where another attempt may succeed)."""
    return ErrorReply.of(e).to_frame()


def check_reply(reply: Message, what: str) -> Message:
    """``reply`` unless it is an error reply: then ``PeerUnavailable`` (retry set) or
    ``RemoteProtocolError`` (the peer refused the request), naming ``what`` was asked."""
    if reply.kind == ERROR:
        cls = PeerUnavailable if reply.meta.get("retry") else RemoteProtocolError
        raise cls(f"{what}: {reply.meta.get('message')}")
    return reply
