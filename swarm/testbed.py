"""A geo-distributed testbed on one Linux machine: sites of nodes in network namespaces behind one
bridge, per-destination rates with ``tc htb``, per-node CPU quotas with cgroup v1. Needs root.

    python -m swarm.testbed up configs/scenarios/geo.yaml      # bring it up, print it, hold until Ctrl-C

Node ``i`` lives in namespace ``swtb-<i>`` at ``10.77.0.<10 + i>``; the host reaches every node
through the bridge at ``10.77.0.1``. Each node shapes its own egress: one htb class per other node
at the rate between their sites, so every direction of every pair is shaped. Everything the testbed
creates carries the ``swtb`` prefix; ``down`` (also run on exit, on SIGINT/SIGTERM, and first thing
in ``up`` for leftovers of a killed run) removes processes, namespaces, links and cgroups.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field, PositiveInt

from swarm import logs
from swarm.config import Strict, load
from swarm.errors import SwarmError
from swarm.procs import kill_group, poll_until

PREFIX = "swtb"
BRIDGE = f"{PREFIX}-br"
SUBNET = "10.77.0"
CGROUP = Path("/sys/fs/cgroup/cpu") / PREFIX
PERIOD_US = 100_000


class SiteSpec(Strict):
    nodes: PositiveInt = 1
    cpu: float | list[float] = Field(default=1.0, description="CPU share of one core per node (or one per node)")


class Scenario(Strict):
    """Sites, their sizes and the bandwidth inside and between them (Mbit/s)."""

    name: str = ""
    sites: dict[str, SiteSpec]
    inside_mbit: float = Field(default=1000.0, gt=0)
    between_mbit: float = Field(default=1000.0, gt=0)
    site_mbit: dict[str, float] = Field(default_factory=dict, description="a site whose links to every other site "
                                        "run at this rate (its uplink), when slower than between_mbit")

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
        return [f"{SUBNET}.{10 + i}" for i in range(len(self.scenario.nodes()))]

    def namespace(self, i: int) -> str:
        return f"{PREFIX}-{i}"

    def interface(self, i: int) -> str:
        """Node ``i``'s network interface (inside its namespace)."""
        return f"{PREFIX}{i}n"

    def up(self) -> Testbed:
        if os.geteuid() != 0:
            raise SwarmError("the testbed needs root (network namespaces, tc, cgroups): run it with sudo")
        down()
        nodes = self.scenario.nodes()
        if len(nodes) > 200:
            raise SwarmError(f"scenario has {len(nodes)} nodes; the testbed takes at most 200")
        try:
            _sh("ip", "link", "add", BRIDGE, "type", "bridge")
            _sh("ip", "addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
            _sh("ip", "link", "set", BRIDGE, "up")
            CGROUP.mkdir(exist_ok=True)
            for i, (site, share) in enumerate(nodes):
                ns, host, peer = self.namespace(i), f"{PREFIX}{i}h", self.interface(i)
                _sh("ip", "netns", "add", ns)
                _sh("ip", "link", "add", host, "type", "veth", "peer", "name", peer)
                _sh("ip", "link", "set", peer, "netns", ns)
                _sh("ip", "link", "set", host, "master", BRIDGE, "up")
                _sh("ip", "-n", ns, "addr", "add", f"{self.hosts[i]}/24", "dev", peer)
                _sh("ip", "-n", ns, "link", "set", peer, "up")
                _sh("ip", "-n", ns, "link", "set", "lo", "up")
                self._shape(i, ns, peer, site, nodes)
                group = CGROUP / str(i)
                group.mkdir(exist_ok=True)
                (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (group / "cpu.cfs_quota_us").write_text(str(int(share * PERIOD_US)))
        except BaseException:
            down()
            raise
        return self

    def _shape(self, i: int, ns: str, dev: str, site: str, nodes: list[tuple[str, float]]) -> None:
        """Egress of node ``i``: one htb class per other node at the rate between their sites."""
        tc = ("ip", "netns", "exec", ns, "tc")
        _sh(*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "9999")
        _sh(*tc, "class", "add", "dev", dev, "parent", "1:", "classid", "1:9999", "htb", "rate", "10gbit")
        for j, (other, _) in enumerate(nodes):
            if j == i:
                continue
            rate = f"{self.scenario.mbit(site, other):g}mbit"
            _sh(*tc, "class", "add", "dev", dev, "parent", "1:", "classid", f"1:{j + 1}", "htb", "rate", rate,
                "ceil", rate)
            _sh(*tc, "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
                "match", "ip", "dst", f"{self.hosts[j]}/32", "flowid", f"1:{j + 1}")

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
        with Testbed(scenario) as bed:
            for i, (site, share) in enumerate(scenario.nodes()):
                print(f"node {i}: site {site}, {bed.hosts[i]} in netns {bed.namespace(i)}, cpu {share:g} core", flush=True)
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
