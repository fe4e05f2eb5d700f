"""A user's own code (issue 21, parts 4 and 6): a model module resolves in every node the demo starts,
from the directory the demo was started in and from the user's PYTHONPATH; a data factory of one's own
trains an MLP on float vectors, and one that does not fit the model is one line."""
import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_the_demos_nodes_see_the_checkout_the_cwd_and_the_users_path(tmp_path, monkeypatch):
    from swarm.demo import node_env

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/opt/mine", "/opt/other"]))
    assert node_env()["PYTHONPATH"].split(os.pathsep) == [str(ROOT), str(tmp_path), "/opt/mine", "/opt/other"]


USER = '''
import torch
from torch import nn


def make():                       # a plain MLP on float vectors: no example_inputs, no spec
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))


class Checked(nn.Module):         # the same, telling its input shape
    def __init__(self):
        super().__init__()
        self.net = make()

    def forward(self, x):
        return self.net(x)

    def example_inputs(self, batch_size):
        return (torch.randn(batch_size, 8),)


def checked():
    return Checked()


class Regression:
    """y = x . w: a batch per step, the same in every process; held-out samples from other seeds."""

    features = 8

    def __init__(self):
        self.w = torch.randn(8, 1, generator=torch.Generator().manual_seed(0))

    def draw(self, seed, n):
        x = torch.randn(n, self.features, generator=torch.Generator().manual_seed(seed))
        return x, x[:, :8] @ self.w if self.features >= 8 else torch.zeros(n, 1)

    def batch(self, step, size, rank=0, world=1):
        x, y = self.draw(step, size)
        return x[rank::world], y[rank::world]

    def validation(self, batches, batch_size):
        return [self.draw(10**6 + i, batch_size) for i in range(batches)]


def data():
    return Regression()


class Narrow(Regression):
    features = 5


def narrow():
    return Narrow()
'''


def _cfg(tmp_path, model, data, **training):
    cfg = tmp_path / f"node-{len(list(tmp_path.glob('node-*.yaml')))}.yaml"
    cfg.write_text(json.dumps({"model": model, "training": {"data": data, "lr": 0.01, "lr_warmup_steps": 0,
                                                     "eval_every_steps": 10, **training}}))
    return cfg


def _demo(tmp_path, cwd, cfg, steps=30):
    """The demo started in ``cwd`` (where the user's module is) with a PYTHONPATH of the user's own, which
    its nodes must keep after the checkout and the cwd."""
    return subprocess.run([sys.executable, str(ROOT / "node.py"), "demo", "--config", str(cfg), "--nodes", "2",
                           "--steps", str(steps), "--micro-batches", "2", "--micro-batch-size", "8", "--out-dir",
                           str(tmp_path / "demo"), "--json-out", str(tmp_path / "m.json")],
                          cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "elsewhere")})


def test_an_mlp_on_float_vectors_in_a_module_in_the_cwd_trains_from_a_user_data_factory(tmp_path):
    (tmp_path / "userml.py").write_text(USER)   # model and data both from the directory the demo starts in
    done = _demo(tmp_path, tmp_path, _cfg(tmp_path, "userml:make", "userml:data"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["steps"] == 30 and metrics["loss_last"] < metrics["loss_first"]
    assert [p["step"] for p in metrics["validation"]] == [0, 9, 19, 29]   # mean squared error on held-out samples
    assert metrics["val_loss_last"] < 0.5 * metrics["val_loss_first"]


def test_a_data_factory_of_the_wrong_shape_or_a_missing_loss_is_one_line(tmp_path):
    (tmp_path / "userml.py").write_text(USER)
    cases = [(_cfg(tmp_path, "userml:checked", "userml:narrow"), "returns inputs float32 [5] per sample; the model takes float32 [8]"),
             (_cfg(tmp_path, "userml:checked", "userml:data", loss="userml:nothing"), "has no attribute 'nothing'"),
             (_cfg(tmp_path, "userml:checked", "userml:absent"), "has no attribute 'absent'")]
    for cfg, message in cases:
        done = _demo(tmp_path, tmp_path, cfg)
        assert done.returncode == 2 and message in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_a_factory_model_without_example_inputs_takes_its_shape_from_the_command_line(tmp_path):
    (tmp_path / "userml.py").write_text(USER)

    def dag(*flags):
        return subprocess.run([sys.executable, str(ROOT / "node.py"), "dag", "--model", "userml:make", "--json", *flags],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
    done = dag("--input-shape", "8")
    assert done.returncode == 0, done.stderr
    ops = json.loads(done.stdout)["ops"]
    assert ops[0]["out_shapes"] == [[1, 8]] and ops[-2]["out_shapes"] == [[1, 1]]
    for flags, message in ((("--input-shape", "8,x"), "is not a shape"), ((), "--input-shape")):
        done = dag(*flags)
        assert done.returncode == 2 and message in done.stderr and done.stderr.count("\n") == 1, done.stderr
