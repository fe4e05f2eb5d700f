"""One cost model, one source of settings: the planner prices memory at the micro-batches the runtime
keeps in flight, settings are built from the config with its defaults, and the pure planning layers
import neither torch nor hivemind."""
import subprocess
import sys

import numpy as np
import pytest

from swarm.compression.policy import LinkPolicy
from swarm.config import CompressionConfig, ElectionConfig, NodeConfig, election_settings, plan_settings
from swarm.election import ElectionSettings
from swarm.errors import SwarmError
from swarm.runtime.schedule import SCHEDULES
from swarm.runtime.schedule import in_flight as schedule_in_flight
from swarm.scheduler import PeerSpec, PlanSettings, Swarm, Workload, evaluate, in_flight
from swarm.scheduler.costs import SCHEDULES as PLANNED_SCHEDULES
from swarm.scheduler.costs import stage_memory


def chain(stages: int, act_bytes: float = 1e6, memory: int = 10**12) -> tuple[Workload, Swarm, list]:
    n = 2 * stages
    w = Workload.from_segments(flops=[1e9] * n, kernels=[10] * n, param_bytes=[1e5] * n, act_bytes=[act_bytes] * n,
                               cut_bytes=[1e5] * (n - 1) + [0])
    swarm = Swarm.build([PeerSpec(f"p{i}", 1.0, memory) for i in range(stages)], lambda a, b: 1e9)
    return w, swarm, [((2 * s, 2 * s + 2), [s]) for s in range(stages)]


def runtime_in_flight(plan, schedule: str) -> int:
    """What the first stage's driver keeps in flight (``TrainingSession._drive``)."""
    return plan.micro_batches if schedule == "gpipe" else plan.in_flight()


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages,m", [(1, 1), (1, 8), (2, 4), (3, 8), (4, 2), (6, 16)])
def test_planner_prices_memory_at_what_the_runtime_keeps_in_flight(schedule, stages, m):
    w, swarm, layout = chain(stages)
    settings = PlanSettings(micro_batches=m, schedule=schedule)
    plan = evaluate(w, swarm, layout, settings)
    held = plan.in_flight(schedule)
    assert held == runtime_in_flight(plan, schedule)
    assert held >= max(schedule_in_flight(SCHEDULES[schedule](s, stages, m)) for s in range(stages))
    for s, ((a, b), _) in zip(plan.stages, layout):
        assert s.memory_bytes == pytest.approx(float(stage_memory(w, a, b, settings, held)))
        left = 1e5 if b < w.n else 0.0   # the activation leaving the stage, kept with each micro-batch's
        assert s.memory_bytes == pytest.approx(float(stage_memory(w, a, b, settings, 0)) + (2 * 1e6 + left) * held)


def test_in_flight_rule():
    assert in_flight("gpipe", 16, 3, 1.0, 0.1) == 16
    assert in_flight("1f1b", 16, 3, 0.3, 0.1) == 4 and in_flight("1f1b", 2, 3, 0.3, 0.1) == 3
    assert in_flight("1f1b", 16, 3, 0.3, 0.0) == 3
    assert set(SCHEDULES) == set(PLANNED_SCHEDULES)
    with pytest.raises(SwarmError, match="unknown schedule"):
        PlanSettings(schedule="zigzag")


@pytest.mark.parametrize("schedule,m,stages", [("gpipe", 16, 2), ("1f1b", 16, 6)])
def test_a_plan_that_fits_only_at_four_in_flight_is_refused(schedule, m, stages):
    # params, grads, Adam's two moments; a frame each way at both boundaries; 4 micro-batches of
    # activations and the cut each leaves; one segment's backward gradients
    static = (2 + 2) * 2e5 + 2 * (1e5 + 1e5) + (2e6 + 1e5) * 4 + 1e6
    w, swarm, layout = chain(stages, memory=int(static * 1.2))
    four = evaluate(w, swarm, layout, PlanSettings(micro_batches=m, schedule=schedule, in_flight=4, recompute="off"))
    real = evaluate(w, swarm, layout, PlanSettings(micro_batches=m, schedule=schedule, recompute="off"))
    assert four.feasible and not real.feasible
    assert real.in_flight(schedule) > 4
    assert all(r.memory_bytes > f.memory_bytes for r, f in zip(real.stages, four.stages))
    # recomputation (auto) keeps only each stage's boundaries per micro-batch: the plan fits, at the
    # price of a second forward pass (a third of the FLOPs here) on every stage that needed it
    auto = evaluate(w, swarm, layout, PlanSettings(micro_batches=m, schedule=schedule))
    assert auto.feasible and all(s.recompute for s in auto.stages)
    assert all(s.memory_bytes <= int(static * 1.2) for s in auto.stages)
    again = 2 * 1e9 / 3 / 1e12 + 2 * 10 / 3 * PlanSettings.kernel_overhead_s   # two segments' forward share
    assert all(a.compute_s - f.compute_s == pytest.approx(again) for a, f in zip(auto.stages, four.stages))
    assert [s.recompute for s in four.stages] == [False] * stages   # it fits without: auto leaves it alone
    on = evaluate(w, swarm, layout, PlanSettings(micro_batches=m, schedule=schedule, in_flight=4, recompute="on"))
    assert all(s.recompute for s in on.stages) and on.predicted_step_s > four.predicted_step_s


