"""How stages reach each other and what the node hears of them: the stage protocol's name, its callers
(over libp2p, or between servers of one process) and ``StepHooks``."""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from swarm.errors import PeerUnavailable
from swarm.net.streams import Call, stream_caller
from swarm.wire import Limits

PROTOCOL = "swarm.stage.v1"
LOCAL_REPLY = b""   # what the reply cache holds for a micro-batch the first stage's own driver ran


@dataclass
class StepHooks:
    """What the node wants to hear from a stage: ``before_apply(step)`` runs (awaited) before each
    optimizer step (the backup gate), ``stepped(step)`` after it (metrics, checkpoints)."""

    stepped: Callable[[int], None] | None = None
    before_apply: Callable[[int], Awaitable[None]] | None = None



def stage_caller(p2p, limits: Limits = Limits(), timeout_s: float = 120.0) -> Call:
    """``call(peer, frame) -> reply frame`` of the stage protocol over libp2p."""
    return stream_caller(p2p, limits.max_frame_bytes, timeout_s, PROTOCOL)


def local_caller(me: str, servers: dict) -> Call:
    """``call`` between stage servers of one process (tests, benchmarks): the same frames, no daemon."""
    async def call(peer: str, frame: bytes) -> bytes:
        if peer not in servers:
            raise PeerUnavailable(f"peer {peer[-8:]} unreachable (not in this process)")
        return await servers[peer].answer(frame, me)
    return call
