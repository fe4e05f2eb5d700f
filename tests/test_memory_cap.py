"""``memory_limit_gb`` (``node.py run --max-memory``): what a node advertises, and so what any planner
may give it, is capped (issue 19, part 2: the cap; recomputation is not built yet)."""
import subprocess
import sys

import numpy as np

from swarm.config import NodeConfig
from swarm.scheduler import PeerSpec, PlanSettings, Swarm, schedule
from tests.conftest import config_error
from tests.scheduler_cases import random_workload


def test_the_advertised_memory_is_what_the_node_found_capped_at_the_limit():
    assert NodeConfig().advertised_memory(8_000_000_000) == 8_000_000_000
    assert NodeConfig(memory_limit_gb=2).advertised_memory(8_000_000_000) == 2_000_000_000
    assert NodeConfig(memory_limit_gb=64).advertised_memory(8_000_000_000) == 8_000_000_000   # never more than found


def test_a_bad_limit_is_one_line_naming_the_key(tmp_path):
    assert "memory_limit_gb" in config_error(tmp_path, "memory_limit_gb: -1\n")
    done = subprocess.run([sys.executable, "node.py", "run", "--max-memory", "0", "--initial-peers"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--max-memory" in done.stderr and "below the minimum" in done.stderr


def test_no_plan_gives_a_capped_node_more_than_its_cap():
    """Four equal peers; one caps itself below what a balanced split would give it: every plan keeps
    that peer's predicted stage memory within its cap (or leaves it spare)."""
    rng = np.random.default_rng(3)
    w = random_workload(rng, 12, param_scale=2e7)
    found = 4_000_000_000
    full = schedule(w, Swarm.build([PeerSpec(f"p{i}", 10.0, found) for i in range(4)], lambda a, b: 1e9),
                    PlanSettings(sync_every=1))
    heaviest = max(full.stages, key=lambda s: s.memory_bytes)
    who = heaviest.peers[0]   # without a cap this peer holds the heaviest stage
    capped = NodeConfig(memory_limit_gb=heaviest.memory_bytes * 0.6 / 1e9).advertised_memory(found)
    peers = [PeerSpec(f"p{i}", 10.0, capped if f"p{i}" == who else found) for i in range(4)]
    plan = schedule(w, Swarm.build(peers, lambda a, b: 1e9), PlanSettings(sync_every=1))
    assert plan.predicted_step_s < float("inf") and heaviest.memory_bytes > capped
    assert all(s.memory_bytes <= capped for s in plan.stages if who in s.peers)
