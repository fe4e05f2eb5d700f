"""All stages in one process, driven by the micro-batch schedule: the reference the networked
pipeline must match (and a quick way to train a partitioned model on one machine)."""
from __future__ import annotations

import torch

from swarm.runtime.schedule import SCHEDULES
from swarm.runtime.worker import StageWorker


class LocalPipeline:
    def __init__(self, workers: list[StageWorker], schedule: str = "1f1b"):
        self.workers, self.schedule = workers, SCHEDULES[schedule]

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor, micro_batches: int) -> float:
        """One optimizer step on ``inputs`` split into ``micro_batches``; returns the mean loss."""
        xs, ys = inputs.chunk(micro_batches), targets.chunk(micro_batches)
        n = len(self.workers)
        acts: dict[tuple[int, int], list] = {(0, m): [x] for m, x in enumerate(xs)}   # inputs of (stage, mb)
        grads: dict[tuple[int, int], list] = {}                                       # output grads of (stage, mb)
        plans = [list(self.schedule(s, n, len(xs))) for s in range(n)]
        losses = []
        while any(plans):
            progressed = False
            for s, plan in enumerate(plans):
                if not plan:
                    continue
                kind, m = plan[0]
                w = self.workers[s]
                if kind == "F" and (s, m) in acts:
                    out = w.forward(m, acts.pop((s, m)), ys[m] if w.is_last else None, 1 / len(xs))
                    if w.is_last:
                        losses.append(out[0].item())
                        grads[(s, m)] = None
                    else:
                        acts[(s + 1, m)] = out
                elif kind == "B" and (s, m) in grads:
                    in_grads = w.backward(m, grads.pop((s, m)))
                    if s:
                        grads[(s - 1, m)] = in_grads
                else:
                    continue
                plan.pop(0)
                progressed = True
            if not progressed:
                raise RuntimeError("pipeline schedule deadlocked")
        for w in self.workers:
            w.step()
        return sum(losses) / len(losses)


def local_servers(traced, n_stages: int, loss_fn, policy=None, lr: float = 1e-3, max_batch: int = 64,
                  device: str = "cpu", precision: str = "fp32", recompute: bool = False) -> list:
    """Stage servers of ``traced`` cut into ``n_stages`` (FLOP-balanced), one replica each, calling each
    other in this process: the networked path (frames, AdaTopK, masks) without daemons. ``policy()``
    makes each outgoing link's ``LinkPolicy``. Returns the servers in stage order."""
    from swarm.dag.stages import extract_stages, input_specs
    from swarm.pipeline import Neighbours, StageServer, local_caller

    stages = extract_stages(traced, traced.dag.balanced_partition(n_stages))
    ids = [f"stage{i}" for i in range(n_stages)]
    servers: dict = {}
    for i, stage in enumerate(stages):
        last = i == n_stages - 1
        worker = StageWorker(stage, "adam", lr, loss_fn=loss_fn if last else None, max_batch=max_batch,
                             input_specs=input_specs(traced.dag, stage.io), device=device, precision=precision,
                             recompute=recompute)
        hood = Neighbours(ids[i], (ids[i],), tuple(ids[i - 1:i]), tuple(ids[i + 1:i + 2]))
        servers[ids[i]] = StageServer(worker, hood, local_caller(ids[i], servers),
                                      policy=None if last or policy is None else policy())
    return list(servers.values())
