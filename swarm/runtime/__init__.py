"""Pipeline runtime (docs/runtime.md, docs/churn.md).

- ``schedule``: micro-batch orders (GPipe, 1F1B) as data; ``worker``: one stage's passes and steps;
  ``local``: all stages in one process (the reference, and in-process stage servers);
- the stage server and the first stage's step: ``swarm.pipeline``; ``allreduce``: replicas' gradient sums;
- ``state``: op-keyed state, checkpoints; ``session``: this node's stage of a plan (plan adoption,
  hand-over and backups: ``swarm.churn``).
"""
from swarm.runtime.local import LocalPipeline
from swarm.runtime.schedule import SCHEDULES, in_flight
from swarm.runtime.worker import StageWorker, lr_at, make_optimizer

__all__ = ["LocalPipeline", "SCHEDULES", "StageWorker", "in_flight", "lr_at", "make_optimizer"]
