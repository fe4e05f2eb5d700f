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
from swarm.runtime.state import OpState, capture, check, op_tensors, read_checkpoint, restore, write_checkpoint


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
    assert read_checkpoint(tmp_path, ["a"])["a"].step == 20 and read_checkpoint(tmp_path / "none", ["c"]) == {}
    with pytest.raises(SwarmError, match="none is usable"):   # step directories, none with op c: not a silent step 0
        read_checkpoint(tmp_path, ["c"])
    write_checkpoint(tmp_path, {"a": OpState(30, t(30))}, stage=0, step=30)  # only the newest two steps are kept
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000000020", "step-000000030"]
    with pytest.raises(SwarmError, match="step 40 holds states of steps \\[30\\]"):
        write_checkpoint(tmp_path, {"a": OpState(30, t(30))}, stage=0, step=40)


def test_a_snapshot_is_checked_against_its_op_before_it_is_kept():
    traced, _ = pipeline()
    owned = op_tensors(traced.dag, traced.gm)
    params = dict(traced.gm.named_parameters())
    a, b = [op for op, names in owned.items() if names][:2]
    name_a, name_b = owned[a][0][1], owned[b][0][1]
    check(traced.gm, owned, {a: OpState(3, {f"p:{name_a}": params[name_a].detach().clone()})})
    with pytest.raises(SwarmError, match="does not belong to this op"):   # another op's tensor smuggled in
        check(traced.gm, owned, {a: OpState(3, {f"p:{name_b}": params[name_b].detach().clone()})})
    with pytest.raises(SwarmError, match="has shape"):
        check(traced.gm, owned, {a: OpState(3, {f"p:{name_a}": torch.zeros(7)})})
    with pytest.raises(SwarmError, match="does not belong"):
        check(traced.gm, owned, {a: OpState(3, {"x:junk": torch.zeros(1)})})


def test_a_step_the_rest_of_the_swarm_applied_is_completed_by_the_next_holder_of_a_stage_that_missed_it():
    traced, workers = pipeline()
    reference = copy.deepcopy(workers)
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 256, (4, 129), generator=gen) for _ in range(3)]
    for b in batches[:2]:
        LocalPipeline(workers, "gpipe").train_step(b[:, :-1], b[:, 1:], 2)
    for b in batches:
        LocalPipeline(reference, "gpipe").train_step(b[:, :-1], b[:, 1:], 2)
    workers[1].step = lambda: None   # step 2: stage 0 applies it, stage 1 is cut off before it does
    LocalPipeline(workers, "gpipe").train_step(batches[2][:, :-1], batches[2][:, 1:], 2)
    assert workers[0].step_id == 3 and workers[1].step_id == 2 and workers[1].backwards == 2
    owned = op_tensors(traced.dag, traced.gm)
    ops = [op for op in workers[1].stage.io.ops if op in owned]
    states = capture(workers[1].stage.module, workers[1].optimizer, owned, ops, 2, grads=True)

    _, fresh = pipeline()                       # the stage's next holder, starting where the swarm is: step 3
    assert fresh[1].resume(states, 3) == sorted(ops) and fresh[1].step_id == 3
    for (name, p), q in zip(reference[1].stage.module.named_parameters(), fresh[1].stage.module.parameters()):
        assert torch.equal(p, q), name           # as if the step had never been cut
    _, late = pipeline()                        # the swarm moved on two steps: the gradient is stale, dropped
    assert late[1].resume(states, 4) == [] and late[1].step_id == 4 and all(p.grad is None for p in late[1].params)


def test_checkpoint_retention_is_the_keep_checkpoints_setting_and_the_model_spec_goes_beside_it(tmp_path):
    import json

    from swarm.config import NodeConfig
    from swarm.runtime.session import checkpoint

    keep = NodeConfig.model_validate({"training": {"keep_checkpoints": 3}}).training.keep_checkpoints
    assert NodeConfig().training.keep_checkpoints == 2 and keep == 3
    for step in (5, 10, 15, 20, 25):
        checkpoint(str(tmp_path), {"a": OpState(step, {"p:w": torch.full((2,), float(step))})}, 0, step, keep, ("gpt2-tiny", "coarse"))
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000000015", "step-000000020", "step-000000025"]
    assert json.loads((tmp_path / "model.json").read_text())["model"] == "gpt2-tiny"
    assert read_checkpoint(tmp_path, ["a"])["a"].step == 25
