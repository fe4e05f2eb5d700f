"""The OP-DAG (FusionLLM's operator graph): the IR plane of swarm.

- ``graph``   pure data: ``Op``, ``OpDAG`` (topological order, cut analysis, JSON), ``Partition``
- ``trace``   torch.fx tracing plus per-operator measurement (shapes, FLOPs, bytes)
- ``stages``  one executable module per pipeline stage, boundary values passed by name
"""
from swarm.dag.graph import Op, OpDAG, Partition, StageIO

__all__ = ["Op", "OpDAG", "Partition", "StageIO"]
