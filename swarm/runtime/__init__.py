"""Pipeline runtime: stage workers, micro-batch schedules, the in-process reference pipeline."""
from swarm.runtime.local import LocalPipeline
from swarm.runtime.schedule import SCHEDULES, in_flight
from swarm.runtime.worker import StageWorker, lr_at, make_optimizer

__all__ = ["LocalPipeline", "SCHEDULES", "StageWorker", "in_flight", "lr_at", "make_optimizer"]
