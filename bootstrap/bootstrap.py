"""A bootstrap peer: a DHT-only node that new nodes dial first.

    python -m bootstrap.bootstrap [--host-maddrs /ip4/0.0.0.0/tcp/31337] [--identity PATH] [--prefix swarm]
        [--credentials FILE] [--ready-file PATH] [--no-relay] [--relay-data-limit-mb N] [--relay-time-limit-s S]

It is also a circuit relay for nodes behind NAT (with the limits given; docs/nat.md) and answers
their dial-back requests (``swarm.reach.v1``). The relay's limits hold once the daemon knows it is
public, which takes a second public peer to dial it back: link two bootstrap peers
(``--initial-peers``), or run one beside a public node.

Prints its multiaddrs (put them in a peer list, see peers.txt), serves until SIGINT/SIGTERM. A program
that starts it reads them from ``--ready-file`` (JSON, as ``node.py run --ready-file`` writes: peer_id,
maddrs, state, role "bootstrap", pid, updated_at).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from swarm import logs
from swarm.config import NetworkConfig, RelayConfig, validate
from swarm.errors import SwarmError
from swarm.loop import NodeLoop
from swarm.net.membership import make_validators
from swarm.net.reach import ReachHelper
from swarm.node import check_maddrs, node_identity, private_swarm, start_dht, stop_on_signals
from swarm.node.ready import write_ready


def _ready(path: str, peer_id: str, maddrs: list[str], state: str) -> None:
    write_ready(path, {"peer_id": peer_id, "maddrs": maddrs, "state": state, "role": "bootstrap", "stage": None,
                       "step": None, "plan_hash": None, "ready": None, "pid": os.getpid(),
                       "updated_at": time.time()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host-maddrs", nargs="+", default=["/ip4/0.0.0.0/tcp/31337"])
    parser.add_argument("--announce-maddrs", nargs="*", default=[])
    parser.add_argument("--initial-peers", nargs="*", default=[], help="other bootstrap peers to link with")
    parser.add_argument("--identity", default="~/.swarm/bootstrap.identity")
    parser.add_argument("--prefix", default="swarm")
    parser.add_argument("--credentials", help="private swarm: this peer's credential (see docs/private-swarm.md)")
    parser.add_argument("--ready-file", metavar="PATH", help="JSON with the peer id and multiaddrs, once it listens")
    parser.add_argument("--no-relay", action="store_true", help="do not relay for nodes behind NAT")
    defaults = RelayConfig()
    parser.add_argument("--relay-data-limit-mb", type=float, default=defaults.data_limit_mb,
                        help="bytes one relayed connection may carry per direction (MiB)")
    parser.add_argument("--relay-time-limit-s", type=float, default=defaults.time_limit_s,
                        help="the longest a relayed connection may last")
    args = parser.parse_args(argv)
    logs.setup()
    try:
        relay = {"serve": not args.no_relay, "use": False, "data_limit_mb": args.relay_data_limit_mb,
                 "time_limit_s": args.relay_time_limit_s}
        net = validate(NetworkConfig, {"host_maddrs": args.host_maddrs, "announce_maddrs": args.announce_maddrs,
                                       "initial_peers": args.initial_peers, "identity_path": args.identity,
                                       "prefix": args.prefix, "credentials_path": args.credentials, "relay": relay},
                       "bootstrap flags")
        check_maddrs(net.initial_peers, "--initial-peers", need_peer_id=True)
        identity = node_identity(net)
        dht = start_dht(net, net.initial_peers, make_validators(net.prefix, identity.key), identity.path,
                        authorizer=private_swarm(net, identity))
    except SwarmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    loop = NodeLoop()
    try:
        p2p = loop.call_sync(dht.replicate_p2p())
        loop.call_sync(ReachHelper(p2p).serve())   # dial-backs for nodes that ask whether they are reachable
        with stop_on_signals() as stop:
            maddrs = [str(a) for a in dht.get_visible_maddrs()]
            for addr in maddrs:
                print(addr, flush=True)   # the program's output: a peer list's lines
            if args.ready_file:
                _ready(args.ready_file, identity.peer_id, maddrs, "online")
            stop.wait()
            if args.ready_file:
                _ready(args.ready_file, identity.peer_id, maddrs, "offline")
            return 0
    finally:
        loop.close()
        dht.shutdown()


if __name__ == "__main__":
    sys.exit(main())
