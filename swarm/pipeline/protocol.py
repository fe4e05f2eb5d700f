"""The stage protocol's rules, without I/O: what a stage accepts, when a step is complete, where a
micro-batch goes. ``StageProtocol`` holds the protocol state of one stage of one plan; the libp2p
adapter (``swarm.pipeline.service``) feeds it what arrives and does what it says. Nothing here
awaits, sends, or reads a clock: times come in as arguments. The messages are ``swarm.messages``.

Rules (docs/runtime.md):

- **Admission** (``admit``): a request's sender must be a pipeline neighbour for its kind: a
  previous-stage replica (or, at the first stage, the node itself) for ``forward``, ``evaluate`` and ``step``,
  another replica of this stage for ``reduce``; a banned peer or a stranger is refused before the
  frame is read (``refuse_stream``). The tensors a request announces must be the ones its kind
  carries here, checked on the header before anything is decoded.
- **Steps** (``step_status``): a request names the current step, or the next one (it waits until
  this stage has stepped), or it is refused: a repeated ``step`` for the step just applied is
  answered ``stepped`` at once (its first reply was lost); older steps are stale.
- **Duplicates**: a ``forward`` for a micro-batch already answered in this step gets the same reply
  again (``cached``), so a retry never accumulates a gradient twice; at most ``max_cached`` per step.
- **Barrier** (``arrive``): a step is finished here (all-reduce, optimizer step, passed on) once
  every previous-stage replica sent ``step``; exactly once per step, unless finishing failed
  (``abandon``: the previous stage may send ``step`` again).
- **Reduce rounds** (``contribute``): replica ``i`` owns part ``i`` of the flat gradient; the sum of
  a part is complete when every replica contributed, added in peer-id order (identical everywhere).
  What a round carries (``exchange``): gradients, raw, after every step (synchronous replicas), or,
  with ``sync_every = H > 1``, encoded pseudo-gradients after every ``H``-th step and nothing between
  (``swarm.runtime.outer``). An overlapped sync's round outlives its step: its contributions are
  taken while this replica is up to ``H`` steps ahead of or behind it (``sync_window``), and it is closed when
  this replica's exchange ends (``close_round``).
- **Routing** (``route``): micro-batch ``mb`` goes to its own next-stage replica first, then the
  others; a replica that failed in the last ``retry_after_s`` is tried last; a banned one (it sent
  NaN/Inf) not at all.
- **Draining**: a leaving stage finishes the step in progress and takes no new one.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch

from swarm.errors import PeerUnavailable, RemoteProtocolError, SwarmError
from swarm.messages import CARRIES_INPUTS, GATHER, REDUCE, STAGE_REQUESTS, STEP, input_names
from swarm.refusals import Bans, short
from swarm.runtime.allreduce import parts
from swarm.runtime.outer import OuterCodec, OuterSettings
from swarm.wire import Header

MAX_CACHED_REPLIES = 256    # per step: bounds the memory a confused or hostile upstream can make us hold
RETRY_AFTER_S = 10.0        # a next-stage replica that failed is tried last for this long
GRADIENTS = OuterCodec("off")   # synchronous replicas: float32 gradient parts


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

    @property
    def senders(self) -> tuple[str, ...]:
        """Who sends this stage ``forward`` and ``step``: the previous stage's replicas, or itself."""
        return self.upstream or (self.me,)

    @property
    def others(self) -> tuple[str, ...]:
        """This stage's other replicas (the senders of ``reduce``)."""
        return tuple(p for p in self.replicas if p != self.me)


class StepStatus(Enum):
    CURRENT = "current"     # go ahead
    NEXT = "next"           # wait until this stage has stepped, then go ahead
    REPEAT = "repeat"       # a ``step`` for the step just applied: answer ``stepped`` at once
    FUTURE = "future"       # further ahead: refused, retry later
    STALE = "stale"         # refused


@dataclass
class Round:
    """The contributions to one part of the flat gradient in one step (any order)."""

    replicas: tuple[str, ...]
    numel: int
    got: dict[str, torch.Tensor] = field(default_factory=dict)
    skip: bool = False   # some replica's step overflowed: every replica skips it

    def add(self, peer: str, part: torch.Tensor, skip: bool = False) -> torch.Tensor | None:
        """Add ``peer``'s part (``skip``: its step overflowed); the sum over all replicas (peer-id order)
        once the last one came."""
        if peer not in self.replicas:
            raise RemoteProtocolError(f"peer {short(peer)} is not a replica of this stage")
        if part.dtype != torch.float32 or part.dim() != 1 or part.numel() != self.numel:
            raise RemoteProtocolError(f"gradient part must be float32 [{self.numel}], got {part.dtype} {list(part.shape)}")
        if peer in self.got:
            return None
        self.got[peer], self.skip = part, self.skip or skip
        if len(self.got) < len(self.replicas):
            return None
        total = torch.zeros(self.numel)
        for p in self.replicas:           # sorted: one summation order everywhere
            total += self.got[p]
        return total


