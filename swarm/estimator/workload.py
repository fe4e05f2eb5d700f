"""Per-operator workload estimator (FusionLLM): cost of ops and stages on a device profile.

Pure arithmetic over ``OpDAG`` costs and a ``DeviceProfile``; no torch, no I/O.

Time model of one op on one device (a roofline with launch overhead), per micro-batch of ``b``
samples when the DAG was traced with ``b0`` (``scale = b / b0``)::

    t = sum_size(flops_size * scale / rate(size))      compute-bound kernels (matmul, conv, attention)
      + mem_bytes * scale / mem_bandwidth              memory-bound kernels (elementwise, norms, copies)
      + kernels * kernel_overhead                      dispatch / launch cost

``rate(size)`` interpolates the measured matmul TFLOP/s in log2(size), because small matmuls run far
below peak. The sum is multiplied by the device's ``calibration``: measured over predicted time of a
reference transformer block, taken when the device is profiled (it absorbs what the roofline misses:
cache effects, kernel fusion, non-square shapes). Forward and backward keep their own memory and launch terms; the compute term is split
in proportion to forward and backward FLOPs.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from swarm.dag.graph import Op, OpDAG, Partition
from swarm.estimator.device import DeviceProfile

# Optimizer state in parameter-sized fp32 tensors: Adam keeps two moments, SGD (momentum) one.
OPTIMIZER_STATES = {"adam": 2, "sgd": 1}


@dataclass(frozen=True)
class TrainingSettings:
    micro_batch_size: int = 1
    optimizer: str = "adam"
    in_flight: int = 1  # micro-batches whose activations a stage holds at once (pipeline depth)


@dataclass
class StageCost:
    first_op: int
    n_ops: int
    flops: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    peak_memory_bytes: int
    forward_s: float
    backward_s: float
    optimizer_s: float
    input_bytes: int   # received per micro-batch (boundary tensors)
    output_bytes: int  # sent per micro-batch

    @property
    def compute_s(self) -> float:
        """Forward plus backward time of one micro-batch."""
        return self.forward_s + self.backward_s

    def to_dict(self) -> dict:
        return {**asdict(self), "compute_s": self.compute_s}


def matmul_rate_flops(profile: DeviceProfile, size_log2: int) -> float:
    """Interpolated FLOP/s for a matmul of size 2**size_log2 (clamped to the measured range)."""
    sizes = sorted(profile.matmul_tflops)
    if size_log2 <= sizes[0]:
        return profile.matmul_tflops[sizes[0]] * 1e12
    if size_log2 >= sizes[-1]:
        return profile.matmul_tflops[sizes[-1]] * 1e12
    lo = max(s for s in sizes if s <= size_log2)
    hi = min(s for s in sizes if s >= size_log2)
    if lo == hi:
        return profile.matmul_tflops[lo] * 1e12
    w = (size_log2 - lo) / (hi - lo)
    return math.exp((1 - w) * math.log(profile.matmul_tflops[lo]) + w * math.log(profile.matmul_tflops[hi])) * 1e12


def op_time_s(op: Op, profile: DeviceProfile, scale: float = 1.0) -> tuple[float, float]:
    """(forward, backward) seconds of ``op`` for ``scale`` times the traced batch."""
    compute = sum(f * scale / matmul_rate_flops(profile, size) for size, f in op.flops_by_size.items())
    fwd_share = op.flops_fwd / op.flops if op.flops else 0.0
    bandwidth = profile.mem_bandwidth_gbps * 1e9
    overhead = profile.kernel_overhead_us * 1e-6
    fwd = compute * fwd_share + op.mem_bytes_fwd * scale / bandwidth + op.kernels_fwd * overhead
    bwd = compute * (1 - fwd_share) + op.mem_bytes_bwd * scale / bandwidth + op.kernels_bwd * overhead
    return fwd * profile.calibration, bwd * profile.calibration


def stage_cost(dag: OpDAG, ops: range, profile: DeviceProfile, settings: TrainingSettings = TrainingSettings(),
               boundary: tuple[int, int] = (0, 0)) -> StageCost:
    """Cost of running ``dag.ops[ops]`` as one stage; ``boundary`` = (input, output) bytes per traced batch."""
    scale = settings.micro_batch_size / dag.batch_size
    chosen = [dag.ops[i] for i in ops]
    times = [op_time_s(op, profile, scale) for op in chosen]
    params = sum(op.param_bytes for op in chosen)
    optimizer = params * OPTIMIZER_STATES[settings.optimizer]
    activations = int(sum(op.act_bytes for op in chosen) * scale) * settings.in_flight
    transient = int(max((op.out_bytes for op in chosen), default=0) * scale) * 2
    bandwidth = profile.mem_bandwidth_gbps * 1e9
    return StageCost(
        first_op=ops.start, n_ops=len(ops), flops=int(sum(op.flops for op in chosen) * scale),
        param_bytes=params, grad_bytes=params, optimizer_bytes=optimizer, activation_bytes=activations,
        peak_memory_bytes=2 * params + optimizer + sum(op.buffer_bytes for op in chosen) + activations + transient,
        forward_s=sum(f for f, _ in times), backward_s=sum(b for _, b in times),
        # an optimizer step reads and writes parameters, gradients and state once
        optimizer_s=2 * (2 * params + optimizer) / bandwidth,
        input_bytes=int(boundary[0] * scale), output_bytes=int(boundary[1] * scale),
    )


def boundary_bytes(dag: OpDAG, partition: Partition) -> list[tuple[int, int]]:
    """(input, output) bytes of each stage per traced batch; model inputs and outputs count as zero."""
    cuts = dag.cut_bytes()
    ranges = partition.ranges()
    return [(cuts[r.start - 1] if s else 0, cuts[r.stop - 1] if s < len(ranges) - 1 else 0)
            for s, r in enumerate(ranges)]


def estimate(dag: OpDAG, partition: Partition, profiles: list[DeviceProfile],
             settings: TrainingSettings = TrainingSettings()) -> list[StageCost]:
    """Cost of every stage of ``partition``, stage s on ``profiles[s]``."""
    if len(profiles) != partition.n_stages:
        raise ValueError(f"{partition.n_stages} stages but {len(profiles)} device profiles")
    return [stage_cost(dag, r, p, settings, io) for r, p, io in zip(partition.ranges(), profiles, boundary_bytes(dag, partition))]
