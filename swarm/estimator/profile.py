"""Measure the local device (matmul TFLOP/s by size, memory bandwidth, kernel overhead, memory).

Results are cached per device (``$SWARM_CACHE_DIR`` or ``~/.cache/swarm``) because measuring takes
a few seconds; ``measure(refresh=True)`` re-measures.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from swarm.errors import SwarmError
from swarm.estimator.device import PROFILE_VERSION, DeviceProfile
from swarm.estimator.workload import op_time_s

MATMUL_SIZES = (64, 128, 256, 512, 1024, 2048)


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SwarmError("device 'cuda' requested but torch sees no CUDA device")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SwarmError("device 'mps' requested but torch sees no MPS device")
    if device not in ("cpu", "cuda", "mps"):
        raise SwarmError(f"unknown device '{device}' (choose auto, cpu, cuda or mps)")
    return device


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def _seconds_per_call(fn: Callable[[], object], device: str, min_time_s: float = 0.1, rounds: int = 3) -> float:
    """Best of ``rounds`` averages over at least ``min_time_s`` each (noise only ever slows a run)."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(rounds):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            _sync(device)
            elapsed = time.perf_counter() - start
            if elapsed >= min_time_s:
                break
        best = min(best, elapsed / calls)
    return best


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    if device == "cpu":
        try:
            match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
            if match:
                return match.group(1).strip()
        except OSError:
            pass
    return platform.processor() or device


def _memory(device: str) -> tuple[int, int]:
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        return total, free
    if device == "mps":
        total = int(torch.mps.recommended_max_memory())
        return total, total - int(torch.mps.driver_allocated_memory())
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return int(info["MemTotal"].split()[0]) * 1024, int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages, pages


def _calibration(profile: DeviceProfile, repeats: int = 5) -> float:
    """Measured / predicted forward+backward time of a reference transformer block (d=384, T=256)."""
    from swarm.dag.trace import trace  # the estimator's model of a block is checked against the real thing
    from swarm.models.gpt import Block

    block = Block(384, 6, 0.0).to(profile.device)
    x = torch.randn(2, 256, 384, device=profile.device, requires_grad=True)
    predicted = sum(sum(op_time_s(op, profile)) for op in trace(block, (x,), "fine").dag.ops)
    grad = torch.ones_like(x)

    def step() -> None:
        block(x).backward(grad)

    times = []
    for i in range(repeats + 2):  # two warm-up runs
        _sync(profile.device)
        start = time.perf_counter()
        step()
        _sync(profile.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) / predicted


def measure_device(device: str = "auto", min_time_s: float = 0.05) -> DeviceProfile:
    """Run the micro-benchmarks on ``device`` (a few seconds)."""
    device = resolve_device(device)
    rates = {}
    for n in MATMUL_SIZES:
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        rates[n.bit_length() - 1] = 2 * n**3 / _seconds_per_call(lambda: a @ b, device, min_time_s) / 1e12
    x = torch.randn(4 << 20, device=device)  # 16 MiB per tensor: activation-sized, beyond L2
    y, z = torch.empty_like(x), torch.randn_like(x)
    bandwidth = 3 * x.numel() * 4 / _seconds_per_call(lambda: torch.add(x, z, out=y), device, min_time_s) / 1e9
    tiny = torch.ones(1, device=device)
    overhead = _seconds_per_call(lambda: tiny.add(1), device, min_time_s) * 1e6
    total, available = _memory(device)
    profile = DeviceProfile(device=device, name=_device_name(device), threads=torch.get_num_threads(),
                            matmul_tflops=rates, mem_bandwidth_gbps=bandwidth, kernel_overhead_us=overhead,
                            calibration=1.0, memory_total_bytes=total, memory_available_bytes=available,
                            torch_version=torch.__version__)
    return dataclasses.replace(profile, calibration=_calibration(profile))


def cache_dir() -> Path:
    return Path(os.environ.get("SWARM_CACHE_DIR") or Path.home() / ".cache" / "swarm")


def _cache_path(device: str) -> Path:
    key = re.sub(r"[^A-Za-z0-9]+", "-", f"{device}-{_device_name(device)}-t{torch.get_num_threads()}-torch{torch.__version__}")
    return cache_dir() / "profiles" / f"{key.strip('-')}.json"


def load_or_measure(device: str = "auto", refresh: bool = False) -> DeviceProfile:
    """The cached profile of this device, measuring it first if needed."""
    device = resolve_device(device)
    path = _cache_path(device)
    if not refresh and path.exists():
        try:
            profile = DeviceProfile.from_dict(json.loads(path.read_text()))
            if profile.version == PROFILE_VERSION:
                profile.memory_total_bytes, profile.memory_available_bytes = _memory(device)  # changes; cheap
                return profile
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a corrupt or old cache entry is simply re-measured
    profile = measure_device(device)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(profile.to_dict(), indent=1))
    except OSError:
        pass  # an unwritable cache only costs re-measuring next time
    return profile
