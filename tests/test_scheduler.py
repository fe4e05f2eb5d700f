"""OP-Fence scheduler: optimal on small instances, far ahead of the naive plan on heterogeneous
swarms, deterministic, memory-feasible; slow links compress harder."""
import json

import numpy as np
import pytest

from swarm.scheduler import PeerSpec, PlanSettings, Swarm, Workload, baseline, schedule
from swarm.scheduler.fences import fence_levels
from tests.scheduler_cases import brute_force, random_workload, sites_swarm

SHAPES = [(4, 10, 4, [2, 2]), (5, 8, 5, [2, 3]), (6, 8, 3, [3, 3]), (6, 8, 3, [1, 2, 3]), (6, 12, 2, [2, 4])]


@pytest.mark.parametrize("seed", range(8))
def test_within_5_percent_of_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    n_peers, n_ops, max_stages, sites = SHAPES[seed % len(SHAPES)]
    w = random_workload(rng, n_ops)
    swarm = sites_swarm(rng, sites, weak=seed % 2, memory_gb=(0.05, 0.3) if seed % 3 == 0 else (4, 16))
    settings = PlanSettings(max_stages=max_stages)
    plan, best = schedule(w, swarm, settings), brute_force(w, swarm, settings)
    assert plan.feasible and best.feasible
    assert plan.predicted_step_s <= best.predicted_step_s * 1.05, (plan.describe(), best.describe())


def three_sites(seed: int = 0) -> tuple[Workload, Swarm]:
    rng = np.random.default_rng(seed)
    return random_workload(rng, 24), sites_swarm(rng, [4, 3, 3], inside_bps=1e9, between_bps=20e6, weak=1)


def test_heterogeneous_sites_beat_the_naive_plan_3x():
    for seed in range(3):
        w, swarm = three_sites(seed)
        plan, naive = schedule(w, swarm), baseline(w, swarm)
        assert naive.predicted_step_s / plan.predicted_step_s >= 3.0, (plan.describe(), naive.describe())


def test_real_model_on_three_sites_beats_the_naive_plan_3x():
    import torch

    from swarm.dag.trace import trace
    from swarm.models import load_model

    built = load_model("gpt2-tiny")
    torch.manual_seed(0)
    w = Workload.from_dag(trace(built.module, built.example_inputs(8), "fine", name=built.name).dag)
    rng = np.random.default_rng(3)
    swarm = sites_swarm(rng, [3, 3, 3], inside_bps=1e9, between_bps=20e6, weak=1)
    plan, naive = schedule(w, swarm), baseline(w, swarm)
    assert naive.predicted_step_s / plan.predicted_step_s >= 3.0
    assert [s.first_op for s in plan.stages][0] == 0 and plan.stages[-1].stop_op == len(w.names)


def test_same_inputs_in_any_order_give_the_same_plan_and_hash():
    w, swarm = three_sites(1)
    order = np.random.default_rng(5).permutation(len(swarm.peers))
    shuffled = Swarm.build([swarm.peers[i] for i in order], swarm.bandwidth[np.ix_(order, order)])
    a, b = schedule(w, swarm), schedule(w, shuffled)
    assert a.hash == b.hash and a.to_dict() == b.to_dict()
    assert json.loads(json.dumps(a.to_dict())) == a.to_dict()


def test_plan_is_complete_and_memory_feasible():
    w, swarm = three_sites(2)
    plan = schedule(w, swarm, PlanSettings(sync_every=1))   # synchronous replicas: memory forces a pipeline
    staged = [p for s in plan.stages for p in s.peers]
    assert sorted(staged + list(plan.spares)) == sorted(swarm.ids) and len(set(staged)) == len(staged)
    assert [s.first_op for s in plan.stages[1:]] == [s.stop_op for s in plan.stages[:-1]]
    memory = {p.peer_id: p.memory_bytes for p in swarm.peers}
    assert all(s.memory_bytes <= memory[p] for s in plan.stages for p in s.peers)
    assert [(link.src, link.dst) for link in plan.links] == [(k, k + 1) for k in range(len(plan.stages) - 1)]
    role = plan.role(plan.stages[0].peers[0])
    assert role["stage"] == 0 and role["previous"] == [] and role["next"] == list(plan.stages[1].peers)


def test_nothing_fits_is_reported_infeasible():
    rng = np.random.default_rng(0)
    w = random_workload(rng, 6, param_scale=1e9)
    swarm = Swarm.build([PeerSpec(f"p{i}", 1.0, 10**6) for i in range(3)], lambda a, b: 1e9)
    plan = schedule(w, swarm)
    assert not plan.feasible and plan.to_dict()["predicted_step_s"] is None


def test_slower_links_compress_harder():
    n = 6
    w = Workload.from_segments(flops=[2e10] * n, kernels=[10] * n, param_bytes=[1e6] * n, act_bytes=[1e5] * n,
                               cut_bytes=[2e6] * (n - 1) + [0])
    peers = [PeerSpec(f"p{i}", 10.0, 10**10) for i in range(3)]
    bw = {("p0", "p1"): 40e6, ("p1", "p2"): 200e6, ("p0", "p2"): 10e6}
    swarm = Swarm.build(peers, lambda a, b: bw[tuple(sorted((a, b)))])
    plan = evaluate_chain(w, swarm)
    slow, fast = plan.links
    assert slow.bandwidth_bps < fast.bandwidth_bps and slow.ratio > fast.ratio >= 1.0
    assert all(link.time_s <= plan.bottleneck_s * (1 + 1e-6) for link in plan.links)


def evaluate_chain(w, swarm):
    from swarm.scheduler import evaluate
    return evaluate(w, swarm, [((0, 2), [0]), ((2, 4), [1]), ((4, 6), [2])], PlanSettings())