def test_settings_come_from_the_config_with_its_defaults():
    cfg = NodeConfig()
    assert plan_settings(cfg.election) == PlanSettings()
    assert election_settings(cfg.election) == ElectionSettings()
    e = ElectionConfig(join_batch_s=2, min_epoch_s=3, election_timeout_s=5, min_members=3, micro_batches=16, stages=2,
                       max_replicas=4)
    assert election_settings(e, leader="rotating", epoch_window=64) == ElectionSettings(2.0, 3.0, 5.0, 3, "rotating", 64)
    planned = plan_settings(e, max_ratio=8.0, schedule="gpipe", optimizer="sgd")
    assert (planned.micro_batches, planned.stages, planned.max_replicas, planned.max_ratio, planned.schedule,
            planned.optimizer) == (16, 2, 4, 8.0, "gpipe", "sgd")
    assert cfg.compression.max_ratio is None and LinkPolicy.max_ratio == PlanSettings.max_ratio   # None: the table's cap
    assert cfg.compression.ratio == LinkPolicy.fixed_ratio and cfg.training.schedule == PlanSettings.schedule


def test_link_policy_from_config():
    from swarm.scheduler import LinkPlan

    link = LinkPlan(0, 1, 50e6, 2e6, 3.0, 0.1)
    comp = CompressionConfig(mode="fixed", ratio=12, max_ratio=20, warmup_steps=5)
    policy = LinkPolicy.from_config(comp, link, 0.25, 2)
    assert policy == LinkPolicy("fixed", 2e6, 0.25, 2, 50e6, 12.0, 20.0, 5)
    auto = LinkPolicy.from_config(CompressionConfig(), link, 0.25, 1, codec_s_per_byte=1e-8)
    assert auto.mode == "auto" and auto.codec_s_per_byte == 1e-8 and auto.warmup_steps == 20


def test_planning_layers_import_neither_torch_nor_hivemind():
    code = ("import sys; import swarm.scheduler, swarm.scheduler.whatif, swarm.election, swarm.config; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'hivemind')); print(bad); "
            "sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_search_and_exact_model_share_one_formula():
    """The OP-Fence search's range costs are the exact model's on every single range."""
    from swarm.scheduler.opfence import _Ranges
    from swarm.scheduler.plan import evaluate as exact

    rng = np.random.default_rng(1)
    n = 6
    w = Workload.from_segments(flops=rng.uniform(1e9, 5e9, n), kernels=rng.integers(5, 50, n),
                               param_bytes=rng.uniform(1e5, 1e6, n), act_bytes=rng.uniform(1e5, 1e6, n),
                               cut_bytes=list(rng.uniform(1e5, 1e6, n - 1)) + [0])
    swarm = Swarm.build([PeerSpec("p0", 3.0, 10**12)], lambda a, b: 1e9)
    settings = PlanSettings()
    ranges = _Ranges(w, settings)
    cost = ranges.stage(3.0, 1, np.inf, 10**12, settings.rpc_cpu_s)
    for a in range(n):
        for b in range(a + 1, n + 1):
            assert cost[a, b] == pytest.approx(exact(w, swarm, [((a, b), [0])], settings).stages[0].compute_s, rel=1e-12)
    link = ranges.link(1e8, 1)
    assert link[0] == pytest.approx(min(2 * w.cut_bytes[0] * 8 / 1e8,
                                        2 * w.cut_bytes[0] * 8 / 1e8 / 16 + 2 * w.cut_bytes[0] / 2e8))
