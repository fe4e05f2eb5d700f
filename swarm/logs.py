"""How a node's log reads: every module logs through ``logging.getLogger(__name__)``; the entry
points (``node.py run``, ``demo``, ``bootstrap``) call ``setup`` once.

Lines are plain text for a person: ``message`` for INFO, ``warning: message`` for WARNING,
``error: message`` for ERROR and above. No program reads them: the node's address and role are in
its ready file (``node.py run --ready-file``) and ``node.py status --json``; what training did is in
the metrics rows (``training.metrics_path``).
"""
from __future__ import annotations

import logging
import sys
from typing import TextIO

_PREFIX = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "error: "}


class LineFormatter(logging.Formatter):
    """``message`` with a ``warning: `` / ``error: `` prefix by level (no time, no logger name)."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            text += "\n" + self.formatException(record.exc_info)
        return _PREFIX.get(record.levelno, "") + text


def setup(stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Send the ``swarm`` loggers' lines to ``stream`` (stdout by default), flushed per line."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(LineFormatter())
    root = logging.getLogger("swarm")
    for old in [h for h in root.handlers if isinstance(h.formatter, LineFormatter)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
