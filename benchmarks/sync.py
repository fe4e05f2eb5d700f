"""What rare synchronisation does to learning: validation loss at equal tokens, sync every H steps.

``R`` replicas of gpt2-tiny train on Shakespeare's training plays (benchmarks/compression.py's corpus,
validation set and learning rate). Every step each replica takes its own ``M`` micro-batches, so every
variant sees the same ``R x M`` sequences per step, the same in every variant (equal tokens):

- ``H = 1``: synchronous data parallelism (the gradients averaged every step: one model, one Adam,
  ``R x M`` micro-batches per step; what the runtime's replicas do at ``sync_every: 1``);
- ``H > 1``: each replica steps its own Adam on its own micro-batches; every ``H`` steps the
  replicas average their pseudo-gradients and apply the outer optimizer (overlapped, the default:
  one sync late, as the runtime does while the exchange travels; ``--no-overlap``: at once). The arithmetic is the
  runtime's own (``swarm.runtime.outer``: ``OuterState``, its error feedback and codec), and so is
  the exchange's structure: replica ``j`` owns part ``j`` of the vector (``runtime.allreduce.parts``),
  sums the encoded contributions and encodes the sum once more, with its own error feedback.

Validation loss (held-out plays) is measured every ``--every`` steps, from the synced parameters
for ``H > 1`` (the anchor, with the exchange in flight landed when overlapped); at the end, seed by seed against ``H = 1`` of the same seed.

    python -m benchmarks.sync [--steps 256] [--seeds 0,1,2] [--sync 1,4,16,64] [--replicas 4]
        [--compression topk8] [--no-overlap] [--json-out benchmarks/results/sync.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks import compression as bench
from swarm.data import bits_per_byte, lm_loss
from swarm.runtime.allreduce import flatten, parts, split
from swarm.runtime.outer import OuterSettings, OuterState
from swarm.runtime.worker import lr_at, make_optimizer

MICRO_BATCHES = 2      # per replica and step, of bench.MICRO_BATCH_SIZE sequences


def flat(model: torch.nn.Module) -> torch.Tensor:
    return flatten(model.parameters())


def load(model: torch.nn.Module, vector: torch.Tensor) -> None:
    with torch.no_grad():
        for p, piece in split(vector, model.parameters()):
            p.copy_(piece)


def inner_step(model, opt, x, y, step: int) -> float:
    opt.zero_grad(set_to_none=True)
    n, total = len(x), 0.0
    for xm, ym in zip(x.chunk(n // bench.MICRO_BATCH_SIZE), y.chunk(n // bench.MICRO_BATCH_SIZE)):
        loss = lm_loss(model(xm), ym)
        (loss / (n // bench.MICRO_BATCH_SIZE)).backward()
        total += float(loss.detach())
    opt.param_groups[0]["lr"] = lr_at(step, bench.LR, bench.LR_WARMUP)
    opt.step()
    return total / (n // bench.MICRO_BATCH_SIZE)


def exchange(states: list[OuterState], deltas: list[torch.Tensor]) -> torch.Tensor:
    """The replicas' averaged pseudo-gradient as the runtime's butterfly computes it."""
    n, numel = len(states), deltas[0].numel()
    out = torch.zeros(numel)
    for j, (lo, hi) in enumerate(parts(numel, n)):
        total = torch.zeros(hi - lo)
        for state, delta in zip(states, deltas):   # peer-id order
            total += state.own.encode(delta[lo:hi], lo, hi)[1]
        out[lo:hi] = states[j].owned.encode(total, lo, hi)[1]
    return out / n


def run(seed: int, h: int, steps: int, replicas: int, every: int, outer: OuterSettings, batches) -> dict:
    started = time.perf_counter()
    corpus = bench.text(seed)
    base = bench.plain_model(seed)
    per = MICRO_BATCHES * bench.MICRO_BATCH_SIZE
    curve, losses, syncs = [], [], 0
    if h == 1:
        opt = make_optimizer("adam", base.parameters(), bench.LR)
        for step in range(steps):
            x, y = corpus.batch(step, replicas * per)
            losses.append(inner_step(base, opt, x, y, step))
            if (step + 1) % every == 0 or step + 1 == steps:
                curve.append((step + 1, bench.measure_model(base, batches)))
    else:
        models = [copy.deepcopy(base) for _ in range(replicas)]
        opts = [make_optimizer("adam", m.parameters(), bench.LR) for m in models]
        states = [OuterState(outer, flat(base)) for _ in range(replicas)]
        pending = None   # overlap: the exchange started at the previous sync, applied at this one
        for step in range(steps):
            x, y = corpus.batch(step, replicas * per)
            losses.append(sum(inner_step(m, o, x[r * per:(r + 1) * per], y[r * per:(r + 1) * per], step)
                              for r, (m, o) in enumerate(zip(models, opts))) / replicas)
            if outer.syncs_after(step, h):
                deltas = [s.pseudo_gradient(flat(m)) for s, m in zip(states, models)]
                average = exchange(states, deltas)
                for s, m, d in zip(states, models, deltas):
                    load(m, s.apply_late(pending, d) if outer.overlap else s.apply(average))
                pending = average
                syncs += 1
            if (step + 1) % every == 0 or step + 1 == steps:
                load(base, states[0].landed(pending if outer.overlap else None))   # the synced model
                curve.append((step + 1, bench.measure_model(base, batches)))
    return {"seed": seed, "sync_every": h, "val_loss": curve[-1][1], "bits_per_byte": bits_per_byte(curve[-1][1]),
            "curve": curve, "train_loss_last5": sum(losses[-5:]) / 5, "syncs": syncs,
            "seconds": time.perf_counter() - started}


def summarise(h: int, runs: list[dict], base: dict[int, dict]) -> dict:
    gaps = [(r["val_loss"] - base[r["seed"]]["val_loss"]) / base[r["seed"]]["val_loss"] for r in runs]
    curve = [(step, bench.spread([r["curve"][k][1] for r in runs])["mean"]) for k, (step, _) in enumerate(runs[0]["curve"])]
    return {"sync_every": h, "val_loss": bench.spread([r["val_loss"] for r in runs]),
            "gap_vs_h1": bench.spread(gaps), "syncs": runs[0]["syncs"], "mean_curve": curve}


def table(rows: list[dict], args) -> str:
    lines = [f"gpt2-tiny, {args.replicas} replicas x {MICRO_BATCHES} micro-batches x {bench.MICRO_BATCH_SIZE} sequences "
             f"of 128 bytes per step, {args.steps} steps, seeds {args.seeds}, outer {args.compression} "
             f"(lr {args.outer_lr}, Nesterov {args.outer_momentum}, {'waits' if args.no_overlap else 'overlapped'})",
             f"{'sync every':>10}  {'syncs':>5}  {'val loss (nats/byte)':>22}  {'vs H=1, per seed':>18}"]
    for r in rows:
        gap = r["gap_vs_h1"]
        lines.append(f"{r['sync_every']:>10}  {r['syncs']:>5}  {bench.pm(r['val_loss']):>22}  "
                     f"{gap['mean'] * 100:>+8.2f}% ± {gap['std'] * 100:.2f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--sync", default="1,4,16,64", help="sync periods H (1: synchronous data parallelism)")
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--every", type=int, default=32, help="validation every this many steps")
    p.add_argument("--compression", default=OuterSettings.compression)
    p.add_argument("--outer-lr", type=float, default=OuterSettings.lr)
    p.add_argument("--outer-momentum", type=float, default=OuterSettings.momentum)
    p.add_argument("--no-overlap", action="store_true", help="each sync waits for its exchange (training.outer_overlap: false)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json-out", default="benchmarks/results/sync.json")
    p.add_argument("--baseline-from", help="take the H = 1 runs from this earlier JSON of the same steps, seeds and "
                   "replicas (synchronous data parallelism does not depend on the outer settings)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds, periods = [int(s) for s in args.seeds.split(",")], [int(h) for h in args.sync.split(",")]
    if 1 not in periods:
        periods = [1] + periods
    outer = OuterSettings(sync_every=max(periods), lr=args.outer_lr, momentum=args.outer_momentum,
                          compression=args.compression, overlap=not args.no_overlap)
    batches = bench.validation()
    started = time.perf_counter()
    runs: dict[int, list[dict]] = {}
    if args.baseline_from:
        earlier = json.loads(Path(args.baseline_from).read_text())
        same = (earlier["steps"], earlier["replicas"], earlier["micro_batches"]) == (args.steps, args.replicas, MICRO_BATCHES)
        runs[1] = [r for r in earlier["runs"] if r["sync_every"] == 1 and r["seed"] in seeds]
        if not same or sorted(r["seed"] for r in runs[1]) != sorted(seeds):
            raise SystemExit(f"error: {args.baseline_from} holds no H = 1 runs of these steps, replicas and seeds")
    for h in periods:
        for seed in seeds:
            if h in runs and len(runs[h]) == len(seeds):
                break
            r = run(seed, h, args.steps, args.replicas, args.every, outer, batches)
            bench.log(f"H={h} seed {seed}: val loss {r['val_loss']:.4f} ({r['seconds']:.0f} s)")
            runs.setdefault(h, []).append(r)
    base = {r["seed"]: r for r in runs[1]}
    rows = [summarise(h, runs[h], base) for h in periods]
    print(table(rows, args))
    out = {"model": bench.MODEL, "data": bench.DATA, "steps": args.steps, "seeds": seeds, "replicas": args.replicas,
           "micro_batches": MICRO_BATCHES, "micro_batch_size": bench.MICRO_BATCH_SIZE, "lr": bench.LR,
           "outer": {"lr": args.outer_lr, "momentum": args.outer_momentum, "compression": args.compression,
                     "topk_fraction": outer.topk_fraction, "ratio": outer.codec().ratio(), "overlap": outer.overlap},
           "metric": "validation loss (nats/byte)", "rows": rows, "runs": [r for h in periods for r in runs[h]],
           "command": "python -m benchmarks.sync " + " ".join(sys.argv[1:] if argv is None else argv),
           "seconds": time.perf_counter() - started}
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
