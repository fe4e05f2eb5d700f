"""The device profile under a CPU quota: the quota is found in cgroup v1 and v2 (the tightest one on
the way to the root), and a quota'd CPU is profiled at the rate it can sustain, not at its bursts."""
import os
import subprocess
import sys

import pytest

from swarm.estimator.device import DeviceProfile
from swarm.estimator.profile import cpu_quota_cores, under_quota
from tests.swarmproc import ROOT


def test_the_tightest_quota_on_the_way_to_the_root_is_found(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/x\n3:cpu,cpuacct:/outer/inner\n0::/\n")
    v1 = tmp_path / "cpu,cpuacct"
    for group, quota in ((v1, "-1"), (v1 / "outer", "50000"), (v1 / "outer" / "inner", "150000")):
        group.mkdir(parents=True, exist_ok=True)
        (group / "cpu.cfs_quota_us").write_text(quota + "\n")
        (group / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota_cores(proc, tmp_path) == 0.5
    (v1 / "outer" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota_cores(proc, tmp_path) == 1.5
    proc.write_text("0::/box\n")   # cgroup v2
    (tmp_path / "box").mkdir()
    (tmp_path / "box" / "cpu.max").write_text("30000 100000\n")
    assert cpu_quota_cores(proc, tmp_path) == 0.3
    (tmp_path / "box" / "cpu.max").write_text("max 100000\n")
    assert cpu_quota_cores(proc, tmp_path) is None
    assert cpu_quota_cores(tmp_path / "missing", tmp_path) is None


def test_a_profile_per_cpu_second_is_scaled_to_the_quota():
    full = DeviceProfile("cpu", "x", 1, {8: 0.1, 10: 0.2}, 40.0, 2.0, 1.1, 1, 1)
    quota = under_quota(full, 0.25)
    assert quota.tflops == pytest.approx(0.05) and quota.mem_bandwidth_gbps == pytest.approx(10.0)
    assert quota.kernel_overhead_us == pytest.approx(8.0) and quota.calibration == 1.1 and quota.cpu_quota_cores == 0.25
    assert under_quota(full, 4.0).kernel_overhead_us == 2.0   # one kernel runs on one core either way


PROFILE = "import torch; torch.set_num_threads(1); from swarm.estimator.profile import measure_device; " \
          "p = measure_device('cpu', min_time_s=0.02); print(p.tflops, p.cpu_quota_cores)"


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.isdir("/sys/fs/cgroup/cpu"), reason="needs root and cgroup v1 cpu")
def test_a_cpu_under_a_quota_is_profiled_at_its_sustained_rate(tmp_path):
    group = "/sys/fs/cgroup/cpu/swarm-profile-test"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    free = subprocess.run([sys.executable, "-c", PROFILE], capture_output=True, text=True, timeout=120, env=env, check=True)
    os.makedirs(group, exist_ok=True)
    try:
        with open(f"{group}/cpu.cfs_period_us", "w") as f:
            f.write("100000")
        with open(f"{group}/cpu.cfs_quota_us", "w") as f:
            f.write("50000")
        script = f'echo $$ > {group}/cgroup.procs && exec "$@"'
        held = subprocess.run(["sh", "-c", script, "sh", sys.executable, "-c", PROFILE], capture_output=True,
                              text=True, timeout=300, env=env, check=True)
    finally:
        os.rmdir(group)   # its one process has exited
    full_tflops, none = free.stdout.split()
    quota_tflops, cores = held.stdout.split()
    assert none == "None" and float(cores) == 0.5
    assert 0.3 < float(quota_tflops) / float(full_tflops) < 0.75   # half a core, not a burst at full speed
