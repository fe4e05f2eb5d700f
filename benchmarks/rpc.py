"""Remote autodiff overhead: one training step of gpt2-tiny cut into 3 stages, in one process
(LocalPipeline) vs over libp2p streams between three p2p daemons on loopback (swarm.stage.v1).
Prints a table and writes JSON.

    python -m benchmarks.rpc [--steps 5] [--micro-batches 4] [--json-out benchmarks/results/rpc.json]
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hivemind.p2p import P2P

from swarm.dag.stages import extract_stages
from swarm.dag.trace import trace
from swarm.models import load_model
from swarm.pipeline import PROTOCOL, Neighbours, StageServer, stage_caller, train_step
from swarm.runtime import LocalPipeline, StageWorker
from swarm.wire import Limits


def lm_loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def workers_for(module, traced_fn):
    traced = traced_fn(module)
    stages = extract_stages(traced, traced.dag.balanced_partition(3))
    return [StageWorker(s, "adam", 1e-3, loss_fn=lm_loss if i == 2 else None) for i, s in enumerate(stages)]


async def remote_times(workers, batches, micro_batches: int) -> list[float]:
    p2ps = [await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])]
    for _ in range(2):
        p2ps.append(await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=await p2ps[-1].get_visible_maddrs()))
    try:
        limits = Limits(max_frame_bytes=256 << 20)
        ids = [(p.peer_id.to_base58(),) for p in p2ps]
        hoods = [Neighbours(ids[0][0], ids[0], (), ids[1]), Neighbours(ids[1][0], ids[1], ids[0], ids[2]),
                 Neighbours(ids[2][0], ids[2], ids[1], ())]
        first, middle, last = (StageServer(w, h, stage_caller(p, limits), limits) for w, h, p in zip(workers, hoods, p2ps))
        await p2ps[2].add_binary_stream_handler(PROTOCOL, last.handle)
        await p2ps[1].add_binary_stream_handler(PROTOCOL, middle.handle)
        times = []
        for x, y in batches:
            start = time.perf_counter()
            await train_step(first, x, y, micro_batches, in_flight=micro_batches)
            times.append(time.perf_counter() - start)
        return times
    finally:
        for p in p2ps:
            await p.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--json-out", default="benchmarks/results/rpc.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    built = load_model("gpt2-tiny")
    traced_fn = lambda m: trace(m, built.example_inputs(args.micro_batch_size), "coarse", name=built.name)  # noqa: E731
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.steps + 1):   # the first step of each run warms up and is not counted
        data = torch.randint(0, 256, (args.micro_batches * args.micro_batch_size, 129), generator=gen)
        batches.append((data[:, :-1], data[:, 1:]))
    local = LocalPipeline(workers_for(copy.deepcopy(built.module), traced_fn), "gpipe")
    local_times = []
    for x, y in batches:
        start = time.perf_counter()
        local.train_step(x, y, args.micro_batches)
        local_times.append(time.perf_counter() - start)
    remote = asyncio.run(remote_times(workers_for(copy.deepcopy(built.module), traced_fn), batches, args.micro_batches))
    lo, re = sorted(local_times[1:])[len(local_times[1:]) // 2], sorted(remote[1:])[len(remote[1:]) // 2]
    cut = args.micro_batch_size * 128 * 256 * 4
    row = {"stages": 3, "micro_batches": args.micro_batches, "micro_batch_size": args.micro_batch_size,
           "activation_bytes": cut, "local_step_s": lo, "remote_step_s": re,
           "overhead_per_micro_batch_s": (re - lo) / args.micro_batches, "ratio": re / lo}
    print(f"{'stages':>7}{'mb x size':>11}{'cut KB':>8}{'local s':>9}{'libp2p s':>10}{'overhead/mb ms':>16}{'ratio':>7}")
    print(f"{3:>7}{f'{args.micro_batches} x {args.micro_batch_size}':>11}{cut / 1e3:>8.0f}{lo:>9.3f}{re:>10.3f}"
          f"{row['overhead_per_micro_batch_s'] * 1e3:>16.1f}{row['ratio']:>7.2f}")
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
