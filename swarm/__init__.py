"""swarm: train deep networks together on pooled consumer GPUs, peer to peer.

Folders are layers; dependencies point one way (docs/architecture.md, checked by tests/test_layers.py):

- pure logic: ``config`` (typed YAML, the only defaults), ``errors`` (whose fault), ``logs``, ``loop``
  (the node's asyncio thread), ``dag.graph`` (the OP-DAG as data), ``scheduler`` (OP-Fence planner,
  one cost model), ``election`` (the plan election state machine), ``estimator.roofline``,
  ``churn.adoption`` (plan adoption state machine), ``refusals``, ``procs``
- torch, no network: ``models``, ``dag.trace`` / ``dag.stages``, ``data``, ``estimator.profile``,
  ``compression`` (AdaTopK), ``wire`` (frames), ``messages`` (typed messages), ``runtime`` (the stage
  worker and its compute thread, op state, schedules, all-reduce parts, a stage's session),
  ``pipeline.protocol`` (the stage protocol's rules, sans-I/O)
- network: ``net`` (everything that imports hivemind: records, DHT membership, identities, probes,
  streams), ``pipeline`` (the stage server, the next-stage link, stage 0's driver), ``churn`` (state
  service, plan follower, backups), ``planning`` (the election's driver), ``liveness``
- composition: ``node`` (``Node``: start / tick / leave), ``cli`` (``node.py`` sub-commands), ``demo``,
  ``testbed``; ``export`` (a trained model as one safetensors file; ``swarm.load_exported(FILE)``, imported
  on first use so that ``import swarm`` stays light)
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "load_exported":   # torch loads with it, not with the package
        from swarm.export import load_exported

        return load_exported
    raise AttributeError(f"module 'swarm' has no attribute {name!r}")
