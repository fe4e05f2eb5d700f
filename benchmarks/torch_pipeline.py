"""One rank of PyTorch's own pipeline parallelism (``torch.distributed.pipelining``, GPipe schedule,
gloo): variant (e) of ``benchmarks.geo``. Same model, data, micro-batches and optimizer as the swarm
variants, and the same stages as the naive plan (equal op counts, one rank per stage).

    python -m benchmarks.torch_pipeline --rank R --world W --master HOST [--steps 8] [--metrics FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

from swarm.dag.graph import Partition
from swarm.dag.stages import extract_stages
from swarm.data import ByteCorpus, generated_corpus, lm_loss
from swarm.models import trace_model
from swarm.runtime import lr_at
from swarm.scheduler import PeerSpec, Swarm, Workload, baseline


class _Single(torch.nn.Module):
    """A stage whose single output travels as a tensor, not a 1-tuple (what the schedule expects)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *inputs):
        out = tuple(t.contiguous() for t in self.module(*inputs))   # gloo sends contiguous tensors only
        return out[0] if len(out) == 1 else out


def naive_stages(model: str, micro_batch_size: int, world: int):
    traced = trace_model(model, "coarse", micro_batch_size)
    peers = [PeerSpec(f"rank{i:04d}", 1.0, 1 << 40) for i in range(world)]
    plan = baseline(Workload.from_dag(traced.dag), Swarm.build(peers, lambda a, b: 1e9))
    return extract_stages(traced, Partition(tuple(s.first_op for s in plan.stages), len(traced.dag.ops)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--master", required=True)
    p.add_argument("--port", type=int, default=29500)
    p.add_argument("--model", default="gpt2-tiny")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--micro-batches", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--metrics")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR=args.master, MASTER_PORT=str(args.port))
    dist.init_process_group("gloo", rank=args.rank, world_size=args.world, timeout=timedelta(minutes=10))
    stages = naive_stages(args.model, args.micro_batch_size, args.world)
    module = _Single(stages[args.rank].module)
    # example inputs and outputs of this stage (one real micro-batch through the stages before it):
    # the schedule's own shape inference feeds placeholder integers to embeddings
    env = dict(zip(stages[0].io.inputs, ByteCorpus(generated_corpus(), 128).batch(0, args.micro_batch_size)[:1]))
    with torch.no_grad():
        for s in stages[:args.rank + 1]:
            inputs = tuple(env[name] for name in s.io.inputs)
            env.update(zip(s.io.outputs, s(*inputs)))
        outputs = module(*inputs)
    # float boundaries carry gradients back: the receive buffers are made like these examples
    inputs = tuple(t.contiguous().requires_grad_(t.is_floating_point()) for t in inputs)
    outputs = tuple(t.contiguous().requires_grad_(t.is_floating_point())
                    for t in (outputs if isinstance(outputs, tuple) else (outputs,)))
    stage = PipelineStage(module, args.rank, args.world, torch.device("cpu"), input_args=inputs, output_args=outputs)
    schedule = ScheduleGPipe(stage, args.micro_batches, loss_fn=lm_loss)
    params = [q for q in module.parameters() if q.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3) if params else None   # (a stage of only index arithmetic has none)
    corpus, last = ByteCorpus(generated_corpus(), 128), args.rank == args.world - 1
    for step in range(args.steps):
        started = time.perf_counter()
        x, y = corpus.batch(step, args.micro_batches * args.micro_batch_size)
        losses: list = []
        if args.rank == 0:
            schedule.step(x.contiguous())
        elif last:
            schedule.step(target=y, losses=losses)
        else:
            schedule.step()
        if opt is not None:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, 1e-3, 20)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if last and args.metrics:
            seconds = time.perf_counter() - started
            row = {"step": step, "loss": sum(float(v) for v in losses) / len(losses), "time": time.time(),
                   "step_s": seconds, "samples": len(x), "samples_per_s": len(x) / seconds}
            with open(args.metrics, "a") as f:
                f.write(json.dumps(row) + "\n")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
