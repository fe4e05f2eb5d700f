"""swarm: train deep networks together on pooled consumer GPUs, peer to peer.

Layers (dependencies point one way: pure logic <- torch execution <- networking <- node):

- ``config``     typed, validated YAML configs (pydantic)
- ``errors``     the user-facing error type (one line, exit code 2)
- ``models``     model zoo (GPT, ResNet) and user models by import path
- ``dag``        the OP-DAG (FusionLLM): ``graph`` (pure data), ``trace`` (torch.fx),
                 ``stages`` (cut a traced model into executable pipeline stages)
- ``estimator``  the per-operator workload estimator: ``workload`` (pure cost model),
                 ``profile`` (measures the local device)
- ``cli``        ``node.py`` sub-commands
"""

__version__ = "0.1.0"
