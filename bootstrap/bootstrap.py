"""A bootstrap peer: a DHT-only node that new nodes dial first.

    python -m bootstrap.bootstrap [--host-maddrs /ip4/0.0.0.0/tcp/31337] [--identity PATH] [--prefix swarm]
        [--credentials FILE]

Prints its multiaddrs (put them in a peer list, see peers.txt), serves until SIGINT/SIGTERM.
"""
from __future__ import annotations

import argparse
import sys

from swarm.config import NetworkConfig, validate
from swarm.errors import SwarmError
from swarm.net.membership import make_validators
from swarm.node import check_maddrs, node_identity, private_swarm, start_dht, stop_on_signals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host-maddrs", nargs="+", default=["/ip4/0.0.0.0/tcp/31337"])
    parser.add_argument("--announce-maddrs", nargs="*", default=[])
    parser.add_argument("--initial-peers", nargs="*", default=[], help="other bootstrap peers to link with")
    parser.add_argument("--identity", default="~/.swarm/bootstrap.identity")
    parser.add_argument("--prefix", default="swarm")
    parser.add_argument("--credentials", help="private swarm: this peer's credential (see docs/private-swarm.md)")
    args = parser.parse_args(argv)
    try:
        net = validate(NetworkConfig, {"host_maddrs": args.host_maddrs, "announce_maddrs": args.announce_maddrs,
                                       "initial_peers": args.initial_peers, "identity_path": args.identity,
                                       "prefix": args.prefix, "credentials_path": args.credentials}, "bootstrap flags")
        check_maddrs(net.initial_peers, "--initial-peers", need_peer_id=True)
        identity = node_identity(net)
        dht = start_dht(net, net.initial_peers, make_validators(net.prefix, identity.key), identity.path,
                        authorizer=private_swarm(net, identity))
    except SwarmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        with stop_on_signals() as stop:
            for addr in dht.get_visible_maddrs():
                print(addr, flush=True)
            stop.wait()
            return 0
    finally:
        dht.shutdown()


if __name__ == "__main__":
    sys.exit(main())
