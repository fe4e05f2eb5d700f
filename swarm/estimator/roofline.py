"""Per-operator roofline (FusionLLM): the time of one op on a device profile.

Pure arithmetic over ``Op`` costs and a ``DeviceProfile``; no torch, no I/O. Device calibration
(``profile``) compares it with a measured transformer block; ``benchmarks/estimator.py`` sums it
over pipeline stages. The planner does not use it: it prices compute as ``flops / model_tflops``
(``swarm.scheduler.costs``), with each peer's measured training rate.

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

from swarm.dag.graph import Op
from swarm.estimator.device import DeviceProfile


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
