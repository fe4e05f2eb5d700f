"""A user's own model module resolves in every node the demo starts: from the directory the demo was
started in and from the user's PYTHONPATH (issue 21, part 6)."""
import json
import os
import subprocess
import sys

from tests.conftest import ROOT

MODULE = '''
from swarm.models import GPT


def make():
    return GPT(256, 32, 1, 2, 32, 0.0, False)   # a one-block byte-level GPT over 32 tokens
'''


def test_a_user_module_in_the_current_directory_trains_in_the_demo(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "mymodel.py").write_text(MODULE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "elsewhere")}   # the user's own path is kept, not replaced
    done = subprocess.run([sys.executable, str(ROOT / "node.py"), "demo", "--model", "mymodel:make", "--nodes", "2",
                           "--steps", "3", "--micro-batches", "2", "--micro-batch-size", "2", "--out-dir",
                           str(tmp_path / "demo"), "--json-out", str(tmp_path / "m.json")],
                          cwd=work, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["steps"] == 3 and metrics["loss_last"] < metrics["loss_first"]


def test_the_demos_nodes_see_the_checkout_the_cwd_and_the_users_path(tmp_path, monkeypatch):
    from swarm.demo import node_env

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/opt/mine", "/opt/other"]))
    assert node_env()["PYTHONPATH"].split(os.pathsep) == [str(ROOT), str(tmp_path), "/opt/mine", "/opt/other"]
