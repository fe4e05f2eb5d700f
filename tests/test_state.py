"""Op-keyed training state: captured from one stage and restored into a fresh copy, it continues
training bit-identically; checkpoints resume at the newest step every op has; bad state is refused."""
import copy

import pytest
import torch

from swarm.dag.stages import extract_stages
from swarm.dag.trace import trace
from swarm.data import lm_loss
from swarm.errors import SwarmError
from swarm.models import load_model
from swarm.runtime import LocalPipeline, StageWorker
from swarm.runtime.state import OpState, capture, op_tensors, read_checkpoint, restore, write_checkpoint


def pipeline():
    torch.manual_seed(0)
    built = load_model("gpt2-tiny")
    traced = trace(built.module, built.example_inputs(2), "coarse", name=built.name)
    stages = extract_stages(traced, traced.dag.balanced_partition(2))
    return traced, [StageWorker(s, "adam", 1e-3, loss_fn=lm_loss if i else None) for i, s in enumerate(stages)]


def test_state_moves_by_op_and_training_continues_identically():
    traced, workers = pipeline()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (4, 129), generator=gen) for _ in range(3)]
    run = LocalPipeline(workers, "gpipe")
    for b in batches[:2]:
        run.train_step(b[:, :-1], b[:, 1:], 2)
    owned = op_tensors(traced.dag, traced.gm)
    ops = [op for op in workers[1].stage.io.ops if op in owned]
    states = capture(workers[1].stage.module, workers[1].optimizer, owned, ops, workers[1].step_id)
    assert all(s.step == 2 for s in states.values()) and any(k.startswith("o:exp_avg:") for s in states.values() for k in s.tensors)

    _, fresh = pipeline()                        # a new holder: initial weights, empty optimizer
    restore(fresh[1].stage.module, fresh[1].optimizer, states)
    fresh[1].step_id = workers[1].step_id
    twin = [copy.deepcopy(workers[0]), fresh[1]]
    b = batches[2]
    LocalPipeline(workers, "gpipe").train_step(b[:, :-1], b[:, 1:], 2)
    LocalPipeline(twin, "gpipe").train_step(b[:, :-1], b[:, 1:], 2)
    for (name, p), q in zip(workers[1].stage.module.named_parameters(), fresh[1].stage.module.parameters()):
        assert torch.equal(p, q), name


def test_bad_state_is_refused_before_anything_is_loaded():
    traced, workers = pipeline()
    module = workers[1].stage.module
    before = {n: p.clone() for n, p in module.named_parameters()}
    name = next(iter(before))
    good = OpState(0, {f"p:{name}": torch.ones_like(before[name])})
    for bad in [{"p:nope.weight": torch.zeros(1)}, {f"p:{name}": torch.zeros(3, 3, 3)}, {f"x:{name}": torch.zeros(1)}]:
        with pytest.raises(SwarmError, match="op 'o'"):
            restore(module, workers[1].optimizer, {"a": good, "o": OpState(0, bad)})
        assert all(torch.equal(before[n], p) for n, p in module.named_parameters())


def test_checkpoints_resume_at_the_newest_step_every_op_has(tmp_path):
    t = lambda v: {"p:w": torch.full((2,), float(v))}  # noqa: E731
    write_checkpoint(tmp_path, {"a": OpState(10, t(10)), "b": OpState(10, t(10))}, stage=0, step=10)
    write_checkpoint(tmp_path, {}, stage=1, step=10)                        # a stage without state marks its part
    assert sorted(p.name for p in (tmp_path / "step-000000010").glob("done-*")) == ["done-0", "done-1"]
    write_checkpoint(tmp_path, {"a": OpState(20, t(20))}, stage=0, step=20)  # b's stage died before step 20
    got = read_checkpoint(tmp_path, ["a", "b"])
    assert {op: s.step for op, s in got.items()} == {"a": 10, "b": 10} and got["a"].tensors["p:w"][0] == 10
    assert read_checkpoint(tmp_path, ["a"])["a"].step == 20 and read_checkpoint(tmp_path, ["c"]) == {}
    write_checkpoint(tmp_path, {"a": OpState(30, t(30))}, stage=0, step=30)  # only the newest two steps are kept
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000000020", "step-000000030"]
    with pytest.raises(SwarmError, match="step 40 holds states of steps \\[30\\]"):
        write_checkpoint(tmp_path, {"a": OpState(30, t(30))}, stage=0, step=40)