class StageProtocol:
    """The protocol state of one stage of one plan. ``check_inputs`` checks a forward's announced
    input (shape, dtype) pairs against the traced boundary (raises ``SwarmError``)."""

    def __init__(self, hood: Neighbours, flat_numel: int, check_inputs: Callable[[list[tuple[list[int], str]]], None],
                 stage: int, bans: Bans | None = None, max_cached: int = MAX_CACHED_REPLIES,
                 outer: OuterSettings | None = None):
        self.hood = hood
        self.outer = outer if outer is not None and outer.sync_every > 1 else None   # None: synchronous replicas
        self.flat_numel = flat_numel
        self.check_inputs = check_inputs
        self.stage = stage
        self.bans = bans if bans is not None else Bans()   # peers that sent NaN/Inf (the node's table)
        self.max_cached = max_cached
        self.allowed = frozenset(hood.upstream) | frozenset(hood.replicas) - {hood.me}
        self.arrived: dict[int, set[str]] = {}
        self.finishing: set[int] = set()       # steps whose finish has begun (or is done)
        self.replies: dict[tuple[int, int], bytes] = {}   # (step, mb) answered: retries get the same reply
        self.rounds: dict[int, Round] = {}
        self.failed: dict[str, float] = {}     # next-stage replica -> tried last until (monotonic seconds)
        self.draining = False                  # finish the step in progress, take no new one

    # admission
    def refuse_stream(self, peer: str) -> SwarmError | None:
        """Why a stream from ``peer`` is refused after its length prefix, unread (None: read it)."""
        if self.bans.banned(peer):
            return RemoteProtocolError(f"peer {short(peer)} is banned for a while ({self.bans.until[peer][1]})")
        if peer not in self.allowed:
            return RemoteProtocolError(f"peer {short(peer)} is not a previous-stage replica or a replica of stage {self.stage}")
        return None

    def admit(self, sender: str, header: Header) -> None:
        """Raise ``RemoteProtocolError`` unless ``sender`` may send this request and its tensors are the
        ones its kind carries at this stage (checked on the header: nothing decoded yet)."""
        if sender != self.hood.me and (refused := self.refuse_stream(sender)) is not None:
            raise refused   # a stranger or a banned peer: not even the header is parsed
        if header.kind not in STAGE_REQUESTS:
            raise RemoteProtocolError(f"unknown request kind '{header.kind}'")
        if header.kind in (*CARRIES_INPUTS, STEP):
            allowed, what = self.hood.senders, "a previous-stage replica"
        else:
            allowed, what = self.hood.others, "a replica"
        if sender not in allowed:
            raise RemoteProtocolError(f"peer {sender[-8:]} is not {what} of stage {self.stage}")
        self._expect(header)

    def _expect(self, header: Header) -> None:
        shapes = header.shapes()
        if header.kind == STEP:
            if shapes:
                raise RemoteProtocolError("a step request carries no tensors")
        elif header.kind == GATHER:
            part = header.meta.get("part")
            if shapes:
                raise RemoteProtocolError("a gather request carries no tensors")
            if type(part) is not int or not 0 <= part < len(self.hood.replicas):
                raise RemoteProtocolError(f"part {part!r} is no part of {len(self.hood.replicas)} replicas")
            if not self.overlapped or self.exchange(header.meta.get("step")) is None:
                raise RemoteProtocolError(f"step {header.meta.get('step')!r} is no overlapped sync step of these replicas")
        elif header.kind == REDUCE:
            part = header.meta.get("part")
            if type(part) is not int or part != self.hood.replicas.index(self.hood.me):
                raise RemoteProtocolError(f"part {part!r} is not owned by this replica")
            codec = self.exchange(header.meta.get("step"))
            if codec is None:
                raise RemoteProtocolError(f"step {header.meta.get('step')!r} is no sync step of these replicas "
                                          f"(they sync every {self.outer.sync_every if self.outer else 1} steps)")
            lo, hi = parts(self.flat_numel, len(self.hood.replicas))[part]
            want = {k: (shape, dtype, "raw") for k, (shape, dtype) in codec.shapes(hi - lo).items()}
            if shapes != want:
                what = (f"one tensor 'g' (float32 [{hi - lo}], raw)" if codec is GRADIENTS else
                        f"the {codec.compression} tensors {str(want)[:120]}")
                raise RemoteProtocolError(f"a reduce request carries exactly {what}, not {str(shapes)[:120]}")
        else:
            inputs = input_names(header)
            if inputs is None:
                raise RemoteProtocolError(f"a forward request carries inputs x0, x1, ... without gaps (and targets), "
                                          f"not {sorted(shapes)[:8]}")
            try:
                self.check_inputs([(shapes[k][0], shapes[k][1]) for k in inputs])
            except SwarmError as e:
                raise RemoteProtocolError(str(e)) from None

    # steps
    @staticmethod
    def step_status(kind: str, step, current: int) -> StepStatus:
        if type(step) is not int:
            return StepStatus.STALE
        if kind == STEP and step == current - 1:
            return StepStatus.REPEAT
        if step == current:
            return StepStatus.CURRENT
        if step == current + 1:
            return StepStatus.NEXT
        return StepStatus.FUTURE if step > current else StepStatus.STALE

    @staticmethod
    def not_current(step, current: int) -> SwarmError:
        """The error for a request whose step is not (or did not become) the current one."""
        cls = PeerUnavailable if type(step) is int and step > current else RemoteProtocolError
        return cls(f"step {step!r} is not the current step {current}")

    def take_forward(self) -> None:
        """Raise unless a new micro-batch may start here (a draining stage takes no new step)."""
        if self.draining and not self.replies:
            raise PeerUnavailable("stage leaving: it takes no new step")

    def cached(self, step: int, mb: int) -> bytes | None:
        return self.replies.get((step, mb))

    def remember(self, step: int, mb: int, reply: bytes) -> None:
        if len(self.replies) < self.max_cached:
            self.replies[(step, mb)] = reply

    # the step barrier
    def arrive(self, step: int, sender: str) -> bool:
        """``sender`` is done with ``step``: True exactly when the step's finish should begin now."""
        self.arrived.setdefault(step, set()).add(sender)
        if set(self.hood.senders) <= self.arrived[step] and step not in self.finishing:
            self.finishing.add(step)
            return True
        return False

    def abandon(self, step: int) -> None:
        """Finishing ``step`` failed: its tables go, and the previous stage may send ``step`` again."""
        self.finishing.discard(step)
        self.arrived.pop(step, None)
        self.rounds.pop(step, None)

    def finished(self, step: int) -> None:
        """``step`` is applied here: forget it (the newest finished step stays in ``finishing`` so
        that late ``step`` repeats are recognised)."""
        self.arrived.pop(step, None)
        if not self.overlapped:
            self.rounds.pop(step, None)
        self.replies = {k: r for k, r in self.replies.items() if k[0] > step}
        self.finishing = {s for s in self.finishing if s >= step}

    # reduce rounds
    def exchange(self, step) -> OuterCodec | None:
        """What the replicas exchange after ``step``: raw gradients every step (synchronous), the encoded
        pseudo-gradient after a sync step, or nothing (None: one replica, an inner step, a bad step)."""
        if len(self.hood.replicas) < 2 or type(step) is not int:
            return None
        if self.outer is None:
            return GRADIENTS
        return self.outer.codec() if self.outer.syncs_after(step) else None

    @property
    def overlapped(self) -> bool:
        """Syncs run during the next inner steps (their rounds are kept until ``close_round``)."""
        return self.outer is not None and self.outer.overlap

    def sync_window(self, step, current: int) -> bool:
        """An overlapped sync of ``step`` may take contributions at step ``current``: its round is open
        here, or it is at most one sync period behind or ahead (replicas step at their own pace between
        syncs; each waits at its next sync for the previous exchange, so none gets further apart)."""
        if not (self.overlapped and type(step) is int and self.exchange(step) is not None):
            return False
        return step in self.rounds or abs(step - current) <= self.outer.sync_every

    def close_round(self, step: int) -> None:
        """``step``'s exchange ended here: its round goes, and any round a period or more older (a
        straggler's late contribution opened it again)."""
        period = self.outer.sync_every if self.outer is not None else 1
        self.rounds = {s: r for s, r in self.rounds.items() if s != step and s > step - period}

    def bounds(self) -> list[tuple[int, int]]:
        return parts(self.flat_numel, len(self.hood.replicas))

    @property
    def own_part(self) -> int:
        return self.hood.replicas.index(self.hood.me)

    def contribute(self, step: int, peer: str, part: torch.Tensor, skip: bool = False) -> torch.Tensor | None:
        """Add ``peer``'s contribution to this replica's part of ``step``; the sum once complete (and
        ``rounds[step].skip``: whether any replica's step overflowed)."""
        if step not in self.rounds:
            lo, hi = self.bounds()[self.own_part]
            self.rounds[step] = Round(self.hood.replicas, hi - lo)
        return self.rounds[step].add(peer, part, skip)

    # routing
    def route(self, mb: int, now: float) -> list[str]:
        """Next-stage replicas to try for ``mb``, in order (banned poisoners left out)."""
        recent = {p for p, until in self.failed.items() if until > now}
        return [p for p in self.hood.route(mb, recent) if not self.bans.banned(p)]

    def unreachable(self, peer: str, now: float, retry_after_s: float = RETRY_AFTER_S) -> None:
        self.failed[peer] = now + retry_after_s

    def between_steps(self, saved: bool, passing: bool) -> bool:
        """No micro-batch of an unfinished step has been answered or is in flight here (``saved``:
        the worker holds a pass's activations; ``passing``: a step is being passed downstream)."""
        return not self.replies and not saved and not self.arrived and not passing
