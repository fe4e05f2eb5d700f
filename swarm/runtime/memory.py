"""What a node's process holds in memory, measured: resident memory on a CPU (``VmRSS``, its peak
``VmHWM`` since the last reset through ``/proc/self/clear_refs``), the caching allocator's allocations
on CUDA (``memory_allocated`` / ``max_memory_allocated``), the driver's on MPS. ``memory_limit_gb``
caps these numbers (``NodeConfig.advertised_memory``); a stage whose peak passes the cap says so
(``MemoryGauge.over``). Measurement only: no step logic."""
from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
M_MMAP_THRESHOLD = -3        # glibc's mallopt parameter
MMAP_THRESHOLD = 128 << 10   # its initial value, then kept: every larger block is mapped and unmapped on free


def return_freed_memory() -> bool:
    """Make glibc give every freed block of ``MMAP_THRESHOLD`` or more back to the system at once (it
    otherwise raises the threshold after the first such free and keeps later ones in its heap), so a
    CPU node's resident memory is what its tensors hold: the number its ``memory_limit_gb`` caps.
    Costs a page fault per fresh page of a large tensor. False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def _status_kib(key: str) -> int | None:
    """A ``VmRSS``-style line of /proc/self/status in bytes (None off Linux)."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def resident_bytes() -> int:
    """This process's resident memory now."""
    rss = _status_kib("VmRSS")
    return rss if rss is not None else peak_resident_bytes()


def peak_resident_bytes() -> int:
    """The most this process held resident since it started or since ``reset_resident_peak``."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024   # bytes on macOS, KiB elsewhere


def reset_resident_peak() -> bool:
    """Start ``peak_resident_bytes`` over from the resident memory now (Linux; False where it cannot)."""
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class MemoryGauge:
    """What counts against a node's memory cap on ``device``: its allocations on a GPU, the whole
    process's resident memory on a CPU."""

    device: torch.device

    def used(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        if self.device.type == "mps":
            return int(torch.mps.driver_allocated_memory())
        return resident_bytes()

    def peak(self) -> int:
        """The most used since the last ``reset`` (on MPS, which keeps no peak: now)."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.device.type == "mps":
            return self.used()
        return peak_resident_bytes()

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.device.type == "cpu":
            reset_resident_peak()

    def over(self, limit_bytes: int | None, planned_bytes: float, stage: int, peak: int | None = None) -> str | None:
        """The one line a stage says when its measured peak (``peak``, read now if not given) passed its
        cap ``limit_bytes`` (else None)."""
        peak = self.peak() if peak is None else peak
        if limit_bytes is None or peak <= limit_bytes:
            return None
        what = "allocated on " + str(self.device) if self.device.type != "cpu" else "resident"
        return (f"stage {stage}: measured peak memory {peak / 1e9:.3f} GB ({what}) exceeds memory_limit_gb "
                f"{limit_bytes / 1e9:.3f} GB; the plan predicted {planned_bytes / 1e9:.3f} GB for the stage's state "
                "(set recompute: on, a smaller micro_batch_size or a higher memory_limit_gb)")
