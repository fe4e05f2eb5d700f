"""A geo-distributed testbed on one Linux machine: sites of nodes in network namespaces behind one
bridge (the "internet"), per-destination rates with ``tc htb``, per-node CPU quotas with cgroup v1,
and sites behind a NAT router of their own. Needs root (and ``iptables`` for NAT sites).

    python -m swarm.testbed up configs/scenarios/geo.yaml      # bring it up, print it, hold until Ctrl-C

Node ``i`` lives in namespace ``swtb-<i>`` at ``<subnet>.<10 + i>`` (subnet ``10.77.0`` unless the
scenario says otherwise); the host reaches every public node through the bridge at ``<subnet>.1``.
A site with ``nat: cone`` or ``nat: symmetric`` sits behind a router (namespace ``swtb-r<k>``, WAN
address ``<subnet>.<2 + k>`` on the bridge): its nodes live on the home LAN ``192.168.<k>.0/24``
(node ``i`` at ``192.168.<k>.<10 + i>``), the router masquerades what they send (``symmetric``: a
random port per connection, so hole punching must fail) and drops unsolicited inbound traffic. A
scenario with NAT sites defaults to a public-looking subnet (``11.77.0``): libp2p ignores private
addresses for AutoNAT and hole punching. Traffic stays on the testbed's bridge either way.

Each node shapes its own egress: one htb class per destination address at the rate between the
sites, so every direction of every pair is shaped. Everything the testbed creates carries the
``swtb`` prefix; ``down`` (also run on exit, on SIGINT/SIGTERM, and first thing in ``up`` for
leftovers of a killed run) removes processes, namespaces, links and cgroups.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveInt

from swarm import logs
from swarm.config import Strict, load
from swarm.errors import SwarmError
from swarm.procs import kill_group, poll_until

PREFIX = "swtb"
BRIDGE = f"{PREFIX}-br"
LAN_BRIDGE = f"{PREFIX}lan"   # inside each NAT router's namespace: the home LAN
SUBNET = "10.77.0"
NAT_SUBNET = "11.77.0"   # public-looking (see the module docstring)
MAX_NAT_SITES = 8
CGROUP = Path("/sys/fs/cgroup/cpu") / PREFIX
PERIOD_US = 100_000


class SiteSpec(Strict):
    nodes: PositiveInt = 1
    cpu: float | list[float] = Field(default=1.0, description="CPU share of one core per node (or one per node)")
    nat: Literal["none", "cone", "symmetric"] = Field(
        default="none", description="none: public addresses; cone: behind a router that keeps a connection's "
        "port (hole punching can work); symmetric: a random port per connection (it cannot)")


class Scenario(Strict):
    """Sites, their sizes and the bandwidth inside and between them (Mbit/s)."""

    name: str = ""
    sites: dict[str, SiteSpec]
    inside_mbit: float = Field(default=1000.0, gt=0)
    between_mbit: float = Field(default=1000.0, gt=0)
    site_mbit: dict[str, float] = Field(default_factory=dict, description="a site whose links to every other site "
                                        "run at this rate (its uplink), when slower than between_mbit")
    subnet: str | None = Field(default=None, pattern=r"^\d{1,3}\.\d{1,3}\.\d{1,3}$",
                               description=f"the bridge's /24 (None: {SUBNET}, or {NAT_SUBNET} with NAT sites)")

    def nat_sites(self) -> list[str]:
        """The sites behind a NAT router, in order (router ``k`` serves the ``k``-th)."""
        return [site for site, spec in self.sites.items() if spec.nat != "none"]

    def public_subnet(self) -> str:
        return self.subnet or (NAT_SUBNET if self.nat_sites() else SUBNET)

    def nodes(self) -> list[tuple[str, float]]:
        """(site, CPU share) of every node, in order."""
        out = []
        for site, spec in self.sites.items():
            shares = spec.cpu if isinstance(spec.cpu, list) else [spec.cpu] * spec.nodes
            if len(shares) != spec.nodes or not all(0 < s <= 64 for s in shares):
                raise SwarmError(f"scenario site '{site}': cpu must be one share or {spec.nodes} shares in (0, 64]")
            out += [(site, s) for s in shares]
        return out

    def mbit(self, a: str, b: str) -> float:
        """The rate from site ``a`` to site ``b``."""
        if a == b:
            return self.inside_mbit
        return min([self.between_mbit] + [self.site_mbit[s] for s in (a, b) if s in self.site_mbit])


def lan(k: int) -> str:
    """The /24 of the home LAN behind NAT router ``k``."""
    return f"192.168.{k}"


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if check and result.returncode:
        raise SwarmError(f"testbed: `{' '.join(cmd)}` failed: {result.stderr.strip()[:200]}")
    return result


@dataclass
class Testbed:
    __test__ = False   # not a pytest test class
    scenario: Scenario
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def hosts(self) -> list[str]:
        """Each node's own address (a home LAN address behind a NAT router)."""
        nats, net = self.scenario.nat_sites(), self.scenario.public_subnet()
        return [f"{lan(nats.index(site))}.{10 + i}" if site in nats else f"{net}.{10 + i}"
                for i, (site, _) in enumerate(self.scenario.nodes())]

    def router(self, site: str) -> str | None:
        """The WAN address of ``site``'s NAT router (None: a public site)."""
        nats = self.scenario.nat_sites()
        return f"{self.scenario.public_subnet()}.{2 + nats.index(site)}" if site in nats else None

    def address(self, j: int, seen_from: int) -> str:
        """The address node ``seen_from`` reaches node ``j`` at: its own inside a site, else the
        site's router (NAT) or its own (public)."""
        nodes = self.scenario.nodes()
        site = nodes[j][0]
        return self.hosts[j] if site == nodes[seen_from][0] else (self.router(site) or self.hosts[j])

    def namespace(self, i: int) -> str:
        return f"{PREFIX}-{i}"

    def router_namespace(self, k: int) -> str:
        return f"{PREFIX}-r{k}"

    def interface(self, i: int) -> str:
        """Node ``i``'s network interface (inside its namespace)."""
        return f"{PREFIX}{i}n"

    def up(self) -> Testbed:
        if os.geteuid() != 0:
            raise SwarmError("the testbed needs root (network namespaces, tc, cgroups): run it with sudo")
        down()
        nodes, nats = self.scenario.nodes(), self.scenario.nat_sites()
        if len(nodes) > 200:
            raise SwarmError(f"scenario has {len(nodes)} nodes; the testbed takes at most 200")
        if len(nats) > MAX_NAT_SITES:
            raise SwarmError(f"scenario has {len(nats)} NAT sites; the testbed takes at most {MAX_NAT_SITES}")
        if nats and not shutil.which("iptables"):
            raise SwarmError("NAT sites need iptables (apt-get install iptables)")
        try:
            _sh("ip", "link", "add", BRIDGE, "type", "bridge")
            _sh("ip", "addr", "add", f"{self.scenario.public_subnet()}.1/24", "dev", BRIDGE)
            _sh("ip", "link", "set", BRIDGE, "up")
            for k, site in enumerate(nats):
                self._router(k, site)
            CGROUP.mkdir(exist_ok=True)
            for i, (site, share) in enumerate(nodes):
                ns, host, peer = self.namespace(i), f"{PREFIX}{i}h", self.interface(i)
                _sh("ip", "netns", "add", ns)
                _sh("ip", "link", "add", host, "type", "veth", "peer", "name", peer)
                _sh("ip", "link", "set", peer, "netns", ns)
                if site in nats:   # the host end goes into the router, onto the home LAN
                    router = self.router_namespace(nats.index(site))
                    _sh("ip", "link", "set", host, "netns", router)
                    _sh("ip", "-n", router, "link", "set", host, "master", LAN_BRIDGE, "up")
                else:
                    _sh("ip", "link", "set", host, "master", BRIDGE, "up")
                _sh("ip", "-n", ns, "addr", "add", f"{self.hosts[i]}/24", "dev", peer)
                _sh("ip", "-n", ns, "link", "set", peer, "up")
                _sh("ip", "-n", ns, "link", "set", "lo", "up")
                if site in nats:
                    _sh("ip", "-n", ns, "route", "add", "default", "via", f"{lan(nats.index(site))}.1")
                self._shape(i, ns, peer, site, nodes)
                group = CGROUP / str(i)
                group.mkdir(exist_ok=True)
                (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (group / "cpu.cfs_quota_us").write_text(str(int(share * PERIOD_US)))
        except BaseException:
            down()
            raise
        return self

    def _router(self, k: int, site: str) -> None:
        """Site ``site``'s NAT router: WAN on the bridge, a LAN bridge for the homes' nodes, masquerade
        out, nothing in that the router did not see go out (``symmetric``: a random port per connection)."""
        ns, wan = self.router_namespace(k), f"{PREFIX}r{k}n"
        _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", f"{PREFIX}r{k}h", "type", "veth", "peer", "name", wan)
        _sh("ip", "link", "set", wan, "netns", ns)
        _sh("ip", "link", "set", f"{PREFIX}r{k}h", "master", BRIDGE, "up")
        _sh("ip", "-n", ns, "addr", "add", f"{self.router(site)}/24", "dev", wan)
        _sh("ip", "-n", ns, "link", "set", wan, "up")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "-n", ns, "link", "add", LAN_BRIDGE, "type", "bridge")
        _sh("ip", "-n", ns, "addr", "add", f"{lan(k)}.1/24", "dev", LAN_BRIDGE)
        _sh("ip", "-n", ns, "link", "set", LAN_BRIDGE, "up")
        ipt = ("ip", "netns", "exec", ns, "iptables")
        _sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        random_ports = ["--random-fully"] if self.scenario.sites[site].nat == "symmetric" else []
        _sh(*ipt, "-t", "nat", "-A", "POSTROUTING", "-o", wan, "-j", "MASQUERADE", *random_ports)
        for chain in ("FORWARD", "INPUT"):   # to the homes and to the router itself
            _sh(*ipt, "-A", chain, "-i", wan, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
            _sh(*ipt, "-A", chain, "-i", wan, "-j", "DROP")

    def _shape(self, i: int, ns: str, dev: str, site: str, nodes: list[tuple[str, float]]) -> None:
        """Egress of node ``i``: one htb class per destination address at the rate between the sites
        (the nodes of a NAT site share their router's address, and so one class)."""
        tc = ("ip", "netns", "exec", ns, "tc")
        _sh(*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "9999")
        _sh(*tc, "class", "add", "dev", dev, "parent", "1:", "classid", "1:9999", "htb", "rate", "10gbit")
        classes = {}
        for j, (other, _) in enumerate(nodes):
            if j != i:
                classes.setdefault(self.address(j, seen_from=i), (j, self.scenario.mbit(site, other)))
        for k, site_ in enumerate(self.scenario.nat_sites()):   # routers: relays and dial-backs pass other sites' nodes
            classes.setdefault(self.router(site_), (len(nodes) + k, self.scenario.mbit(site, site_)))
        for address, (j, mbit) in classes.items():
            rate = f"{mbit:g}mbit"
            _sh(*tc, "class", "add", "dev", dev, "parent", "1:", "classid", f"1:{j + 1}", "htb", "rate", rate,
                "ceil", rate)
            _sh(*tc, "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
                "match", "ip", "dst", f"{address}/32", "flowid", f"1:{j + 1}")

    def start(self, i: int, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Run ``argv`` in node ``i``'s namespace and CPU cgroup (its own process group)."""
        group = CGROUP / str(i) / "cgroup.procs"
        join = f'echo $$ > {group} && exec "$@"'
        # ``ip netns exec`` mounts a fresh /sys without cgroups: mount the cpu controller again (in that
        # command's own mount namespace), so the node can read its quota (``estimator.profile``)
        mount = ('(mount -t tmpfs cgroups /sys/fs/cgroup && mkdir -p /sys/fs/cgroup/cpu && '
                 'mount -t cgroup -o cpu cgroup /sys/fs/cgroup/cpu) 2>/dev/null; exec "$@"')
        argv = ["sh", "-c", join, "sh", "ip", "netns", "exec", self.namespace(i), "sh", "-c", mount, "sh", *argv]
        proc = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, **(env or {})})
        self.procs.append(proc)
        return proc

    def __enter__(self) -> Testbed:
        return self.up()

    def __exit__(self, *exc) -> None:
        down(self.procs)


