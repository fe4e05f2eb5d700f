"""What the planner predicts for consumer GPUs in homes (issue 20's what-if): 8, 64 and 512 peers over 4
regions, every peer behind its own home uplink, for the swarm before rare sync (e) and as it is (f).

The model is a GPT-2 XL shape (48 layers, d_model 1600, 1024 tokens, 50257-entry vocabulary: 1.6 B
parameters untied), whose training state (~25 GB in fp32 with Adam) fits none of the cards: every plan
must pipeline it. Its costs come from tracing two of its blocks and repeating them (the blocks are
identical: ``expand_blocks``), one micro-batch of ``--micro-batch`` sequences.

Peers (``CARDS``; NVIDIA's published FP32 shader peaks and memory sizes; training reaches a fraction of
the tensor-core peak, which we price as ``TRAINING_FRACTION`` of the bf16 dense tensor peak): a seeded
mix, spread round-robin over the regions. Each home has an uplink drawn from ``UPLINKS_MBIT`` (upload
rates of common cable/DSL/fibre plans); a pair's rate is the slower uplink, halved between regions
(long-haul TCP over residential links), and a peer behind a symmetric NAT (``RELAYED_SHARE`` of them)
reaches others through a relay at ``RELAY_MBIT``. The codec runs at ``CODEC_BYTES_PER_S`` (the H100
measurement of benchmarks/results/codec-h100.json on 4 MB tensors, rounded down for consumer cards).

Variants (``PlanSettings``): (e) synchronous replicas (``sync_every: 1``), AdaTopK at most 16x, float32
on the wire; (f) rare sync chosen per plan (``sync_every: 0``, compressed pseudo-gradients), the
low-bit codecs up to the measured safe ratio (``CompressionConfig().cap()``), bf16 activations.
Both keep relayed peers off mid-pipeline stages (issue 10) and recompute where memory needs it.

    python -m benchmarks.home_whatif [--peers 8,64,512] [--json-out benchmarks/results/home-whatif.json]
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from swarm.config import CompressionConfig
from swarm.scheduler import PeerSpec, PlanSettings, Swarm, Workload, schedule

ROOT = Path(__file__).resolve().parent.parent
XL = {"kind": "gpt", "vocab_size": 50257, "seq_len": 1024, "n_layer": 48, "n_head": 25, "d_model": 1600}
TRACED_LAYERS = 2
# card: (bf16 dense tensor TFLOP/s with FP32 accumulate, FP32 shader TFLOP/s, memory GB), NVIDIA spec sheets
CARDS = {"rtx3060": (25.6, 12.7, 12), "rtx3080": (59.5, 29.8, 10), "rtx3090": (71.0, 35.6, 24),
         "rtx4070": (58.3, 29.1, 12), "rtx4090": (165.2, 82.6, 24)}
MIX = {"rtx3060": 0.3, "rtx3080": 0.15, "rtx3090": 0.2, "rtx4070": 0.2, "rtx4090": 0.15}
TRAINING_FRACTION = 0.4     # of the tensor peak a training pass sustains (MFU of well-tuned single-GPU training)
UPLINKS_MBIT = (20, 50, 100, 500)   # home upload rates, drawn uniformly
RELAY_MBIT, RELAYED_SHARE = 10.0, 0.2
CROSS_REGION = 0.5
CODEC_BYTES_PER_S = 5e8
REGIONS = 4


def expand_blocks(w: Workload, layers: int, prefix: str = "blocks_") -> Workload:
    """``w`` (a GPT traced with a few identical blocks) with its block segments repeated to ``layers``."""
    per = lambda arr: np.diff(arr)  # noqa: E731
    first = [k for k in range(w.n) if w.names[w.op_range(k, k + 1)[0]].startswith(prefix)]
    head, block, tail = list(range(first[0])), first[0], list(range(first[-1] + 1, w.n))
    order = head + [block] * layers + tail
    pick = lambda arr: [arr[k] for k in order]  # noqa: E731
    return Workload.from_segments(
        flops=pick(per(w.flops)), kernels=pick(per(w.kernels)), param_bytes=pick(per(w.param_bytes)),
        act_bytes=pick(per(w.act_bytes)), cut_bytes=pick(list(w.cut_bytes)), buffer_bytes=pick(per(w.buffer_bytes)),
        names=[f"seg{i}" for i in range(len(order))], model="gpt2-xl", samples=w.samples,
        fwd_flops=pick(per(w.fwd_flops)), fwd_kernels=pick(per(w.fwd_kernels)), output_bytes=w.output_bytes)


def workload(micro_batch: int) -> Workload:
    import yaml

    from swarm.models import trace_model

    spec = ROOT / "benchmarks" / "results" / ".xl-traced.yaml"
    spec.write_text(yaml.safe_dump({**XL, "n_layer": TRACED_LAYERS}))
    try:
        traced = trace_model(str(spec), "coarse", 1)
    finally:
        spec.unlink(missing_ok=True)
    return expand_blocks(Workload.from_dag(traced.dag, micro_batch), XL["n_layer"])


def home_swarm(n: int, seed: int = 0) -> tuple[Swarm, dict]:
    rng = np.random.default_rng(seed)
    names = list(CARDS)
    cards = rng.choice(names, size=n, p=[MIX[c] for c in names])
    up = rng.choice(UPLINKS_MBIT, size=n).astype(float)
    relayed = rng.random(n) < RELAYED_SHARE
    peers = [PeerSpec(f"h{i:03d}-{cards[i]}", CARDS[cards[i]][0] * TRAINING_FRACTION, int(CARDS[cards[i]][2] * 1e9),
                      relayed=bool(relayed[i])) for i in range(n)]
    rate = np.minimum.outer(up, up)
    region = np.arange(n) % REGIONS
    rate = np.where(region[:, None] == region[None, :], rate, rate * CROSS_REGION)
    rate = np.where(relayed[:, None] | relayed[None, :], np.minimum(rate, RELAY_MBIT), rate)
    np.fill_diagonal(rate, np.inf)
    counts = {c: int((cards == c).sum()) for c in names}
    return Swarm.build(peers, rate * 1e6), {"cards": counts, "relayed": int(relayed.sum())}


VARIANTS = {
    "(e) swarm before issue 11": dict(sync_every=1, max_ratio=16.0, wire_fraction=1.0),
    "(f) swarm": dict(sync_every=0, max_ratio=CompressionConfig().cap(), wire_fraction=0.5),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", default="8,64,512")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--micro-batches", type=int, default=8)
    ap.add_argument("--json-out", default="benchmarks/results/home-whatif.json")
    args = ap.parse_args(argv)
    w = workload(args.micro_batch)
    base = PlanSettings(micro_batches=args.micro_batches, codec_bytes_per_s=CODEC_BYTES_PER_S)
    print(f"gpt2-xl shape: {w.param_bytes[-1] / 4e9:.2f} B parameters, {w.n} segments, micro-batch {args.micro_batch} x "
          f"{XL['seq_len']} tokens, {args.micro_batches} per step and first-stage replica")
    print(f"{'peers':>6} {'variant':<28}{'samples/s':>10}{'util':>7}{'stages':>7}{'replicas':>9}{'spares':>7}"
          f"{'H':>4}{'max ratio':>10}{'plan s':>8}")
    rows = []
    for n in [int(x) for x in args.peers.split(",")]:
        swarm, mix = home_swarm(n)
        for name, change in VARIANTS.items():
            start = time.perf_counter()
            plan = schedule(w, swarm, replace(base, **change))
            took = time.perf_counter() - start
            row = {"peers": n, "variant": name, "samples_per_s": plan.predicted_samples_per_s,
                   "utilization": plan.utilization, "stages": len(plan.stages),
                   "replicas": [len(s.peers) for s in plan.stages], "spares": len(plan.spares),
                   "sync_every": plan.sync_every, "ratios": [link.ratio for link in plan.links],
                   "recompute": [s.recompute for s in plan.stages], "feasible": plan.feasible, "plan_s": took, **mix}
            rows.append(row)
            print(f"{n:>6} {name:<28}{row['samples_per_s']:>10.2f}{row['utilization']:>7.3f}{row['stages']:>7}"
                  f"{max(row['replicas']):>9}{row['spares']:>7}{plan.sync_every:>4}{max(row['ratios'], default=1):>10.3g}"
                  f"{took:>8.1f}")
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps({"model": XL, "micro_batch": args.micro_batch,
                                               "micro_batches": args.micro_batches, "cards": CARDS,
                                               "training_fraction": TRAINING_FRACTION, "uplinks_mbit": UPLINKS_MBIT,
                                               "relay_mbit": RELAY_MBIT, "cross_region": CROSS_REGION,
                                               "codec_bytes_per_s": CODEC_BYTES_PER_S, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
