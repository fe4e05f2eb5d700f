"""The distributed step: one stage of the committed plan served to its neighbours.

- ``protocol``: the stage protocol's rules without I/O (admission, steps, the barrier, reduce rounds,
  routing, draining): ``StageProtocol``, ``Neighbours``;
- ``service``: the libp2p adapter that runs them (``StageServer``, ``PROTOCOL``, callers);
- ``link``: the link to the next stage (``NextStage``); ``frames``: checking what peers send; ``calls``:
  the protocol's callers (libp2p, in-process) and ``StepHooks``;
- ``driver``: the first stage's loop and ``train_step`` (the compute thread and counters: ``swarm.runtime.worker``).

Messages: ``swarm.messages``; streams: ``swarm.net.streams``.
"""
from swarm.pipeline.calls import PROTOCOL, StepHooks, local_caller, stage_caller
from swarm.pipeline.driver import train_step
from swarm.pipeline.protocol import Neighbours, StageProtocol
from swarm.pipeline.service import StageServer

__all__ = ["PROTOCOL", "Neighbours", "StageProtocol", "StageServer", "StepHooks", "local_caller", "stage_caller",
           "train_step"]
