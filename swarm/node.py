"""A swarm node: joins the DHT, advertises its measured telemetry, keeps it fresh, leaves cleanly.

``run_node`` is what ``node.py run`` does; ``read_members`` is what ``node.py status`` does.
"""
from __future__ import annotations

import asyncio
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from multiaddr import Multiaddr

from swarm import __version__
from swarm.config import NetworkConfig, NodeConfig
from swarm.errors import SwarmError
from swarm.liveness import MAX_PINGS, Liveness
from swarm.net.auth import Identity, SwarmAuthorizer, load_identity, read_credential
from swarm.net.membership import MemberRecord, Membership, MembershipView, SwarmDHT, make_validators
from swarm.net.probe import LinkProber

PUBLIC_PEERS = Path(__file__).resolve().parent.parent / "bootstrap" / "peers.txt"


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


def node_identity(net: NetworkConfig) -> Identity:
    """The persistent identity: p2pd's key, which also signs the member record."""
    return load_identity(net.identity_path or "~/.swarm/identity")


def private_swarm(net: NetworkConfig, identity: Identity) -> SwarmAuthorizer | None:
    """The authorizer for a private swarm (``credentials_path`` set), else None for a public one."""
    return SwarmAuthorizer(identity, read_credential(net.credentials_path)) if net.credentials_path else None


def start_dht(net: NetworkConfig, initial_peers: list[str], validators: list, identity: str | None,
              client_mode: bool = False, authorizer: SwarmAuthorizer | None = None) -> SwarmDHT:
    """Start and join; every failure becomes one line (bad port, unreachable bootstrap, bad identity)."""
    check_maddrs(net.host_maddrs, "host_maddrs")
    check_maddrs(net.announce_maddrs, "announce_maddrs")
    check_maddrs(initial_peers, "initial peers", need_peer_id=True)
    try:
        return SwarmDHT(initial_peers=initial_peers, start=True, host_maddrs=net.host_maddrs,
                        announce_maddrs=net.announce_maddrs or None, identity_path=identity,
                        record_validators=validators, startup_timeout=net.startup_timeout_s, client_mode=client_mode,
                        authorizer=authorizer)
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


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGINT/SIGTERM; the previous handlers come back afterwards."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _initial_peers(net: NetworkConfig) -> list[str]:
    return list(net.initial_peers) if net.initial_peers is not None else read_peer_list(PUBLIC_PEERS)


