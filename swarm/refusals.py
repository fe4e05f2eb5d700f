"""What a node turns away, said once: rate-limited refusal logs and time-limited bans of peers.

Every defence against a hostile or broken peer (a bad frame, record, ballot, tensor) refuses the input
and goes on; ``Refusals`` names it in one log line per (peer, kind of refusal) and interval, and counts
the repeats, so a flood of bad input cannot flood the log either. ``Bans`` remembers peers that sent
something no honest peer sends (non-finite tensors) for a while. No I/O but logging (the
``swarm.refusals`` logger, or a ``log`` callable a caller hands in) and the event rows (``swarm.events``).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from swarm.events import NO_EVENTS, REFUSED, Events

LOG_INTERVAL_S = 60.0     # one line per (peer, kind) per minute at most
BAN_S = 300.0             # how long a peer that sent poison is refused


logger = logging.getLogger(__name__)


class CallableLogger:
    """A logger's ``info``/``warning``/``error`` as lines to a ``log`` callable, in the text
    ``swarm.logs`` prints (``warning: ...``, ``error: ...``): for callers that still hand one in."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log

    def info(self, message: str) -> None:
        self.log(message)

    def warning(self, message: str) -> None:
        self.log(f"warning: {message}")

    def error(self, message: str) -> None:
        self.log(f"error: {message}")


def lines_to(log: logging.Logger) -> Callable[[str], None]:
    """A ``log`` callable for code that still takes one: ``warning: `` / ``error: `` prefixed lines go
    to ``log`` at that level (without the prefix, which ``swarm.logs`` prints again), the rest at INFO."""
    def line(message: str) -> None:
        for prefix, level in (("warning: ", logging.WARNING), ("error: ", logging.ERROR)):
            if message.startswith(prefix):
                log.log(level, message[len(prefix):])
                return
        log.info(message)
    return line


def short(peer: str) -> str:
    """How logs name a peer: the last 8 characters of its id."""
    return peer[-8:] if peer else "?"


@dataclass
class Refusals:
    """``note(peer, kind, detail)``: log ``refused <kind> from <peer>: <detail>`` at most once per
    ``interval_s`` per (peer, kind), with a ``refused`` event row for each line (``events``);
    ``counts`` keeps every refusal."""

    log: Callable[[str], None] | None = None   # None: the ``swarm.refusals`` logger (INFO)
    events: Events = NO_EVENTS
    interval_s: float = LOG_INTERVAL_S
    clock: Callable[[], float] = time.monotonic
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    _logged_at: dict[tuple[str, str], tuple[float, int]] = field(default_factory=dict)

    def note(self, peer: str, kind: str, detail: str) -> bool:
        """Count one refusal; True if it was logged now."""
        key = (peer, kind)
        self.counts[key] = n = self.counts.get(key, 0) + 1
        now = self.clock()
        last = self._logged_at.get(key)
        if last is not None and now - last[0] < self.interval_s:
            return False
        if len(self._logged_at) > 4096:   # bounded whatever the number of peers
            self._logged_at.clear()
        more = f" ({n - last[1] - 1} more since the last line)" if last is not None and n - last[1] > 1 else ""
        self._logged_at[key] = (now, n)
        (self.log or logger.info)(f"refused {kind} from {short(peer)}: {detail}{more}")
        self.events.emit(REFUSED, **{"from": peer, "kind": kind, "detail": detail})
        return True

    def total(self, kind: str | None = None) -> int:
        return sum(n for (_, k), n in self.counts.items() if kind is None or k == kind)


@dataclass
class Bans:
    """Peers refused until a deadline, with the reason (the newest one)."""

    ban_s: float = BAN_S
    clock: Callable[[], float] = time.monotonic
    until: dict[str, tuple[float, str]] = field(default_factory=dict)

    def ban(self, peer: str, reason: str) -> None:
        self.until[peer] = (self.clock() + self.ban_s, reason)

    def banned(self, peer: str) -> bool:
        entry = self.until.get(peer)
        if entry is None:
            return False
        if entry[0] <= self.clock():
            del self.until[peer]
            return False
        return True

    def active(self) -> dict[str, str]:
        """Banned peers now -> reason."""
        return {p: reason for p, (t, reason) in list(self.until.items()) if self.banned(p)}
