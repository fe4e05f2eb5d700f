"""The planner prices rare sync (docs/sync.md): each plan chooses how often its replicas sync from its
links and compute, replicas across slow links become worth it, and plans report their utilization
and samples per second."""
import dataclasses

import pytest

from swarm.scheduler import Plan, PlanSettings, Workload, best_alone, evaluate, schedule
from swarm.scheduler.costs import choose_sync_every, sync_cost
from swarm.scheduler.whatif import load_peers_file


def gpt2_small_like(segments: int = 12) -> Workload:
    """gpt2-small's totals at micro-batch 8 x 128 (``node.py dag --model gpt2-small``): 6.6 TFLOP, 652 MB of
    parameters, 4.9 GB of activations, 1084 kernels; 3 MB crosses every cut."""
    n = segments
    return Workload.from_segments(flops=[6.613e12 / n] * n, kernels=[1084 / n] * n, param_bytes=[652.1e6 / n] * n,
                                  act_bytes=[4888.6e6 / n] * n, cut_bytes=[3.1e6] * (n - 1) + [0], samples=8)


def test_rare_sync_puts_the_three_sites_to_work():
    swarm, settings, _ = load_peers_file("configs/peers/three-sites.yaml")
    w = gpt2_small_like()
    before = schedule(w, swarm, dataclasses.replace(settings, sync_every=1))
    after = schedule(w, swarm, settings)   # sync_every 0: each plan chooses
    alone = best_alone(w, swarm, settings)
    assert before.utilization < 0.3   # synchronous replicas cannot cross the sites: a few GPUs of nine
    assert after.sync_every > 1 and sum(len(s.peers) for s in after.stages) >= 6
    assert after.utilization >= 0.7 and after.predicted_samples_per_s >= 5 * alone.predicted_samples_per_s
    assert after.predicted_samples_per_s >= 2.5 * before.predicted_samples_per_s


def test_the_period_follows_the_links():
    st = PlanSettings()
    assert choose_sync_every(0.001, 1.0, st) == 1                       # a fast LAN: every step
    slow = [choose_sync_every(raw, 1.0, st) for raw in (0.5, 5.0, 50.0, 500.0)]
    assert slow == sorted(slow) and slow[0] >= 2 and slow[-1] == st.max_sync_every
    waiting = dataclasses.replace(st, overlap=False)
    assert choose_sync_every(5.0, 1.0, waiting) >= choose_sync_every(5.0, 1.0, st)   # overlap hides the exchange
    assert sync_cost(5.0, 1.0, 8, st) == 0.0 and sync_cost(5.0, 1.0, 8, waiting) > 0
    assert choose_sync_every(500.0, 1.0, dataclasses.replace(st, sync_every=4)) == 4   # the config fixes it


def test_plans_carry_their_period_through_the_dht_form():
    swarm, settings, _ = load_peers_file("configs/peers/three-sites.yaml")
    w = gpt2_small_like()
    plan = schedule(w, swarm, settings)
    again = Plan.from_compact(plan.compact(), w.names)
    assert again.sync_every == plan.sync_every and again.hash == plan.hash
    old = {k: v for k, v in plan.compact().items() if k not in ("sync_every", "utilization", "predicted_samples_per_s")}
    assert Plan.from_compact(old, w.names).sync_every == 1   # a plan from before rare sync: synchronous


def test_utilization_is_model_flops_over_the_pool():
    swarm, settings, _ = load_peers_file("configs/peers/three-sites.yaml")
    w = gpt2_small_like()
    strongest = max(range(len(swarm.peers)), key=lambda p: swarm.peers[p].tflops)
    plan = evaluate(w, swarm, [((0, w.n), [strongest])], settings)
    pooled = sum(p.tflops for p in swarm.peers) * 1e12
    assert plan.utilization == pytest.approx(settings.micro_batches * w.flops[-1] / plan.predicted_step_s / pooled)
    assert plan.predicted_samples_per_s == pytest.approx(settings.micro_batches * 8 / plan.predicted_step_s)
