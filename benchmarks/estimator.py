"""Estimator accuracy: predicted vs measured forward+backward time of pipeline stages on this device.

    python -m benchmarks.estimator [--models gpt2-tiny gpt2-small] [--stages 4] [--json-out FILE]

A stage's prediction is the sum of its ops' roofline times (``swarm.estimator.roofline.op_time_s``)
on this device's profile. It lives here, not in the package: the planner prices compute as FLOPs
over each peer's measured training rate (``swarm.scheduler.costs``), and the per-op roofline only
calibrates device profiles.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass

import torch

from swarm.dag.graph import OpDAG, Partition
from swarm.dag.stages import extract_stages
from swarm.dag.trace import trace
from swarm.estimator import DeviceProfile, load_or_measure, op_time_s
from swarm.models import load_model

WARMUP = 2  # first runs pay for page faults and allocator growth
CASES = {"gpt2-tiny": 8, "gpt2-small": 1}  # model -> micro-batch size


@dataclass(frozen=True)
class StageEstimate:
    """The roofline's prediction for one pipeline stage and one micro-batch."""

    flops: int
    forward_s: float
    backward_s: float

    @property
    def compute_s(self) -> float:
        """Forward plus backward time of one micro-batch."""
        return self.forward_s + self.backward_s


def estimate(dag: OpDAG, partition: Partition, profile: DeviceProfile, micro_batch_size: int) -> list[StageEstimate]:
    """Every stage of ``partition`` on ``profile``, for micro-batches of ``micro_batch_size`` samples."""
    scale = micro_batch_size / dag.batch_size
    out = []
    for ops in partition.ranges():
        times = [op_time_s(dag.ops[i], profile, scale) for i in ops]
        out.append(StageEstimate(int(sum(dag.ops[i].flops for i in ops) * scale), sum(f for f, _ in times),
                                 sum(b for _, b in times)))
    return out


def stage_inputs(stages, inputs):
    """Boundary values of every stage, computed once without autograd."""
    env = dict(zip(stages[0].io.inputs, inputs))
    per_stage = []
    with torch.no_grad():
        for stage in stages:
            per_stage.append([env[n] for n in stage.io.inputs])
            env.update(zip(stage.io.outputs, stage(*per_stage[-1])))
    return per_stage


def measure_stage(stage, inputs, repeats: int) -> float:
    """Median seconds of forward + backward of one micro-batch through ``stage``."""
    times = []
    for _ in range(repeats + WARMUP):
        args = [t.detach().requires_grad_() if torch.is_tensor(t) and t.is_floating_point() else t for t in inputs]
        start = time.perf_counter()
        outs = [t for t in stage(*args) if torch.is_tensor(t) and t.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
        times.append(time.perf_counter() - start)
        stage.module.zero_grad(set_to_none=True)
    return statistics.median(times[WARMUP:])


def run(models: list[str], n_stages: int, repeats: int) -> list[dict]:
    profile = load_or_measure("cpu", refresh=True)  # measured in the same run as the stages
    rows = []
    for name in models:
        micro_batch = CASES.get(name, 1)
        built = load_model(name)
        torch.manual_seed(0)
        inputs = built.example_inputs(micro_batch)
        traced = trace(built.module, inputs, "coarse", name=name)
        partition = traced.dag.balanced_partition(n_stages)
        stages = extract_stages(traced, partition)
        predicted = estimate(traced.dag, partition, profile, micro_batch)
        for stage, args, cost in zip(stages, stage_inputs(stages, inputs), predicted):
            measured = measure_stage(stage, args, repeats)
            rows.append({"model": name, "micro_batch": micro_batch, "stage": stage.io.index,
                         "ops": f"{stage.io.ops[0]}..{stage.io.ops[-1]}", "gflop": cost.flops / 1e9,
                         "predicted_ms": cost.compute_s * 1e3, "measured_ms": measured * 1e3,
                         "ratio": cost.compute_s / measured})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(CASES))
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    rows = run(args.models, args.stages, args.repeats)
    print(f"{'model':<12}{'mb':>4}{'stage':>6}  {'ops':<26}{'GFLOP':>9}{'pred ms':>10}{'meas ms':>10}{'pred/meas':>11}")
    for r in rows:
        print(f"{r['model']:<12}{r['micro_batch']:>4}{r['stage']:>6}  {r['ops']:<26}{r['gflop']:>9.2f}"
              f"{r['predicted_ms']:>10.1f}{r['measured_ms']:>10.1f}{r['ratio']:>11.2f}")
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"worst error: {worst:.0%} (target: within 30%)")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"rows": rows, "worst_error": worst}, f, indent=1)


if __name__ == "__main__":
    main()
