"""Process wiring of a node before it takes part in anything: multiaddrs and peer lists checked, the
identity and a private swarm's authorizer, the ports free, the DHT started (every failure one line)."""
from __future__ import annotations

import errno
import socket
from pathlib import Path

from multiaddr import Multiaddr

from swarm.config import NetworkConfig
from swarm.errors import ConfigError, SwarmError
from swarm.net.auth import Identity, SwarmAuthorizer, load_identity, read_credential
from swarm.net.membership import Membership, MembershipView, SwarmDHT, make_validators

PUBLIC_PEERS = Path(__file__).resolve().parents[2] / "bootstrap" / "peers.txt"


def check_maddrs(values: list[str], what: str, need_peer_id: bool = False) -> list[str]:
    """Validate libp2p multiaddrs (``multiaddr`` package); hivemind gets the strings."""
    for value in values:
        try:
            addr = Multiaddr(value)
        except Exception as e:  # the package raises several types (StringParseError, ValueError, ...)
            raise SwarmError(f"invalid multiaddr in {what}: '{value}' ({e})") from None
        if need_peer_id and "p2p" not in [p.name for p in addr.protocols()]:
            raise SwarmError(f"{what}: '{value}' lacks /p2p/<peer id>")
    return list(values)


def read_peer_list(path: str | Path) -> list[str]:
    """Multiaddrs from a peer-list file: one per line, '#' comments and blank lines ignored."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise SwarmError(f"cannot read peer list {path}: {e.strerror}") from None
    peers = [line.split("#", 1)[0].strip() for line in lines]
    return check_maddrs([p for p in peers if p], f"peer list {path}", need_peer_id=True)


def initial_peers(net: NetworkConfig) -> list[str]:
    return list(net.initial_peers) if net.initial_peers is not None else read_peer_list(PUBLIC_PEERS)


def node_identity(net: NetworkConfig) -> Identity:
    """The persistent identity: p2pd's key, which also signs the member record."""
    return load_identity(net.identity_path or "~/.swarm/identity")


def private_swarm(net: NetworkConfig, identity: Identity) -> SwarmAuthorizer | None:
    """The authorizer for a private swarm (``credentials_path`` set), else None for a public one."""
    return SwarmAuthorizer(identity, read_credential(net.credentials_path)) if net.credentials_path else None


def tcp_ports(maddrs: list[str]) -> list[tuple[int, str, int]]:
    """(address family, host, port) of each ``/ip4|ip6/<host>/tcp/<port>`` multiaddr with a port != 0."""
    out = []
    for value in maddrs:
        parts = value.split("/")
        if len(parts) >= 5 and parts[1] in ("ip4", "ip6") and parts[3] == "tcp" and parts[4].isdigit() and int(parts[4]):
            out.append((socket.AF_INET if parts[1] == "ip4" else socket.AF_INET6, parts[2], int(parts[4])))
    return out


def port_in_use(family: int, host: str, port: int) -> bool:
    """Something listens on ``host:port`` (or would clash with a listener there): a plain bind without
    SO_REUSEPORT fails, or a connection to it is accepted. libp2p binds with SO_REUSEPORT, so a
    second p2pd on a busy port would start silently; this check does not."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # a port in TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return True
            raise
    wildcard = host in ("0.0.0.0", "::")
    target = ("127.0.0.1" if family == socket.AF_INET else "::1") if wildcard else host
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex((target, port)) == 0


def check_ports(net: NetworkConfig) -> None:
    """Fail now, in one line, if a TCP port of ``host_maddrs`` is taken."""
    for family, host, port in tcp_ports(net.host_maddrs):
        try:
            busy = port_in_use(family, host, port)
        except OSError:   # e.g. an address of another machine: p2pd says so itself
            continue
        if busy:
            raise ConfigError(f"cannot listen on {', '.join(net.host_maddrs)}: address already in use")


def daemon_options(net: NetworkConfig, initial_peers: list[str]) -> tuple[dict, dict]:
    """(hivemind ``P2P.create`` options, extra p2pd flags) for reachability, relays and hole punching
    (docs/nat.md). Relays: the configured ones, else the initial peers, found without discovery (it
    takes minutes); the relay service's limits go to the daemon as they are configured."""
    relay = net.relay
    relays = check_maddrs(relay.peers, "network.relay.peers", need_peer_id=True) if relay.peers is not None else initial_peers
    reserve = relay.use and bool(relays)   # p2pd refuses trusted relays without auto-relay, and the reverse
    options = dict(use_relay=True, use_auto_relay=reserve, trusted_relays=relays if reserve else None,
                   auto_nat=net.hole_punching, force_reachability=None if net.reachability == "auto" else net.reachability)
    flags = dict(relayService=relay.serve, relayDiscovery=False, relayDataLimit=int(relay.data_limit_mb * (1 << 20)),
                 relayTimeLimit=f"{relay.time_limit_s:g}s", relayMaxCircuits=relay.max_circuits)
    return options, flags


def start_dht(net: NetworkConfig, initial_peers: list[str], validators: list, identity: str | None,
              client_mode: bool = False, authorizer: SwarmAuthorizer | None = None) -> SwarmDHT:
    """Start and join; every failure becomes one line (bad port, port taken, unreachable bootstrap, bad
    identity). A client (``client_mode``) may share a port with a node on this machine."""
    check_maddrs(net.host_maddrs, "host_maddrs")
    check_maddrs(net.announce_maddrs, "announce_maddrs")
    check_maddrs(initial_peers, "initial peers", need_peer_id=True)
    if not client_mode:
        check_ports(net)
    options, flags = daemon_options(net, initial_peers)
    try:
        return SwarmDHT(initial_peers=initial_peers, start=True, host_maddrs=net.host_maddrs,
                        announce_maddrs=net.announce_maddrs or None, identity_path=identity,
                        record_validators=validators, startup_timeout=net.startup_timeout_s, client_mode=client_mode,
                        authorizer=authorizer, daemon_flags=flags, **options)
    except Exception as e:
        text = " ".join(str(e).split()) or type(e).__name__
        if "bootstrap" in text:
            private = " and admitted this node (credentials of this swarm?)" if authorizer else ""
            raise SwarmError(f"no bootstrap peer reachable{private} ({', '.join(initial_peers)}) within "
                             f"{net.startup_timeout_s:.0f} s") from None
        if "address already in use" in text.lower():
            raise SwarmError(f"cannot listen on {', '.join(net.host_maddrs)}: address already in use") from None
        if identity and ("identity" in text.lower() or "key" in text.lower()):
            raise SwarmError(f"cannot use identity file {identity}: {text[:200]}") from None
        raise SwarmError(f"cannot start the DHT: {text[:300]}") from None


def read_members(net: NetworkConfig, timeout_s: float = 10.0) -> MembershipView:
    """Join as a client (no record of its own; a fresh p2p identity) and read the membership view.
    In a private swarm the node's identity key and credential authorize the reads."""
    authorizer = private_swarm(net, load_identity(net.identity_path or "~/.swarm/identity", create=False)) \
        if net.credentials_path else None
    validators = make_validators(net.prefix)
    dht = start_dht(net, initial_peers(net), validators, identity=None, client_mode=True, authorizer=authorizer)
    try:
        checker = authorizer.checker if authorizer else None
        return Membership(dht, validators[0], net.prefix, net.ttl_s, checker).view(timeout_s)
    finally:
        dht.shutdown()
