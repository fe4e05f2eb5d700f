"""Precision and recomputation on one device: samples/s, measured peak memory and the planner's prediction.

Each row trains a model cut into ``--stages`` FLOP-balanced stages in one process (the stage workers the
runtime uses, GPipe: every micro-batch in flight, what the planner prices), ``--steps`` steps after one
warm-up step, in a fresh process of its own so that its peak is its own: resident memory growth on a
CPU (VmHWM, with freed blocks returned as a capped node does), ``max_memory_allocated`` on CUDA. The
prediction is the sum of the stages' ``memory_bytes`` of the plan ``evaluate`` prices for the same
stages (``recompute`` as the row says). Rows: precision x recompute; fp16 only on CUDA.

    python -m benchmarks.memory [--device cpu|cuda:0] [--model YAML] [--stages 3] [--steps 5]
        [--micro-batch 8] [--micro-batches 4] [--json-out benchmarks/results/memory-cpu.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

LONG_GPT = "kind: gpt\nseq_len: 512\nd_model: 128\nn_layer: 6\nn_head: 4\n"   # activations >> parameters


def row(model: str, device: str, precision: str, recompute: bool, stages: int, steps: int, mbs: int, m: int) -> dict:
    """One row, in this process."""
    import torch

    from swarm.dag.stages import model_io
    from swarm.data import lm_loss
    from swarm.models import trace_model
    from swarm.runtime.local import LocalPipeline, local_servers
    from swarm.runtime.memory import MemoryGauge, return_freed_memory
    from swarm.scheduler import PeerSpec, PlanSettings, Swarm, Workload, evaluate

    return_freed_memory()
    traced = trace_model(model, "coarse", mbs)
    w = Workload.from_dag(traced.dag)
    cuts = traced.dag.balanced_partition(stages).starts
    segs = [w.seg_stop.index(c) + 1 if c else 0 for c in cuts] + [w.n]
    one = Swarm.build([PeerSpec(f"p{i}", 1.0, 10**14) for i in range(stages)], lambda a, b: 1e9)
    plan = evaluate(w, one, [((a, b), [i]) for i, (a, b) in enumerate(zip(segs, segs[1:]))],
                    PlanSettings(m, schedule="gpipe", recompute="on" if recompute else "off"))
    gauge = MemoryGauge(torch.device(device))
    workers = [s.worker for s in local_servers(traced, stages, lm_loss, max_batch=mbs, device=device, precision=precision,
                                               recompute=recompute)]
    pipeline = LocalPipeline(workers, "gpipe")
    tokens = model_io(traced)[0][1]
    data = torch.randint(0, 256, (mbs * m, tokens + 1), generator=torch.Generator().manual_seed(0))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    pipeline.train_step(data[:, :-1], data[:, 1:], m)   # warm-up (and Adam's moments allocated)
    sync()
    base = gauge.used()
    gauge.reset()
    start = time.perf_counter()
    losses = [pipeline.train_step(data[:, :-1], data[:, 1:], m) for _ in range(steps)]
    sync()
    seconds = time.perf_counter() - start
    return {"precision": precision, "recompute": recompute, "samples_per_s": steps * mbs * m / seconds,
            "peak_bytes": gauge.peak() - base if device == "cpu" else gauge.peak(),
            "predicted_bytes": sum(s.memory_bytes for s in plan.stages), "loss_last": losses[-1]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=None, help="a model YAML (default: a 6-layer GPT over 512 tokens)")
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)   # precision,recompute: run one row here
    args = ap.parse_args(argv)
    model = args.model
    if model is None:
        model = str(Path(sys.prefix) / "share" / "swarm" / "memory-bench-gpt.yaml")
        Path(model).parent.mkdir(parents=True, exist_ok=True)
        Path(model).write_text(LONG_GPT)
    shape = (args.stages, args.steps, args.micro_batch, args.micro_batches)
    if args.row:
        precision, recompute = args.row.split(",")
        print(json.dumps(row(model, args.device, precision, recompute == "1", *shape)))
        return 0
    precisions = ["fp32", "bf16"] + (["fp16"] if args.device.startswith("cuda") else [])
    rows = []
    print(f"{args.device}, {model}: {args.stages} stages, {args.micro_batches} x {args.micro_batch} samples per step (GPipe)")
    print(f"{'precision':>9} {'recompute':>9} {'samples/s':>10} {'peak MB':>9} {'predicted MB':>13} {'loss':>7}")
    for precision in precisions:
        for recompute in ("0", "1"):
            cmd = [sys.executable, "-m", "benchmarks.memory", "--device", args.device, "--model", model, "--stages",
                   str(args.stages), "--steps", str(args.steps), "--micro-batch", str(args.micro_batch),
                   "--micro-batches", str(args.micro_batches), "--row", f"{precision},{recompute}"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            if done.returncode:
                print(f"{precision:>9} {recompute:>9} failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"{precision:>9} {'on' if r['recompute'] else 'off':>9} {r['samples_per_s']:>10.1f} "
                  f"{r['peak_bytes'] / 1e6:>9.1f} {r['predicted_bytes'] / 1e6:>13.1f} {r['loss_last']:>7.4f}")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps({"device": args.device, "model": model, "stages": args.stages,
                                                   "micro_batch": args.micro_batch, "micro_batches": args.micro_batches,
                                                   "steps": args.steps, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