def down(procs: list[subprocess.Popen] = ()) -> None:
    """Remove everything a testbed made (also a killed one's leftovers); never raises."""
    for p in procs:
        kill_group(p, wait_s=None)
    pids = [int(p) for g in (CGROUP.glob("*/cgroup.procs") if CGROUP.exists() else [])
            for p in g.read_text().split()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            pass
    names = _sh("ip", "netns", "list", check=False).stdout.split()
    for ns in [n for n in names if n.startswith(f"{PREFIX}-")]:
        for pid in _sh("ip", "netns", "pids", ns, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        _sh("ip", "netns", "del", ns, check=False)
    for link in _links():   # veth ends outlive a namespace that something still references
        _sh("ip", "link", "del", link, check=False)
    if CGROUP.exists():
        deadline = time.monotonic() + 10
        for group in sorted(g for g in CGROUP.iterdir() if g.is_dir()):
            try:   # a group goes once its last processes have exited
                poll_until(lambda g=group: _removed(g), max(0.0, deadline - time.monotonic()), f"{group} removed", 0.1)
            except TimeoutError:
                pass
        _removed(CGROUP)


def _removed(directory: Path) -> bool:
    try:
        directory.rmdir()
        return True
    except OSError:
        return False


def _links() -> list[str]:
    """The testbed's links in this namespace (the bridge and host ends of veth pairs)."""
    names = [line.split()[0].split("@")[0] for line in _sh("ip", "-br", "link", check=False).stdout.splitlines() if line]
    return [n for n in names if n.startswith(PREFIX)]


def leftovers() -> list[str]:
    """What a testbed left behind (empty when clean)."""
    out = [n for n in _sh("ip", "netns", "list", check=False).stdout.split() if n.startswith(f"{PREFIX}-")]
    out += _links()
    if CGROUP.exists():
        out.append(str(CGROUP))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swarm.testbed", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="create the testbed of a scenario and hold it until Ctrl-C / SIGTERM")
    up.add_argument("scenario")
    sub.add_parser("down", help="remove a testbed's leftovers")
    args = parser.parse_args(argv)
    logs.setup()
    try:
        if args.command == "down":
            down()
            return 0
        scenario = load(Scenario, args.scenario)
        stop = []   # the handler only appends: nothing it does can block (an Event's lock could)
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        # a background job of a non-interactive shell starts with SIGINT ignored, and Python then installs
        # no KeyboardInterrupt handler: install it, so that Ctrl-C (or kill -INT) always takes the bed down
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with Testbed(scenario) as bed:
            for i, (site, share) in enumerate(scenario.nodes()):
                behind = f" behind NAT {bed.router(site)}" if bed.router(site) else ""
                print(f"node {i}: site {site}, {bed.hosts[i]}{behind} in netns {bed.namespace(i)}, cpu {share:g} core",
                      flush=True)
            print("testbed up; Ctrl-C or SIGTERM takes it down", flush=True)
            poll_until(lambda: stop, math.inf, "Ctrl-C or SIGTERM")
        return 0
    except SwarmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
