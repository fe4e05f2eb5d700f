"""What a node did, as rows other programs read: event rows in the metrics file (``training.metrics_path``).

A step row (``swarm.runtime.metrics``) says how one step went; an event row says that something
happened: ``{"event": <kind>, "peer": <this node>, "time": <unix s>, ...fields}``. Tests, the demo and
benchmarks read these instead of the human log. Kinds and their fields (docs/runtime.md, "Metrics"):

- ``commit``: ``epoch``, ``plan_hash``, ``members`` (count), ``reason``, ``role`` (or null), ``stages``
  (the plan's peer ids, one list of replicas per stage; empty when the plan is unknown here);
- ``training``: ``stage``, ``stages`` (count), ``step`` (the first step this node trains), ``ops``,
  ``fetched`` (ops fetched from peers), ``donors`` (their ids);
  ``initial`` (ops starting from initial weights, no state of them anywhere), ``lost_steps`` (the most
  steps of its ops' training lost, restored from an older snapshot);
- ``left``: ``handed_over`` (the others took this node's state over in time), ``served`` (op states sent),
  ``finished`` (true: it left because the swarm reached ``training.max_steps``);
- ``refused``: ``from`` (the refused peer), ``kind``, ``detail``: one per logged refusal (rate-limited
  as the log line is, so a flood cannot fill the file).

No dependency beyond the standard library: the election and the codec layers may use it.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

COMMIT, TRAINING, LEFT, REFUSED = "commit", "training", "left", "refused"


def append_row(path: str, row: dict) -> None:
    """One JSON line appended in one write (rows of several processes may share a file)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


@dataclass(frozen=True)
class Events:
    """``emit(event, **fields)`` appends an event row to ``path`` (nothing when ``path`` is None)."""

    path: str | None = None
    peer: str = ""

    def emit(self, event: str, /, **fields) -> None:
        if not self.path:
            return
        try:
            append_row(self.path, {"event": event, "peer": self.peer, "time": time.time(), **fields})
        except OSError as e:   # the metrics file is a report: losing a row must not stop training
            logger.warning(f"cannot append to the metrics file {self.path}: {e.strerror or e}")


NO_EVENTS = Events()