def test_fences_follow_the_sites():
    _, swarm = three_sites(0)
    levels = fence_levels(swarm.bandwidth)
    assert len(levels[0]) == 1 and sorted(len(f) for f in levels[1]) == [3, 3, 4]


def test_baseline_is_one_peer_per_stage_in_id_order_with_equal_op_counts():
    w, swarm = three_sites(0)
    naive = baseline(w, swarm)
    assert [s.peers[0] for s in naive.stages] == sorted(swarm.ids)
    assert {s.stop_op - s.first_op for s in naive.stages} <= {2, 3} and all(link.ratio == 1 for link in naive.links)


@pytest.mark.parametrize("stages", [1, 2, 3, 5])
def test_fixed_stage_count_is_met_and_never_beats_the_free_choice(stages):
    rng = np.random.default_rng(7)
    w, swarm = random_workload(rng, 12), sites_swarm(rng, [3, 3], inside_bps=1e9, between_bps=50e6)
    free = schedule(w, swarm)
    fixed = schedule(w, swarm, PlanSettings(stages=stages))
    assert len(fixed.stages) == stages and fixed.feasible
    assert fixed.predicted_step_s >= free.predicted_step_s * (1 - 1e-9)
    assert not schedule(w, swarm, PlanSettings(stages=7)).feasible   # more stages than peers: no plan
    single = schedule(w, swarm, PlanSettings(stages=stages, max_replicas=1))
    assert len(single.stages) == stages and all(len(s.peers) == 1 for s in single.stages)
    assert len(single.spares) == len(swarm.peers) - stages


def test_a_straggler_is_not_a_replica_beside_fast_peers():
    """Replicas take equal shares of micro-batches, so a peer at a quarter of the speed would hold
    three fast peers back: the plan leaves it out of their stage (a spare, or a small stage of its own)."""
    rng = np.random.default_rng(7)
    w = random_workload(rng, 12)
    peers = [PeerSpec(f"peer{i}", 8.0 if i else 2.0, int(16e9)) for i in range(4)]   # peer0 is the straggler
    plan = schedule(w, Swarm.build(peers, lambda a, b: 1e12), PlanSettings(max_stages=1))   # all-reduce ~free
    assert len(plan.stages) == 1 and "peer0" not in plan.stages[0].peers and len(plan.stages[0].peers) == 3


def test_in_flight_covers_the_round_trip_of_a_slow_link():
    """Little's law: enough micro-batches in flight that the bottleneck never waits for a slow round trip."""
    from swarm.scheduler.plan import LinkPlan, Plan, StagePlan

    def plan(link_s: float, m: int = 16) -> Plan:
        stages = tuple(StagePlan(i, i, i + 1, (f"op{i}",), (f"p{i}",), 0.1, 1.0, 0.0) for i in range(3))
        links = tuple(LinkPlan(i, i + 1, 1e6, 1.0, 1.0, link_s) for i in range(2))
        return Plan("m", stages, links, (), max(0.1, link_s), 1.0, m)

    assert plan(0.0).in_flight() == 4                        # 0.3 s round trip / 0.1 s, plus one
    assert plan(0.1).in_flight() == 6                        # two 0.1 s links more
    assert plan(0.01).in_flight() == 5 and plan(5.0).in_flight() == 4   # a 5 s link is the bottleneck itself
    assert plan(0.1, m=4).in_flight() == 4 and plan(0.0, m=2).in_flight() == 3   # at most M, at least one per stage


def test_relayed_peers_take_roles_that_send_little_before_mid_pipeline_stages():
    """Memory forces three single-peer stages; a relayed peer gets an end stage (the last: it sends
    only gradients back), never the middle (two relayed links); with a fourth peer it is the spare,
    at most ``RELAY_SLACK`` slower than the fastest plan that ignores relays."""
    from dataclasses import replace

    from swarm.scheduler.opfence import RELAY_SLACK, relay_exposure

    n = 6
    w = Workload.from_segments(flops=[2e10] * n, kernels=[10] * n, param_bytes=[1e8] * n, act_bytes=[1e5] * n,
                               cut_bytes=[2e5] * (n - 1) + [0])
    settings = PlanSettings(max_replicas=1)
    for n_peers in (3, 4):
        peers = [PeerSpec(f"p{i}", 10.0, int(1e9)) for i in range(n_peers)]
        free = schedule(w, Swarm.build(peers, lambda a, b: 1e9), settings)
        assert len(free.stages) >= 3
        for r in range(n_peers):
            swarm = Swarm.build([replace(p, relayed=i == r) for i, p in enumerate(peers)], lambda a, b: 1e9)
            plan = schedule(w, swarm, settings)
            mid = [p for s in plan.stages[1:-1] for p in s.peers]
            assert f"p{r}" not in mid and f"p{r}" not in plan.stages[0].peers, plan.describe()
            assert relay_exposure(plan, swarm) == ((1, 0) if n_peers == 3 else (0, 0))
            assert (f"p{r}" in plan.spares) == (n_peers == 4)
            assert plan.predicted_step_s <= free.predicted_step_s * (1 + RELAY_SLACK)


def test_a_relayed_member_is_planned_as_relayed():
    import time

    from swarm.net.membership import MemberRecord, MembershipView
    from swarm.planning import swarm_of

    def record(peer, **fields):
        return MemberRecord(peer, [], "cpu", "test", 1.0, 1 << 30, {"swarm": "0"}, time.time(), time.time(), **fields)
    view = MembershipView({"a": record("a", reachability="relayed"), "b": record("b", reachability="nat"),
                           "c": record("c")}, time.time())
    assert [p.relayed for p in swarm_of(view, ["a", "b", "c"]).peers] == [True, False, False]
