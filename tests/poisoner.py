#!/usr/bin/env python3
"""A hostile member for tests/test_hostile_swarm.py: ``node.py`` as an attacker would run it, modified.

The node refuses to send non-finite tensors of its own (``swarm.pipeline.service`` checks its activations and
gradients with ``non_finite`` before sending); this launcher removes that check in its own process only,
and the model (``tests.user_models:poisonable_gpt`` with ``SWARM_TEST_POISON`` set) makes its stage's
outputs and input gradients NaN. Nothing in the product changes: the honest nodes run ``node.py``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import swarm.pipeline.service as service  # noqa: E402

service.non_finite = lambda tensors: None   # send whatever the stage computed

from swarm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
