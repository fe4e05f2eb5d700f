"""The election between real node processes on loopback: staggered joins, a killed member, two
swarms that get connected."""
import json

import pytest
from hivemind.utils.crypto import RSAPrivateKey

from swarm.config import NetworkConfig
from swarm.estimator.profile import load_or_measure
from swarm.net.membership import Membership, make_validators
from swarm.node import start_dht
from tests.swarmproc import Proc, wait_until

ELECTION = {"join_batch_s": 3, "min_epoch_s": 3, "election_timeout_s": 10, "drift_check_s": 600}


def config(tmp_path) -> str:
    path = tmp_path / "node.yaml"
    net = {"host_maddrs": ["/ip4/127.0.0.1/tcp/0"], "heartbeat_s": 1.0, "ttl_s": 6.0, "startup_timeout_s": 30,
           "probe_interval_s": 10.0}
    path.write_text(json.dumps({"device": "cpu", "network": net, "election": ELECTION,
                                "training": {"max_steps": 0}}))   # elections only: no training traffic
    return str(path)


def bootstrap(procs, tmp_path, name):
    proc = Proc("-m", "bootstrap.bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--identity", str(tmp_path / name),
                ready_file=tmp_path / f"{name}.ready.json")
    procs.append(proc)
    return proc.maddr(30)


def node(procs, tmp_path, name, *peers) -> str:
    proc = Proc("node.py", "run", "--config", config(tmp_path), "--identity", str(tmp_path / f"{name}.id"),
                "--initial-peers", *peers, ready_file=tmp_path / f"{name}.ready.json")
    procs.append(proc)
    return proc.peer_id(90)


class Observer:
    """A client on the DHT that reads what every member says it has committed."""

    def __init__(self, peer):
        net = NetworkConfig(initial_peers=[peer], host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        validators = make_validators(net.prefix, RSAPrivateKey())
        self.dht = start_dht(net, [peer], validators, identity=None, client_mode=True)
        self.membership = Membership(self.dht, validators[0], net.prefix)

    def agreed_plan(self, expected: set[str]):
        """The (epoch, hash) all ``expected`` members run, if they all run one plan naming exactly them."""
        view = self.membership.view()
        if set(view.members) != expected:
            return None
        committed = {(r.committed_epoch, r.committed_hash) for r in view.members.values()}
        if len(committed) != 1 or None in next(iter(committed)):
            return None
        epoch, plan_hash = next(iter(committed))
        ballots = [b for b in self.membership.ballots().values() if b["plan_hash"] == plan_hash]
        return (epoch, plan_hash) if ballots and set(ballots[0]["members"]) == expected else None

    def close(self):
        self.dht.shutdown()


@pytest.mark.scenario   # 80 s of node processes: run by `python -m benchmarks.scenarios` (the suite keeps
# tests/test_election.py::test_staggered_joins_end_in_one_plan and ::test_dead_member_is_dropped_in_a_new_epoch)
def test_eight_staggered_nodes_commit_one_plan_and_replace_a_killed_one(tmp_path, swarm_procs):
    load_or_measure("cpu")
    boot = bootstrap(swarm_procs, tmp_path, "boot.id")
    peers = {node(swarm_procs, tmp_path, f"n{i}", boot): i for i in range(8)}   # each starts after the previous
    observer = Observer(boot)
    try:
        epoch, first = wait_until(lambda: observer.agreed_plan(set(peers)), 120, interval_s=1, what="8 nodes agree")
        victim = sorted(peers)[0]   # the smallest id: the current proposer
        swarm_procs[1 + peers[victim]].kill()
        rest = set(peers) - {victim}
        later, second = wait_until(lambda: observer.agreed_plan(rest), 90, interval_s=1, what="7 nodes re-elect")
        assert later > epoch and second != first
    finally:
        observer.close()


@pytest.mark.scenario   # minutes of node processes: run by `python -m benchmarks.scenarios` (the suite keeps
# tests/test_election.py::test_two_groups_that_meet_converge_to_one_plan, in process)
def test_two_swarms_that_get_connected_converge_to_one_plan(tmp_path, swarm_procs):
    load_or_measure("cpu")
    boot_a, boot_b = bootstrap(swarm_procs, tmp_path, "a.id"), bootstrap(swarm_procs, tmp_path, "b.id")
    group_a = {node(swarm_procs, tmp_path, f"a{i}", boot_a) for i in range(3)}
    group_b = {node(swarm_procs, tmp_path, f"b{i}", boot_b) for i in range(3)}
    observers = [Observer(boot_a), Observer(boot_b)]
    try:
        plan_a = wait_until(lambda: observers[0].agreed_plan(group_a), 90, interval_s=1, what="group A agrees")
        plan_b = wait_until(lambda: observers[1].agreed_plan(group_b), 90, interval_s=1, what="group B agrees")
        assert plan_a[1] != plan_b[1]
        bridge = node(swarm_procs, tmp_path, "bridge", boot_a, boot_b)   # one node that knows both swarms
        everyone = group_a | group_b | {bridge}
        merged = wait_until(lambda: observers[0].agreed_plan(everyone), 120, interval_s=1, what="one plan for all")
        assert observers[1].agreed_plan(everyone) == merged
    finally:
        for o in observers:
            o.close()
