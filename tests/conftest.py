import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Device profiles go to a temporary cache, never the user's."""
    os.environ["SWARM_CACHE_DIR"] = str(tmp_path_factory.mktemp("swarm-cache"))


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python node.py ARGS`` from the repository root; bounded in time."""
    return subprocess.run([sys.executable, str(ROOT / "node.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
