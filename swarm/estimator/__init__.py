"""Device profiles and the per-operator roofline (FusionLLM / FusionAI).

- ``device``    ``DeviceProfile``: what a device can do (plain data)
- ``profile``   measures the local device (the only torch user here) and caches the result
- ``roofline``  pure op-time model, which calibrates a profile against a real transformer block

The planner's cost model is ``swarm.scheduler.costs``; stage-level roofline estimates are a
benchmark (``benchmarks/estimator.py``).
"""
from swarm.estimator.device import DeviceProfile
from swarm.estimator.profile import load_or_measure, measure_device
from swarm.estimator.roofline import op_time_s

__all__ = ["DeviceProfile", "load_or_measure", "measure_device", "op_time_s"]
