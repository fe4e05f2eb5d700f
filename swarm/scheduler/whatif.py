"""What-if swarms for ``node.py plan``: a YAML list of hypothetical peers and their bandwidths.

    default_mbps: 100                # any pair not described below
    sites:                           # optional: bandwidth by site
      eu: {inside_mbps: 1000}
      us: {inside_mbps: 1000}
    links:                           # optional: between two sites, or two peers (peer pairs win)
      - {between: [eu, us], mbps: 40}
    peers:
      - {id: a100, tflops: 150, memory_gb: 80, site: eu}
      - {id: gamer, tflops: 30, memory_gb: 24, site: us, count: 4}   # gamer-0 .. gamer-3
      - {id: pi, tflops: 0.01, memory_gb: 4, cpu_cores: 0.5}          # optional: a CPU quota
      - {id: home, tflops: 30, memory_gb: 24, relayed: true}          # optional: behind NAT, via a relay
    settings: {micro_batches: 8, schedule: 1f1b, max_ratio: 16}     # optional PlanSettings (in_flight: 4
                                     # fixes the micro-batches a stage holds; default: what the runtime keeps;
                                     # sync_every: 1 sums gradients every step, 0 lets each plan choose)
"""
from __future__ import annotations

from pathlib import Path

from pydantic import Field

from swarm.config import Strict, read_yaml, validate
from swarm.errors import SwarmError
from swarm.scheduler.costs import PeerSpec, PlanSettings, Swarm

MAX_PEERS = 5000


class _Peer(Strict):
    id: str = Field(min_length=1)
    tflops: float = Field(gt=0)
    memory_gb: float = Field(gt=0)
    site: str | None = None
    count: int = Field(default=1, ge=1)
    cpu_cores: float | None = Field(default=None, gt=0, description="a CPU quota (cores) the node runs under")
    relayed: bool = Field(default=False, description="behind NAT, reached through a relay (planned off mid-pipeline stages)")


class _Site(Strict):
    inside_mbps: float = Field(default=1000.0, gt=0)


class _Link(Strict):
    between: tuple[str, str]
    mbps: float = Field(gt=0)


class _Settings(Strict):
    micro_batches: int = Field(default=PlanSettings.micro_batches, ge=1)
    in_flight: int | None = Field(default=PlanSettings.in_flight, ge=1, description="None: what the runtime keeps")
    schedule: str = PlanSettings.schedule
    optimizer: str = PlanSettings.optimizer
    max_ratio: float = Field(default=PlanSettings.max_ratio, ge=1)
    codec_bytes_per_s: float = Field(default=PlanSettings.codec_bytes_per_s, gt=0)
    max_stages: int = Field(default=PlanSettings.max_stages, ge=1)
    sync_every: int = Field(default=PlanSettings.sync_every, ge=0, description="0: chosen per plan")
    max_sync_every: int = Field(default=PlanSettings.max_sync_every, ge=1)
    outer_ratio: float = Field(default=PlanSettings.outer_ratio, ge=1)
    micro_batch_size: int | None = Field(default=None, ge=1, description="samples per micro-batch (default: node config)")


class PeersFile(Strict):
    peers: list[_Peer] = Field(min_length=1)
    sites: dict[str, _Site] = {}
    links: list[_Link] = []
    default_mbps: float = Field(default=100.0, gt=0)
    settings: _Settings = _Settings()


def load_peers_file(path: str | Path) -> tuple[Swarm, PlanSettings, int | None]:
    """(swarm, plan settings, micro-batch size or None) from a what-if YAML; one-line errors."""
    spec = validate(PeersFile, read_yaml(path), str(path))
    if sum(entry.count for entry in spec.peers) > MAX_PEERS:
        raise SwarmError(f"{path}: more than {MAX_PEERS} peers")
    peers: list[PeerSpec] = []
    site_of: dict[str, str | None] = {}
    for entry in spec.peers:
        names = [entry.id] if entry.count == 1 else [f"{entry.id}-{k}" for k in range(entry.count)]
        for name in names:
            if name in site_of:
                raise SwarmError(f"{path}: peer id '{name}' appears twice")
            if entry.site is not None and entry.site not in spec.sites:
                raise SwarmError(f"{path}: peer '{name}' is at unknown site '{entry.site}' (add it under sites:)")
            site_of[name] = entry.site
            peers.append(PeerSpec(name, entry.tflops, int(entry.memory_gb * 1e9), entry.cpu_cores, entry.relayed))
    pair_mbps, site_mbps = {}, {}
    for link in spec.links:
        a, b = link.between
        if a in site_of and b in site_of:
            pair_mbps[frozenset((a, b))] = link.mbps
        elif a in spec.sites and b in spec.sites:
            site_mbps[frozenset((a, b))] = link.mbps
        else:
            raise SwarmError(f"{path}: link between '{a}' and '{b}': both must be peer ids or both site names")

    def bandwidth(a: str, b: str) -> float:
        sa, sb = site_of[a], site_of[b]
        mbps = pair_mbps.get(frozenset((a, b)))
        if mbps is None and sa is not None and sb is not None:
            mbps = spec.sites[sa].inside_mbps if sa == sb else site_mbps.get(frozenset((sa, sb)))
        return (mbps or spec.default_mbps) * 1e6

    settings = spec.settings.model_dump()
    micro_batch_size = settings.pop("micro_batch_size")
    return Swarm.build(peers, bandwidth), PlanSettings(**settings), micro_batch_size
