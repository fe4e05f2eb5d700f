"""Checking what peers send a stage, before and while it is decoded: a header must announce what the
receiver expects, tensors must be finite (else the sender is banned for a while), and every refusal
is counted and logged (rate-limited)."""
from __future__ import annotations

from swarm.errors import Poisoned, RemoteProtocolError, SwarmError
from swarm.messages import ERROR
from swarm.refusals import Bans, Refusals, short
from swarm.runtime.counters import Counters
from swarm.wire import Header, Limits, Message, decode, non_finite, read_header


def peer_header(frame: bytes, limits: Limits) -> Header:
    """``read_header`` of a peer's frame: a malformed one is the peer's fault (``RemoteProtocolError``)."""
    try:
        return read_header(frame, limits)
    except SwarmError as e:
        raise RemoteProtocolError(str(e)) from None


def refuse_non_finite(bans: Bans, sender: str, kind: str, tensors: dict) -> dict:
    """``tensors`` if they are all finite; else ``sender`` is banned for a while and this raises
    ``Poisoned`` naming the first bad tensor (every protocol's NaN/Inf rule, docs/hostile.md)."""
    bad = non_finite(tensors)
    if bad is not None:
        bans.ban(sender, f"sent {kind} with NaN/Inf")
        raise Poisoned(f"{kind}: {bad}; peer {short(sender)} banned for {bans.ban_s:.0f} s")
    return tensors


class FrameChecker:
    """Reads frames for one stage: ``limits`` bound every header, ``bans`` is the node's table of
    poisoners, refusals land in ``counters`` and ``refusals``."""

    def __init__(self, limits: Limits, bans: Bans, counters: Counters, refusals: Refusals):
        self.limits = limits
        self.bans = bans
        self.counters = counters
        self.refusals = refusals

    def header(self, frame: bytes) -> Header:
        return peer_header(frame, self.limits)

    def decode(self, frame: bytes, header: Header, sender: str, masks: dict | None = None) -> Message:
        """``decode``, refusing tensors with NaN or Inf (their sender is banned for a while)."""
        try:
            msg = decode(frame, header, self.limits, masks)
        except SwarmError as e:
            raise RemoteProtocolError(str(e)) from None
        try:
            refuse_non_finite(self.bans, sender, header.kind, msg.tensors)
        except Poisoned:
            self.counters.poisoned += 1
            raise
        return msg

    def reply(self, frame: bytes, peer: str, kind: str, expect: dict[str, tuple[list[int], str]],
              masks: dict | None = None) -> Message:
        """A reply of ``kind`` (or ``error``) from ``peer`` whose tensors must be among ``expect`` (name ->
        shape, dtype), checked on the header before decoding, and finite (else ``peer`` is banned);
        a refused reply is counted and logged."""
        try:
            header = self.header(frame)
            if header.kind not in (kind, ERROR):
                raise RemoteProtocolError(f"a {header.kind!r} reply where {kind!r} was expected")
            for name, (shape, dtype, _) in header.shapes().items():
                if name not in expect or (shape, dtype) != tuple(expect[name]):
                    raise RemoteProtocolError(f"{kind}: tensor '{name}' {dtype} {shape[:8]} is not one this stage expects")
            return self.decode(frame, header, peer, masks)
        except RemoteProtocolError as e:
            self.counters.refused += 1
            self.refusals.note(peer, f"{kind} reply", str(e))
            raise
