"""The ready file (``node.py run --ready-file PATH``): where a program that started a node learns its
address and part, instead of reading its log. JSON, rewritten at start-up and after every heartbeat,
always to a temporary name first and then renamed, so a reader never sees half of it:
``peer_id``, ``maddrs``, ``state``, ``role``, ``stage``, ``step``, ``plan_hash`` (the committed plan),
``ready`` (the plan whose stage runs here, state in place), ``pid``, ``updated_at``."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from swarm.net.records import MemberRecord


def ready_info(record: MemberRecord) -> dict:
    return {"peer_id": record.peer_id, "maddrs": [str(a) for a in record.maddrs], "state": str(record.state),
            "role": record.role, "stage": record.stage, "step": record.step, "plan_hash": record.committed_hash,
            "ready": record.ready, "pid": os.getpid(), "updated_at": time.time()}


def write_ready(path: str | Path, info: dict) -> None:
    """Write ``info`` as JSON to ``path`` atomically (a temporary name in the same directory, then
    ``os.replace``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(info))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
