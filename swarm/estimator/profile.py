"""Measure the local device (matmul TFLOP/s by size, memory bandwidth, kernel overhead, memory).

Results are cached per device (``$SWARM_CACHE_DIR`` or ``~/.cache/swarm``) because measuring takes
a few seconds; ``measure(refresh=True)`` re-measures.

A CPU under a cgroup quota (a container, a shared host, the testbed) runs at full speed for part of
every scheduler period and not at all for the rest, so a short timed run reads anywhere between the
sustained and the full rate. Under a quota that binds (fewer cores than torch's threads), the CPU is
therefore timed by the process's CPU time and the rates are scaled to the cores the quota allows.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from swarm.errors import SwarmError
from swarm.estimator.device import PROFILE_VERSION, DeviceProfile
from swarm.estimator.roofline import op_time_s

MATMUL_SIZES = (64, 128, 256, 512, 1024, 2048)


def resolve_device(device: str = "auto") -> str:
    """``cpu``, ``mps`` or ``cuda:N`` for a ``device`` setting (``auto``: the first CUDA device, else
    MPS, else the CPU; ``cuda``: ``cuda:0``); a device torch cannot see is a one-line error."""
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "mps" if mps else "cpu"
    kind, _, index = device.partition(":")
    if kind == "cuda" and (index.isdigit() or not index):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise SwarmError(f"device '{device}' requested but torch sees no CUDA device")
        if int(index or 0) >= count:
            raise SwarmError(f"device '{device}' requested but torch sees {count} CUDA device{'s' * (count > 1)} "
                             f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
        return f"cuda:{int(index or 0)}"
    if device == "mps" and not mps:
        raise SwarmError("device 'mps' requested but torch sees no MPS device")
    if device not in ("cpu", "mps"):
        raise SwarmError(f"unknown device '{device}' (choose auto, cpu, cuda, cuda:N or mps)")
    return device


def _kind(device: str) -> str:
    return torch.device(device).type


def _sync(device: str) -> None:
    if _kind(device) == "cuda":
        torch.cuda.synchronize(device)
    elif device == "mps":
        torch.mps.synchronize()


def cpu_quota_cores(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The cores' worth of CPU time this process's cgroups allow (the tightest quota on the way to
    the root, cgroup v1 or v2), or None without a quota."""
    def quota_of(group: Path, v2: bool) -> float | None:
        try:
            if v2:   # cpu.max = "<quota|max> <period>"
                quota, period = (group / "cpu.max").read_text().split()
            else:
                quota, period = ((group / f).read_text().strip() for f in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
            return None if quota in ("max", "-1") else int(quota) / int(period)
        except (OSError, ValueError):
            return None

    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        v2 = controllers == ""
        if not v2 and "cpu" not in controllers.split(","):
            continue
        base = root if v2 else root / controllers
        group = base / path.lstrip("/")
        quotas += [quota_of(g, v2) for g in (group, *group.parents) if g == base or base in g.parents]
    quotas = [q for q in quotas if q is not None]
    return min(quotas) if quotas else None


def binding_quota(device: str) -> float | None:
    """The CPU quota (cores) when it allows fewer cores than torch's threads, else None."""
    quota = cpu_quota_cores() if device == "cpu" else None
    return quota if quota is not None and quota < torch.get_num_threads() else None


def _clock(quota: float | None) -> Callable[[], float]:
    """Wall time, or under a binding quota the process's CPU time (immune to throttling)."""
    return time.process_time if quota else time.perf_counter


def _seconds_per_call(fn: Callable[[], object], device: str, min_time_s: float = 0.1, rounds: int = 3,
                      clock: Callable[[], float] = time.perf_counter) -> float:
    """Best of ``rounds`` averages over at least ``min_time_s`` each (noise only ever slows a run)."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(rounds):
        calls, start = 0, clock()
        while True:
            fn()
            calls += 1
            _sync(device)
            elapsed = clock() - start
            if elapsed >= min_time_s:
                break
        best = min(best, elapsed / calls)
    return best


def _device_name(device: str) -> str:
    if _kind(device) == "cuda":
        return torch.cuda.get_device_name(device)
    if device == "cpu":
        try:
            match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
            if match:
                return match.group(1).strip()
        except OSError:
            pass
    return platform.processor() or device


def _memory(device: str) -> tuple[int, int]:
    if _kind(device) == "cuda":
        free, total = torch.cuda.mem_get_info(device)
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


def _calibration(profile: DeviceProfile, repeats: int = 5, clock: Callable[[], float] = time.perf_counter) -> float:
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
    for _ in range(repeats + 2):  # two warm-up runs
        _sync(profile.device)
        start = clock()
        step()
        _sync(profile.device)
        times.append(clock() - start)
    return statistics.median(times[2:]) / predicted


def under_quota(profile: DeviceProfile, cores: float) -> DeviceProfile:
    """``profile`` measured per CPU-second, as it runs with ``cores`` cores' worth of CPU time."""
    return dataclasses.replace(profile, matmul_tflops={k: v * cores for k, v in profile.matmul_tflops.items()},
                               mem_bandwidth_gbps=profile.mem_bandwidth_gbps * cores,
                               kernel_overhead_us=profile.kernel_overhead_us / min(cores, 1.0), cpu_quota_cores=cores)


def measure_device(device: str = "auto", min_time_s: float = 0.05) -> DeviceProfile:
    """Run the micro-benchmarks on ``device`` (a few seconds)."""
    device = resolve_device(device)
    threads = torch.get_num_threads()
    quota = binding_quota(device)
    clock = _clock(quota)
    rates = {}
    for n in MATMUL_SIZES:
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        rates[n.bit_length() - 1] = 2 * n**3 / _seconds_per_call(lambda a=a, b=b: a @ b, device, min_time_s, clock=clock) / 1e12
    x = torch.randn(4 << 20, device=device)  # 16 MiB per tensor: activation-sized, beyond L2
    y, z = torch.empty_like(x), torch.randn_like(x)
    bandwidth = 3 * x.numel() * 4 / _seconds_per_call(lambda: torch.add(x, z, out=y), device, min_time_s, clock=clock) / 1e9
    tiny = torch.ones(1, device=device)
    overhead = _seconds_per_call(lambda: tiny.add(1), device, min_time_s, clock=clock) * 1e6
    total, available = _memory(device)
    profile = DeviceProfile(device=device, name=_device_name(device), threads=threads,
                            matmul_tflops=rates, mem_bandwidth_gbps=bandwidth, kernel_overhead_us=overhead,
                            calibration=1.0, memory_total_bytes=total, memory_available_bytes=available,
                            torch_version=torch.__version__)
    profile = dataclasses.replace(profile, calibration=_calibration(profile, clock=clock))
    return under_quota(profile, quota) if quota else profile


def measure_training_tflops(module: torch.nn.Module, inputs: list[torch.Tensor], flops: float,
                            device: str = "cpu", repeats: int = 3) -> float:
    """TFLOP/s this device sustains on a training pass (forward + backward, ``flops`` in all) of
    ``module`` on ``inputs``: best of ``repeats`` after a warm-up, CPU time scaled to a binding quota.
    Leaves no gradient behind."""
    device = resolve_device(device)
    quota = binding_quota(device)
    clock = _clock(quota)
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> None:
        out = module(*inputs)
        outs = out if isinstance(out, (tuple, list)) else [out]
        sum(o.float().sum() for o in outs if torch.is_tensor(o) and o.is_floating_point()).backward()

    best = float("inf")
    try:
        for i in range(repeats + 1):
            _sync(device)
            start = clock()
            step()
            _sync(device)
            if i:
                best = min(best, clock() - start)
    finally:
        for p in params:
            p.grad = None
    rate = flops / max(best, 1e-9) / 1e12
    return rate * quota if quota else rate


def cache_dir() -> Path:
    return Path(os.environ.get("SWARM_CACHE_DIR") or Path.home() / ".cache" / "swarm")


def cache_path(device: str) -> Path:
    """Where this device's profile is cached (the key names the device, threads, a binding quota, torch)."""
    quota = binding_quota(device)
    limit = f"-q{quota:.3g}" if quota else ""
    key = re.sub(r"[^A-Za-z0-9]+", "-", f"{device}-{_device_name(device)}-t{torch.get_num_threads()}{limit}-torch{torch.__version__}")
    return cache_dir() / "profiles" / f"{key.strip('-')}.json"


def load_or_measure(device: str = "auto", refresh: bool = False) -> DeviceProfile:
    """The cached profile of this device, measuring it first if needed."""
    device = resolve_device(device)
    path = cache_path(device)
    if not refresh and path.exists():
        try:
            profile = DeviceProfile.from_dict(json.loads(path.read_text()))
            if profile.version == PROFILE_VERSION:
                profile.memory_total_bytes, profile.memory_available_bytes = _memory(device)  # changes; cheap
                return profile
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a corrupt or old cache entry is simply re-measured
    profile = measure_device(device)
    _write_cache(path, profile.to_dict())
    return profile


def load_or_measure_training(device: str, key: str, measure: Callable[[], float]) -> float:
    """A training pass's TFLOP/s (``measure_training_tflops``) for the model named by ``key``, cached
    beside the device's profile."""
    base = cache_path(resolve_device(device))
    path = base.with_name(f"{base.stem}-model-{key}.json")
    try:
        return float(json.loads(path.read_text())["tflops"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not measured yet, or unreadable: measured again
    tflops = measure()
    _write_cache(path, {"tflops": tflops})
    return tflops


def _write_cache(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1))
    except OSError:
        pass  # an unwritable cache only costs re-measuring next time
