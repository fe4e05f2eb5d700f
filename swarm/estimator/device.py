"""What a device can do, as measured by ``profile``: plain data, shared by the estimator and telemetry."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

PROFILE_VERSION = 4


@dataclass
class DeviceProfile:
    device: str                    # cpu | cuda:N | mps
    name: str
    threads: int
    matmul_tflops: dict[int, float]  # log2(n) -> measured TFLOP/s of an n x n x n fp32 matmul
    mem_bandwidth_gbps: float      # GB/s of bytes read + written by elementwise kernels
    kernel_overhead_us: float      # launch/dispatch cost of one tiny kernel
    calibration: float             # measured / roofline-predicted time of a reference transformer block
    memory_total_bytes: int
    memory_available_bytes: int
    torch_version: str = ""
    cpu_quota_cores: float | None = None   # the CPU time a cgroup quota allows (cores), when it binds
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
    def from_dict(cls, d: dict) -> DeviceProfile:
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        d["matmul_tflops"] = {int(k): float(v) for k, v in d["matmul_tflops"].items()}
        return cls(**d)
