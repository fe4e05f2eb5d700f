"""When a node's training is over (``training.max_steps``): every stage holder of the committed plan
advertises the step, then every node leaves by itself (``Node.finished``). 0 means elections only."""
import time
from types import SimpleNamespace

from swarm.config import NetworkConfig, NodeConfig
from swarm.net.membership import MemberRecord, MembershipView
from swarm.node.node import Node


def record(peer: str, step: int | None) -> MemberRecord:
    now = time.time()
    return MemberRecord(peer, [], "cpu", "test", 1.0, 8 << 30, {"swarm": "0"}, now, now, step=step)


def node(max_steps: int | None, steps: dict[str, int | None], stages=(("a",), ("b", "c")), spares=("d",)) -> Node:
    n = Node(NodeConfig.model_validate({"training": {"max_steps": max_steps}}), NetworkConfig())
    n.elector = SimpleNamespace(plan=SimpleNamespace(stages=[SimpleNamespace(peers=p) for p in stages], spares=spares))
    n.view = MembershipView({p: record(p, s) for p, s in steps.items()}, time.time())
    return n


def test_a_node_is_finished_once_every_stage_holder_advertises_max_steps():
    assert node(10, {"a": 10, "b": 10, "c": 11, "d": 0}).finished()        # a spare's own step does not matter
    assert not node(10, {"a": 10, "b": 9, "c": 10, "d": 10}).finished()    # one replica is a step behind
    assert not node(10, {"a": 10, "b": 10, "d": 10}).finished()            # a holder not in the view
    assert not node(10, {"a": 10, "b": None, "c": 10}).finished()          # nor one that has not said


def test_no_max_steps_or_max_steps_0_never_finishes_and_no_plan_is_not_finished():
    steps = {"a": 5, "b": 5, "c": 5, "d": 5}
    assert not node(None, steps).finished() and not node(0, steps).finished()   # 0: elections only, the node stays
    n = node(3, steps)
    n.elector = SimpleNamespace(plan=None)
    assert not n.finished()
