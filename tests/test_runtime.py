"""Pipeline runtime in one process: schedules, and exactly the same training as without a pipeline."""
import copy

import pytest
import torch
import torch.nn.functional as F

from swarm.dag.stages import extract_stages
from swarm.dag.trace import trace
from swarm.errors import SwarmError
from swarm.models import load_model
from swarm.runtime import SCHEDULES, LocalPipeline, StageWorker, in_flight, make_optimizer


def lm_loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_schedules_run_every_pass_once_and_bound_memory(name):
    for n_stages, m in [(1, 4), (3, 8), (4, 2)]:
        for s in range(n_stages):
            actions = SCHEDULES[name](s, n_stages, m)
            assert sorted(actions) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
            assert all(actions.index(("F", i)) < actions.index(("B", i)) for i in range(m))
            assert in_flight(actions) == (m if name == "gpipe" else min(m, n_stages - s))


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_three_stage_pipeline_trains_exactly_like_one_process(schedule):
    torch.manual_seed(0)
    built = load_model("gpt2-tiny")
    reference = copy.deepcopy(built.module)
    traced = trace(built.module, built.example_inputs(2), "coarse", name=built.name)
    stages = extract_stages(traced, traced.dag.balanced_partition(3))
    workers = [StageWorker(s, "adam", 1e-3, loss_fn=lm_loss if i == 2 else None) for i, s in enumerate(stages)]
    pipeline = LocalPipeline(workers, schedule)
    opt = make_optimizer("adam", reference.parameters(), 1e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        data = torch.randint(0, 256, (8, 129), generator=gen)
        x, y = data[:, :-1], data[:, 1:]
        loss = pipeline.train_step(x, y, micro_batches=4)
        opt.zero_grad()
        ref_losses = []
        for xm, ym in zip(x.chunk(4), y.chunk(4)):   # the same accumulation, in one process
            ref_loss = lm_loss(reference(xm), ym)
            (ref_loss / 4).backward()
            ref_losses.append(ref_loss.item())
        opt.step()
        assert abs(loss - sum(ref_losses) / 4) < 1e-6
    ours = {n: p for w in workers for n, p in w.stage.module.named_parameters()}
    for name, p in reference.named_parameters():
        assert torch.allclose(ours[name], p, atol=1e-6, rtol=1e-5), name


def test_worker_refuses_out_of_order_messages():
    torch.manual_seed(0)
    built = load_model("gpt2-tiny")
    traced = trace(built.module, built.example_inputs(1), "coarse", name=built.name)
    worker = StageWorker(extract_stages(traced, traced.dag.balanced_partition(2))[0], max_in_flight=1)
    x = torch.randint(0, 256, (1, 128))
    with pytest.raises(SwarmError, match="no forward pass"):
        worker.backward(0, [None])
    out = worker.forward(0, [x])
    with pytest.raises(SwarmError, match="already in flight"):
        worker.forward(0, [x])
    with pytest.raises(SwarmError, match="in flight"):
        worker.forward(1, [x])
    with pytest.raises(SwarmError, match="still in flight"):
        worker.step()
    worker.backward(0, [torch.ones_like(o) if o.is_floating_point() else None for o in out])
    worker.step()


def test_a_cut_where_an_unbatched_tensor_crosses_checks_it_exactly():
    from swarm.dag.graph import Partition
    from swarm.dag.stages import input_specs

    torch.manual_seed(0)
    built = load_model("gpt2-tiny")
    traced = trace(built.module, built.example_inputs(4), "coarse", name=built.name)
    cut = traced.dag.index["arange"] + 1     # the position ids [T] cross this cut, next to the [B, T] tokens
    stages = extract_stages(traced, Partition((0, cut), len(traced.dag.ops)))
    specs = input_specs(traced.dag, stages[1].io)
    assert sorted(batched for _, _, batched in specs) == [False, True]
    workers = [StageWorker(s, loss_fn=lm_loss if i else None, max_batch=4, input_specs=input_specs(traced.dag, s.io))
               for i, s in enumerate(stages)]
    x = torch.randint(0, 256, (4, 129))
    LocalPipeline(workers, "gpipe").train_step(x[:, :-1], x[:, 1:], 2)   # micro-batches of 2 pass the check
    bad = [torch.zeros(2, 128, dtype=torch.long) if b else torch.zeros(64, dtype=torch.long) for _, _, b in specs]
    with pytest.raises(SwarmError, match=r"int64 \[64\] does not match the stage's int64 \[128\]"):
        workers[1].forward(0, bad)
