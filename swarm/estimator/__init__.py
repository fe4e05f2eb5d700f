"""Workload estimator (FusionLLM): what each operator and stage costs on a given device.

- ``device``    ``DeviceProfile``: what a device can do (plain data)
- ``profile``   measures the local device (the only torch user here) and caches the result
- ``workload``  pure cost model: op and stage time, memory, bytes crossing each cut
"""
from swarm.estimator.device import DeviceProfile
from swarm.estimator.profile import load_or_measure, measure_device
from swarm.estimator.workload import StageCost, TrainingSettings, estimate, op_time_s, stage_cost

__all__ = ["DeviceProfile", "load_or_measure", "measure_device", "StageCost", "TrainingSettings", "estimate",
           "op_time_s", "stage_cost"]