class _ProbeSchedule:
    """Measures links in the background: a peer never measured right away (one probe at a time), then
    one peer per ``interval_s`` (each probe takes about a second of the link: rare while training);
    keeps smoothed results (EMA, 1/2). ``alive`` pings every member (``swarm.liveness``)."""

    def __init__(self, dht: SwarmDHT, interval_s: float, admit: Callable[[str], bool] | None = None,
                 log: Callable[[str], None] = lambda line: None):
        self.log = log
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="transport").start()
        self.p2p = self._run(dht.replicate_p2p())
        self.links = LinkProber(self.p2p, admit=admit)
        self._run(self.links.serve())
        self.interval_s, self.next_at, self.pending = interval_s, 0.0, None
        self.bandwidth_bps: dict[str, float] = {}
        self.rtt_s: dict[str, float] = {}
        self.probed_at: dict[str, float] = {}
        self.liveness: Liveness | None = None
        self.pings: dict[str, object] = {}   # peer -> the future of its ping in flight

    def alive(self, view: MembershipView, me: str, ttl_s: float) -> MembershipView:
        """``view`` without the members that answer no direct probe (``swarm.liveness``): collects the
        finished pings and sends the due ones (at most ``MAX_PINGS`` in flight; never waits for one)."""
        now = time.monotonic()
        if self.liveness is None or self.liveness.ttl_s != ttl_s or self.liveness.me != me:
            self.liveness = Liveness(ttl_s, me, self.log)
        live = self.liveness
        for peer, future in list(self.pings.items()):
            if future.done():
                del self.pings[peer]
                (live.failed if future.cancelled() or future.exception() is not None else live.answered)(peer, now)
        peers = [p for p in view.peers() if p != me]
        live.observe(peers, now)
        for peer in live.due(peers, now, self.pings)[:max(0, MAX_PINGS - len(self.pings))]:
            live.pinged(peer, now)
            try:
                coro = self.links.ping(peer, live.interval_s)
            except Exception:   # not a peer id: never answers
                live.failed(peer, now)
                continue
            self.pings[peer] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        gone = live.gone_among(peers, now)
        return MembershipView({p: r for p, r in view.members.items() if p not in gone}, view.taken_at) if gone else view

    def _run(self, coro, timeout_s: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def step(self, peers: Callable[[], list[str]]) -> None:
        """Collect a finished probe; start the next one when due (a new peer, else the least recently probed)."""
        if self.pending is not None and self.pending[1].done():
            peer, future = self.pending
            self.pending = None
            if future.exception() is None:
                bandwidth, rtt = future.result()
                if self.liveness is not None:
                    self.liveness.answered(peer, time.monotonic())
                for table, value in ((self.bandwidth_bps, bandwidth), (self.rtt_s, rtt)):
                    table[peer] = (table.pop(peer) + value) / 2 if peer in table else value  # newest last
                self.log(f"link to {peer[-6:]}: {bandwidth / 1e6:.3g} Mbit/s, rtt {rtt * 1e3:.3g} ms")
        if self.pending is None:
            candidates = peers()
            fresh = [p for p in candidates if p not in self.probed_at]
            if not candidates or (not fresh and time.monotonic() < self.next_at):
                return
            peer = min(fresh) if fresh else min(candidates, key=lambda p: (self.probed_at[p], p))
            self.probed_at[peer] = now = time.monotonic()
            self.next_at = now + self.interval_s * random.uniform(0.5, 1.5)  # jitter: peers rarely collide
            coro = asyncio.wait_for(self.links.measure(peer), 60)
            self.pending = (peer, asyncio.run_coroutine_threadsafe(coro, self.loop))

    def close(self) -> None:
        async def shutdown() -> None:
            await self.p2p.shutdown()  # a replica: closes our connections, the daemon belongs to the DHT
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self._run(shutdown(), timeout_s=5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)


def steady(view: MembershipView, record: MemberRecord, plan) -> bool:
    """This node trains a stage of the plan every member runs, and nobody votes for another: its
    heartbeat may slow down (to a quarter of the record TTL) and leave the CPU to training; any change
    speeds it up again. Spares keep the pace: they have CPU to spare."""
    if plan is None or record.stage is None or record.committed_hash != plan.hash or set(view.members) != set(plan.members):
        return False
    return all(r.state == "online" and r.committed_hash == plan.hash and r.vote_hash in (None, plan.hash)
               for r in view.members.values())


def _bandwidth_from(views: list[MembershipView], me: str) -> Callable[[str], float | None]:
    """Bits/s to a peer from the newest view (either side's probe, or the documented estimate)."""
    def bandwidth(peer: str) -> float | None:
        view = views[-1] if views else None
        return view.bandwidth(me, peer) if view and me in view.members and peer in view.members else None
    return bandwidth


def _model_tflops(traced, device: str) -> float:
    """TFLOP/s of a training pass of the whole model at the micro-batch size on ``device`` (a copy of
    the model: the node's own stays untouched on the CPU); cached beside the device profile."""
    import copy
    import hashlib

    import torch

    from swarm.estimator.profile import load_or_measure_training, measure_training_tflops
    from swarm.runtime.session import model_io

    shape, dtype, _ = model_io(traced)
    dag = traced.dag

    def measure() -> float:
        kind = getattr(torch, dtype)
        example = torch.randn(shape, dtype=kind) if kind.is_floating_point else torch.zeros(shape, dtype=kind)
        module = traced.gm if device == "cpu" else copy.deepcopy(traced.gm).to(device)
        return measure_training_tflops(module, [example.to(device)], dag.total_flops, device)

    key = hashlib.sha256(f"{dag.model}|{shape}|{dtype}|{dag.total_flops}|{len(dag.ops)}".encode()).hexdigest()[:16]
    return load_or_measure_training(device, key, measure)


def run_node(cfg: NodeConfig, net: NetworkConfig, log=print) -> int:
    """Serve until SIGINT/SIGTERM: publish the member record every ``heartbeat_s``, take part in the
    election of the plan, and train this node's stage of the committed plan."""
    import torch

    from swarm.compression.policy import measure_codec_rate
    from swarm.data import training_data
    from swarm.estimator.profile import load_or_measure
    from swarm.models import trace_model
    from swarm.planning import Elector
    from swarm.runtime.follow import PlanFollower
    from swarm.runtime.session import model_io
    from swarm.scheduler import Workload

    if cfg.training.threads:
        torch.set_num_threads(cfg.training.threads)
    peers = _initial_peers(net)
    identity = node_identity(net)
    authorizer = private_swarm(net, identity)
    profile = load_or_measure(cfg.device)
    traced = trace_model(cfg.model, cfg.granularity, cfg.micro_batch_size)
    training_data(cfg.training.data, *model_io(traced))   # a bad data source is an error now, not after the election
    model_tflops = _model_tflops(traced, profile.device)
    workload = Workload.from_dag(traced.dag)
    validators = make_validators(net.prefix, identity.key)
    dht = start_dht(net, peers, validators, identity.path, authorizer=authorizer)
    try:
        with stop_on_signals() as stop:
            checker = authorizer.checker if authorizer else None
            membership = Membership(dht, validators[0], net.prefix, net.ttl_s, checker, log=log)
            maddrs = [str(a) for a in dht.get_visible_maddrs()]
            record = MemberRecord(
                peer_id=identity.peer_id, maddrs=maddrs, device=profile.device, device_name=profile.name,
                tflops=profile.tflops, memory_bytes=profile.memory_available_bytes,
                versions={"swarm": __version__, "torch": torch.__version__, "python": sys.version.split()[0]},
                started_at=time.time(),
                credential=authorizer.credential.token.SerializeToString() if authorizer else None)
            record.codec_bps = measure_codec_rate()   # replaced by the running stage's own measurements
            record.model_tflops, record.cpu_cores = model_tflops, profile.cpu_quota_cores
            log(f"peer {record.peer_id} listening on {' '.join(maddrs)}")
            quota = f" (a CPU quota of {profile.cpu_quota_cores:g} cores)" if profile.cpu_quota_cores else ""
            log(f"device {profile.device} {profile.name}{quota}: {profile.tflops:.3g} TFLOP/s peak matmul, "
                f"{model_tflops:.3g} TFLOP/s training {cfg.model}")
            members: set[str] = set()  # private swarms: the peers our RPCs answer (from the last view)
            probes = _ProbeSchedule(dht, net.probe_interval_s, admit=members.__contains__ if authorizer else None, log=log)
            max_ratio = cfg.compression.max_ratio if cfg.compression.mode != "off" else 1.0   # plan what will run
            elector = Elector(record.peer_id, membership, workload, cfg.election, log, max_ratio)
            views: list[MembershipView] = []
            follower = PlanFollower(record.peer_id, traced, cfg, probes.p2p, probes.loop, _bandwidth_from(views, record.peer_id),
                                    members.__contains__ if authorizer else None, log, profile.device)

            def heartbeat() -> MembershipView:
                try:
                    seen = membership.view()
                except TimeoutError:
                    if not dht.is_alive():
                        raise SwarmError("this node's DHT process died (and its p2p daemon with it)") from None
                    log("warning: reading the member records timed out; keeping the last view")
                    return views[-1] if views else MembershipView({}, time.time())
                members.clear()
                members.update(seen.peers())   # admitted: every valid record, answering or not (it may come back)
                view = probes.alive(seen, record.peer_id, net.ttl_s)   # members answering no probe for a TTL: gone
                views[:] = [view]
                probes.step(lambda: sorted(set(view.peers()) - {record.peer_id}))
                record.bandwidth_bps, record.rtt_s = dict(probes.bandwidth_bps), dict(probes.rtt_s)
                return view

            while not stop.is_set():
                view = heartbeat()
                if record.peer_id in view.members:  # the election starts once our own record is visible
                    try:
                        elector.step(elector.electorate(view), record)
                    except Exception as e:   # no peer's input may end the node: the next heartbeat tries again
                        log(f"warning: election step failed ({type(e).__name__}: {' '.join(str(e).split())[:200]})")
                    follower.follow(elector.plan, view, record)
                if not membership.publish(record):
                    log("warning: could not store the member record this round")
                stop.wait(net.heartbeat_s if not steady(view, record, elector.plan) else max(net.heartbeat_s, net.ttl_s / 4))
            # leaving: finish the step in progress (still a member), then out of elections with training
            # stopped, the state served until the others took it over
            deadline = time.monotonic() + net.leave_timeout_s
            log(f"leaving: handing state over (at most {net.leave_timeout_s:.0f} s)")
            drained = follower.drain()
            while drained is not None and not drained.done() and time.monotonic() < deadline:
                membership.publish(record)
                view = heartbeat()
                time.sleep(min(net.heartbeat_s, 0.2))   # the pipeline finishes the step at its own pace
            follower.stop()
            record.state, old_plan = "leaving", record.ready
            follower.follow(None, view, record)
            while time.monotonic() < deadline:
                membership.publish(record)
                view = heartbeat()
                if follower.handed_over(view, old_plan):
                    break
                time.sleep(min(net.heartbeat_s, 1.0))   # the others re-plan and fetch at their own pace
            else:
                log("warning: the swarm did not take this node's state over in time")
            follower.close()
            probes.close()
            record.state = "offline"
            membership.publish(record, timeout_s=5)
            log(f"left the swarm ({follower.served} op states handed over)")
            return 0
    finally:
        dht.shutdown()


def read_members(net: NetworkConfig, timeout_s: float = 10.0) -> MembershipView:
    """Join as a client (no record of its own; a fresh p2p identity) and read the membership view.
    In a private swarm the node's identity key and credential authorize the reads."""
    authorizer = private_swarm(net, load_identity(net.identity_path or "~/.swarm/identity", create=False)) \
        if net.credentials_path else None
    validators = make_validators(net.prefix)
    dht = start_dht(net, _initial_peers(net), validators, identity=None, client_mode=True, authorizer=authorizer)
    try:
        checker = authorizer.checker if authorizer else None
        return Membership(dht, validators[0], net.prefix, net.ttl_s, checker).view(timeout_s)
    finally:
        dht.shutdown()
