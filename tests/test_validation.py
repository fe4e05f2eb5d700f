"""Validation through the live pipeline (``swarm.pipeline.driver.evaluate``): the first stage sends
validation micro-batches forward through every stage; the last stage answers with the loss (and top-1
hits for classifiers). Nothing is learned from them: no gradient, no optimizer state, no step."""
import asyncio
import copy

import pytest
import torch
import torch.nn.functional as F

from swarm.data import lm_loss
from swarm.models import trace_model
from swarm.pipeline import train_step
from swarm.pipeline.driver import Drive, evaluate
from swarm.runtime.local import local_servers
from swarm.runtime.metrics import summarise, validation_curve, validation_row


def batches(n: int, size: int, seed: int, shape=(128,), classes: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    if classes is None:
        data = [torch.randint(0, 256, (size, shape[0] + 1), generator=gen) for _ in range(n)]
        return [(d[:, :-1], d[:, 1:]) for d in data]
    return [(torch.randn(size, *shape, generator=gen), torch.randint(0, classes, (size,), generator=gen)) for _ in range(n)]


def test_validation_through_three_stages_equals_the_model_and_touches_no_training_state():
    traced = trace_model("gpt2-tiny", "coarse", 2)
    servers = local_servers(copy.deepcopy(traced), 3, lm_loss)
    first = servers[0]
    val = batches(3, 2, seed=1)

    async def run():
        train = batches(1, 4, seed=0)[0]
        await train_step(first, *train, micro_batches=2)   # one step first: evaluate trained weights
        params = [p.detach().clone() for s in servers for p in s.worker.params]
        moments = [len(s.worker.optimizer.state) for s in servers]
        got = await evaluate(first, val, in_flight=2)
        after = [p.detach().clone() for s in servers for p in s.worker.params]
        assert all(torch.equal(a, b) for a, b in zip(params, after))          # nothing applied
        assert [len(s.worker.optimizer.state) for s in servers] == moments  # no optimizer state touched
        assert all(not s.worker.saved and all(p.grad is None or not p.grad.any() for p in s.worker.params) for s in servers)
        assert all(s.worker.step_id == 1 for s in servers)                 # no step counted
        return got

    got = run_on(servers, run)
    want, _ = reference_from(servers, val, lm_loss)   # the same weights, one process
    assert got.samples == 6 and got.accuracy is None
    assert got.loss == pytest.approx(want, abs=1e-5)


def run_on(servers, scenario):
    """``scenario()`` on a fresh event loop (bounded), the servers closed after it whatever happens."""
    try:
        return asyncio.run(asyncio.wait_for(scenario(), 120))
    finally:
        for s in servers:
            s.close()


def reference_from(servers, pairs, loss_fn):
    """The validation loss (and accuracy) of the servers' stage modules run in turn here, in eval mode."""
    total, hits, count = 0.0, 0, 0
    with torch.no_grad():
        for x, y in pairs:
            out = (x,)
            for s in servers:
                m = s.worker.stage.module
                training = m.training
                m.eval()
                out = tuple(m(*out))
                m.train(training)
            total += float(loss_fn(out[0], y)) * len(y)
            hits += int((out[0].argmax(-1) == y).sum()) if out[0].dim() == 2 else 0
            count += len(y)
    return total / count, hits / count


def test_a_classifier_s_validation_accuracy_uses_batchnorm_statistics_without_updating_them():
    traced = trace_model("resnet18", "coarse", 2)
    servers = local_servers(traced, 2, F.cross_entropy)
    val = batches(2, 2, seed=3, shape=tuple(servers[0].worker.input_specs[0][0][1:]), classes=10)

    async def run():
        buffers = [b.clone() for s in servers for b in s.worker.stage.module.buffers()]
        got = await evaluate(servers[0], val)
        assert all(torch.equal(a, b) for a, b in zip(buffers, [b for s in servers for b in s.worker.stage.module.buffers()]))
        assert all(s.worker.stage.module.training for s in servers)   # back in training mode
        return got

    got = run_on(servers, run)
    loss, accuracy = reference_from(servers, val, F.cross_entropy)
    assert got.samples == 4 and got.loss == pytest.approx(loss, abs=1e-5) and got.accuracy == pytest.approx(accuracy)


def test_the_driver_measures_after_step_0_every_k_steps_and_at_the_last_step():
    rows = []

    class FakeFirst:   # what Drive.due needs; the schedule alone
        pass

    d = Drive(FakeFirst(), lambda s: None, 1, 1, (0, 1), 1.0, lambda: True, lambda *a: rows.append(a),
              validation=[(None, None)], eval_every=5, last_step=11)
    assert [s for s in range(12) if d.due(s)] == [0, 4, 9, 11]
    assert not Drive(FakeFirst(), lambda s: None, 1, 1, (0, 1), 1.0, lambda: True, lambda *a: None,
                     validation=None, eval_every=5).due(0)


def test_the_metrics_summary_carries_the_validation_curve_and_leaves_evaluation_time_out_of_throughput():
    from swarm.pipeline.driver import Validation

    rows, t = [], 100.0
    for step in range(4):
        t += 1.0   # one second of training per step ...
        val = Validation(3.0 - step * 0.5, 8, None, 10.0) if step in (0, 3) else None
        if val is not None:
            t += 10.0   # ... and ten of validation after steps 0 and 3
        row = {"step": step, "stage": 0, "peer": "a", "plan_hash": "h", "time": t, "bytes_sent": 0, "act_raw": 0,
               "act_wire": 0, "loss": 4.0 - step, "samples": 8, "step_s": 1.0}
        if val is not None:
            row.update(validation_row(val, text=True))
        rows.append(row)
    summary = summarise(rows)
    assert summary["samples_per_s"] == pytest.approx(8.0)   # 32 samples in 4 s of training
    assert [p["step"] for p in summary["validation"]] == [0, 3] and summary["val_loss_last"] == 1.5
    curve = validation_curve(rows)
    assert curve[1]["val_bits_per_byte"] == pytest.approx(1.5 / 0.6931471805599453)
