"""Measure the local device (matmul TFLOP/s by size, memory bandwidth, kernel overhead, memory).

Results are cached per device (``$SWARM_CACHE_DIR`` or ``~/.cache/swarm``) because measuring takes
a few seconds; ``measure(refresh=True)`` re-measures.
"""
from __future__ import annotations

import json
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from swarm.errors import SwarmError

MATMUL_SIZES = (64, 128, 256, 512, 1024, 2048)
PROFILE_VERSION = 2


@dataclass
class DeviceProfile:
    device: str                    # cpu | cuda | mps
    name: str
    threads: int
    matmul_tflops: dict[int, float]  # log2(n) -> measured TFLOP/s of an n x n x n fp32 matmul
    mem_bandwidth_gbps: float      # GB/s of bytes read + written by elementwise kernels
    kernel_overhead_us: float      # launch/dispatch cost of one tiny kernel
    memory_total_bytes: int
    memory_available_bytes: int
    torch_version: str = torch.__version__
    measured_at: float = field(default_factory=time.time)
    version: int = PROFILE_VERSION

    @property
    def tflops(self) -> float:
        """Best measured matmul rate (what the node advertises)."""
        return max(self.matmul_tflops.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["matmul_tflops"] = {str(k): v for k, v in self.matmul_tflops.items()}
        d["tflops"] = self.tflops
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DeviceProfile":
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        d["matmul_tflops"] = {int(k): float(v) for k, v in d["matmul_tflops"].items()}
        return cls(**d)


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
    return DeviceProfile(device, _device_name(device), torch.get_num_threads(), rates, bandwidth, overhead, total, available)


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
