"""The node: the composition root (docs/architecture.md).

- ``swarm.loop``: the node's one asyncio thread and ``call_sync``; ``signals``: SIGINT/SIGTERM, lock-free;
- ``setup``: multiaddrs, identity, ports, starting the DHT, ``read_members`` (``node.py status``);
- ``probes``: link probes and liveness pings; ``ready``: the ready file;
- ``node``: ``Node`` (start / tick / leave) and ``run_node`` (``node.py run``).

Names are loaded on first use, so ``import swarm.node`` stays light.
"""
from __future__ import annotations

import importlib

_WHERE = {
    "NodeLoop": "swarm.loop",
    "StopFlag": "signals", "stop_on_signals": "signals",
    "PUBLIC_PEERS": "setup", "check_maddrs": "setup", "check_ports": "setup", "initial_peers": "setup",
    "node_identity": "setup", "port_in_use": "setup", "private_swarm": "setup", "read_members": "setup",
    "read_peer_list": "setup", "start_dht": "setup",
    "LinkAdvert": "probes", "ProbeSchedule": "probes",
    "ready_info": "ready", "write_ready": "ready",
    "Node": "node", "run_node": "node", "steady": "node",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        where = _WHERE[name]
        value = getattr(importlib.import_module(where if "." in where else f"swarm.node.{where}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'swarm.node' has no attribute {name!r}")
