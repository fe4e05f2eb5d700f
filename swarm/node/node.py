"""A swarm node, the composition root: it joins the DHT, owns the event loop and its member record,
and once per heartbeat reads the view, steps the election, adopts the committed plan and publishes
what its components advertise; it leaves cleanly, handing its state over.

``run_node`` is what ``node.py run`` does (``read_members``, in ``swarm.node.setup``, is ``status``).
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import replace

from swarm import __version__, logs
from swarm.config import NetworkConfig, NodeConfig
from swarm.errors import SwarmError
from swarm.events import LEFT, Events
from swarm.loop import NodeLoop
from swarm.net.membership import Membership, MembershipView, make_validators
from swarm.net.records import MemberRecord, MemberState
from swarm.node.connectivity import Connectivity
from swarm.node.probes import ProbeSchedule
from swarm.node.ready import ready_info, write_ready
from swarm.node.setup import check_ports, initial_peers, node_identity, private_swarm, start_dht
from swarm.node.signals import StopFlag, stop_on_signals

logger = logging.getLogger(__name__)


def steady(view: MembershipView, record: MemberRecord, plan) -> bool:
    """This node trains a stage of the plan every member runs, and nobody votes for another: its
    heartbeat may slow down (to a quarter of the record TTL) and leave the CPU to training; any change
    speeds it up again. Spares keep the pace: they have CPU to spare."""
    if plan is None or record.stage is None or record.committed_hash != plan.hash or set(view.members) != set(plan.members):
        return False
    return all(r.state == MemberState.ONLINE and r.committed_hash == plan.hash and r.vote_hash in (None, plan.hash)
               for r in view.members.values())


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


class Node:
    """One node: ``start`` (join and measure), ``tick`` once per heartbeat (view -> elect -> adopt ->
    advertise), ``leave`` (drain, hand the state over, go offline), ``close``. The node is the only
    writer of its member record: components return adverts that ``tick`` merges."""

    def __init__(self, cfg: NodeConfig, net: NetworkConfig, ready_file: str | None = None):
        self.cfg, self.net, self.ready_file = cfg, net, ready_file
        self.dht = self.membership = self.record = None
        self.loop: NodeLoop | None = None
        self.p2p = self.probes = self.connectivity = self.elector = self.follower = None
        self.cut_off: set[str] = set()   # members this node cannot reach (each logged once)
        self.members: set[str] = set()   # private swarms: the peers our RPCs answer (from the last view)
        self.view = MembershipView({}, time.time())

    # --- start ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Measure this machine and the model, join the DHT, start serving; the record is published
        by the first ``tick``."""
        import torch

        from swarm.churn.follower import PlanFollower
        from swarm.compression.policy import codec_bits, measure_codec_rate
        from swarm.data import training_data
        from swarm.estimator.profile import load_or_measure
        from swarm.models import trace_model
        from swarm.planning import Elector
        from swarm.runtime.memory import MemoryGauge, return_freed_memory
        from swarm.runtime.precision import resolve as resolve_precision
        from swarm.runtime.session import model_io
        from swarm.scheduler import Workload

        cfg, net = self.cfg, self.net
        check_ports(net)   # before minutes of measuring: a second node on a taken port fails now
        if cfg.training.threads:
            torch.set_num_threads(cfg.training.threads)
        peers = initial_peers(net)
        identity = node_identity(net)
        authorizer = private_swarm(net, identity)
        profile = load_or_measure(cfg.device)
        if cfg.memory_limit_gb is not None and profile.device == "cpu":
            return_freed_memory()   # resident memory is then what tensors hold: what the cap and the plan count
        precision = resolve_precision(cfg.precision, profile.device)   # a bad setting is an error now, not at the first plan
        traced = trace_model(cfg.model, cfg.granularity, cfg.micro_batch_size, data=cfg.training.data,
                             input_shape=cfg.input_shape)
        # a bad data source is an error now, not after the election
        training_data(cfg.training.data, *model_io(traced), loss=cfg.training.loss)
        model_tflops = _model_tflops(traced, profile.device)
        workload = Workload.from_dag(traced.dag)
        validators = make_validators(net.prefix, identity.key)
        self.dht = start_dht(net, peers, validators, identity.path, authorizer=authorizer)
        events = Events(cfg.training.metrics_path, identity.peer_id)
        self.membership = Membership(self.dht, validators[0], net.prefix, net.ttl_s, authorizer.checker if authorizer else None,
                                     events)
        maddrs = [str(a) for a in self.dht.get_visible_maddrs()]
        self.record = MemberRecord(
            peer_id=identity.peer_id, maddrs=maddrs, device=profile.device, device_name=profile.name,
            tflops=profile.tflops, precision=precision,   # the cap counts what the process holds already (the traced model)
            memory_bytes=cfg.advertised_memory(profile.memory_available_bytes, MemoryGauge(torch.device(profile.device)).used()),
            memory_limit_bytes=cfg.memory_limit_bytes,
            versions={"swarm": __version__, "torch": torch.__version__, "python": sys.version.split()[0]},
            started_at=time.time(), credential=authorizer.credential.token.SerializeToString() if authorizer else None,
            codec_bps=measure_codec_rate(bits=codec_bits(cfg.compression.codec)),   # replaced by the stage's own measurements
            model_tflops=model_tflops, cpu_cores=profile.cpu_quota_cores)
        logger.info(f"peer {identity.peer_id} listening on {' '.join(maddrs)}")
        quota = f" (a CPU quota of {profile.cpu_quota_cores:g} cores)" if profile.cpu_quota_cores else ""
        logger.info(f"device {profile.device} {profile.name}{quota}: {profile.tflops:.3g} TFLOP/s peak matmul, "
                    f"{model_tflops:.3g} TFLOP/s training {cfg.model}")
        self._write_ready()
        admit = self.members.__contains__ if authorizer else None
        self.loop = NodeLoop()
        self.p2p = self.loop.call_sync(self.dht.replicate_p2p())
        self.probes = ProbeSchedule(self.loop, self.p2p, net.probe_interval_s, admit=admit)
        self.connectivity = Connectivity(self.loop, self.p2p, maddrs, peers, net.reach_check_s, admit=admit)
        max_ratio = cfg.compression.cap() if cfg.compression.mode != "off" else 1.0   # plan what will run
        self.elector = Elector(identity.peer_id, self.membership, workload, cfg.election, max_ratio=max_ratio,
                              schedule=cfg.training.schedule, events=events, training=cfg.training,
                              wire_fraction=cfg.compression.wire_fraction, recompute=cfg.recompute, optimizer=cfg.optimizer)
        self.follower = PlanFollower(identity.peer_id, traced, cfg, self.p2p, self.loop, self._bandwidth, admit,
                                     device=profile.device)

    def _bandwidth(self, peer: str) -> float | None:
        """Bits/s to a peer from the newest view (either side's probe, or the documented estimate)."""
        me, view = self.record.peer_id, self.view
        return view.bandwidth(me, peer) if me in view.members and peer in view.members else None

    # --- the heartbeat ----------------------------------------------------------------------------

    def tick(self) -> float:
        """One heartbeat: view -> elect -> adopt -> advertise. Returns the seconds until the next."""
        view = self._read_view()
        self._note_cut_off(view)
        adverts = [self.probes.advert(), self.connectivity.advert([p for p in view.peers() if p != self.record.peer_id])]
        if self.record.peer_id in view.members:   # the election starts once our own record is visible
            adverts.append(self._elect(view))
            adverts += [self.follower.follow(self.elector.plan, view), self.follower.codec()]
        self._advertise(*adverts)
        net = self.net
        return net.heartbeat_s if not steady(view, self.record, self.elector.plan) else max(net.heartbeat_s, net.ttl_s / 4)

    def _read_view(self) -> MembershipView:
        """The members this heartbeat (those answering no probe for a TTL left out); probes go on."""
        try:
            seen = self.membership.view()
        except TimeoutError:
            if not self.dht.is_alive():
                raise SwarmError("this node's DHT process died (and its p2p daemon with it)") from None
            logger.warning("reading the member records timed out; keeping the last view")
            return self.view
        self.members.clear()
        self.members.update(seen.peers())   # admitted: every valid record, answering or not (it may come back)
        me = self.record.peer_id
        self.view = view = self.probes.alive(seen, me, self.net.ttl_s)   # members answering no probe for a TTL: gone
        self.probes.step(lambda: sorted(set(view.peers()) - {me}))
        self.connectivity.step(view, me)
        return view

    def _note_cut_off(self, view: MembershipView) -> None:
        """One line per member this node newly cannot reach (its pings go unanswered), naming its place
        in the committed plan and how the link ran; another when it answers again."""
        now = set(self.probes.unreachable())
        plan = self.elector.plan if self.elector else None
        for peer in sorted(now - self.cut_off):
            place = next((f"stage {s.index}" for s in (plan.stages if plan else []) if peer in s.peers), "no stage")
            path = self.connectivity.paths.get(peer, "no connection")
            logger.warning(f"cannot reach member {peer[-8:]} ({place} of the plan): its last pings went unanswered "
                           f"(link: {path}); advertised as cut, planning routes around it")
        for peer in sorted(self.cut_off - now):
            logger.info(f"member {peer[-8:]} is reachable again")
        self.cut_off = now

    def _elect(self, view: MembershipView):
        try:
            return self.elector.step(self.elector.electorate(view))
        except Exception as e:   # no peer's input may end the node: the next heartbeat tries again
            logger.warning(f"election step failed ({type(e).__name__}: {' '.join(str(e).split())[:200]})")
            return self.elector.advert

    def _advertise(self, *adverts, timeout_s: float = 10.0) -> None:
        """Merge the components' adverts into the record, publish it once, rewrite the ready file."""
        self.record = self.record.merged(*adverts)
        if not self.membership.publish(self.record, timeout_s=timeout_s):
            logger.warning("could not store the member record this round")
        self._write_ready()

    def _write_ready(self) -> None:
        if self.ready_file:
            try:
                write_ready(self.ready_file, ready_info(self.record))
            except OSError as e:
                logger.warning(f"cannot write the ready file {self.ready_file}: {e.strerror or e}")

    # --- leaving ----------------------------------------------------------------------------------

    def leave(self) -> None:
        """Finish the step in progress (still a member), then out of elections with training stopped,
        the state served until the others took it over; then offline."""
        net, follower = self.net, self.follower
        deadline = time.monotonic() + net.leave_timeout_s
        logger.info(f"leaving: handing state over (at most {net.leave_timeout_s:.0f} s)")
        drained = follower.drain()
        while drained is not None and not drained.done() and time.monotonic() < deadline:
            self._advertise(self.probes.advert())
            self._read_view()
            time.sleep(min(net.heartbeat_s, 0.2))   # the pipeline finishes the step at its own pace
        follower.stop()
        follower.persist()   # (before handing over: what the swarm does not take is still on disk)
        old_plan = self.record.ready
        self.record = replace(self.record, state=MemberState.LEAVING)
        holding = follower.follow(None, self.view)
        handed_over = False
        while time.monotonic() < deadline:
            self._advertise(self.probes.advert(), holding)
            if handed_over := follower.handed_over(self._read_view(), old_plan):
                break
            time.sleep(min(net.heartbeat_s, 1.0))   # the others re-plan and fetch at their own pace
        else:
            logger.warning("the swarm did not take this node's state over in time")
        self._go_offline(handed_over, finished=False)
        logger.info(f"left the swarm ({follower.service.served} op states handed over)")

    def _go_offline(self, handed_over: bool, finished: bool) -> None:
        """The last of leaving: stop serving state and probing, publish the record offline, say so (``left``)."""
        self.follower.close()
        self.probes.close()
        self.connectivity.close()
        self.record = replace(self.record, state=MemberState.OFFLINE)
        self._advertise(timeout_s=5)
        self.follower.events.emit(LEFT, handed_over=handed_over, served=self.follower.service.served, finished=finished)

    def finished(self) -> bool:
        """``training.max_steps`` is set (0: elections only, and the node stays) and every stage holder of
        the committed plan advertises it reached it (this node's own record as the view last read it)."""
        max_steps, plan = self.cfg.training.max_steps, self.elector.plan if self.elector else None
        if not max_steps or plan is None or not plan.stages:
            return False
        holders = {p for s in plan.stages for p in s.peers}
        steps = [self.view.members[p].step if p in self.view.members else None for p in holders]
        return all(step is not None and step >= max_steps for step in steps)

    def finish(self) -> None:
        """The swarm reached ``training.max_steps``: write this node's stage (``save_dir``,
        ``checkpoint_dir``) and go offline; nobody needs the state handed over."""
        logger.info(f"the swarm reached max_steps {self.cfg.training.max_steps}: leaving")
        self.follower.stop()
        self.follower.persist()
        self._go_offline(handed_over=True, finished=True)

    def close(self) -> None:
        """Let go of the p2p replica, the loop and the DHT (whatever ``start`` got to)."""
        try:
            if self.p2p is not None:
                self.loop.call_sync(self.p2p.shutdown(), 5)   # a replica: the daemon belongs to the DHT
        except Exception as e:
            logger.debug(f"p2p replica shutdown: {e!r}")
        finally:
            if self.loop is not None:
                self.loop.close()
            if self.dht is not None:
                self.dht.shutdown()


def run_node(cfg: NodeConfig, net: NetworkConfig, log=None, ready_file: str | None = None,
             stop: StopFlag | None = None) -> int:
    """Serve until SIGINT/SIGTERM (or ``stop``): publish the member record every heartbeat, take part
    in the election of the plan, train this node's stage of the committed plan, then leave.
    ``log`` is ignored (logging goes through ``swarm.logs``; set up here if the entry point did not)."""
    if not logging.getLogger("swarm").handlers:
        logs.setup()
    node = Node(cfg, net, ready_file)
    try:
        node.start()   # a signal meanwhile ends the process the default way (the DHT's watchdog cleans up)
        with stop_on_signals() as signalled:
            stop = stop or signalled
            while not stop.is_set():
                stop.wait(node.tick())
                if node.finished():
                    node.finish()
                    return 0
            node.leave()
            return 0
    finally:
        node.close()
