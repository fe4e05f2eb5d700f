"""What a crash costs in validation loss.

A 3-stage pipeline of gpt2-tiny (the stage servers' real path in one process, uncompressed, as
benchmarks/compression.py builds it) trains on Shakespeare's training plays. In the crashed runs, the
middle stage's holder dies after ``--crash-at`` steps and a spare takes its stage over from the newest
snapshot it holds, ``K`` steps old: the stage's ops (parameters and Adam's moments and step count) come
back as they were ``K`` steps earlier (``swarm.runtime.state.capture`` then ``StageWorker.resume``, what a
session does with fetched states), while the other stages keep theirs and the swarm goes on at the
step it had reached (the step never goes backwards; docs/churn.md). ``K`` is the bound of the backup
pool (``training.backup_every_steps``): a real crash loses at most that many, usually fewer. Every run
continues to the same total steps; validation loss on the held-out plays is measured right after the
crash and after the last step, and compared, seed by seed, with the undisturbed run of the same seed.

    python -m benchmarks.churn_accuracy [--steps 150] [--seeds 0,1,2] [--crash-at 75] [--k 5,10]
        [--device cpu] [--threads 1] [--json-out benchmarks/results/churn-accuracy.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks import compression as bench
from swarm.data import bits_per_byte
from swarm.runtime.state import OpState, capture, op_tensors

CRASHED = 1   # the middle stage, as in tests/test_churn.py


def crash(traced, crash_at: int, k: int):
    """The hook of a crashed run: a snapshot of stage ``CRASHED`` after ``crash_at - k`` steps, and that
    snapshot restored into it after ``crash_at`` (the spare's take-over)."""
    owned = op_tensors(traced.dag, traced.gm)
    kept: dict[str, OpState] = {}

    def hook(done: int, servers: list) -> None:
        worker = servers[CRASHED].worker
        ops = [op for op in worker.stage.io.ops if op in owned]
        if done == crash_at - k:   # the spare's newest snapshot (k = 0: of the very step it died at)
            kept.update(capture(worker.stage.module, worker.optimizer, owned, ops, worker.step_id))
        if done == crash_at:
            assert worker.step_id == crash_at and all(st.step == crash_at - k for st in kept.values())
            behind = worker.resume(dict(kept), crash_at)
            assert not behind and worker.step_id == crash_at
    return hook


def run(seed: int, steps: int, crash_at: int, k: int | None, batches, device: str) -> dict:
    started = time.perf_counter()
    traced, servers = bench.pipeline(seed, bench.VARIANTS["off"], device)
    at = bench.checkpoints(steps, 0) | ({crash_at} if crash_at < steps else set())
    out = bench.train_pipeline(servers, bench.text(seed), steps, batches, at, None if k is None else crash(traced, crash_at, k))
    curve = dict(out["curve"])
    result = {"seed": seed, "k": k, "val_loss": out["val_loss"], "bits_per_byte": bits_per_byte(out["val_loss"]),
              "val_loss_at_crash": curve.get(crash_at), "train_loss_last5": out["train_loss_last5"],
              "seconds": time.perf_counter() - started}
    bench.log(f"  seed {seed} {'undisturbed' if k is None else f'crash, K={k}'}: val {result['val_loss']:.4f} "
        f"(after step {crash_at}: {result['val_loss_at_crash']:.4f}), {result['seconds']:.0f} s")
    return result


def summarise(k: int | None, runs: list[dict], base: dict[int, dict]) -> dict:
    row = {"k": k, "per_seed": runs, "val_loss": bench.spread([r["val_loss"] for r in runs]),
           "bits_per_byte": bench.spread([r["bits_per_byte"] for r in runs]),
           "val_loss_at_crash": bench.spread([r["val_loss_at_crash"] for r in runs]),
           "train_loss_last5": bench.spread([r["train_loss_last5"] for r in runs])}
    if k is not None:
        row["delta_pct"] = bench.spread([(r["val_loss"] / base[r["seed"]]["val_loss"] - 1) * 100 for r in runs])
        row["delta"] = bench.spread([r["val_loss"] - base[r["seed"]]["val_loss"] for r in runs])
        row["delta_at_crash_pct"] = bench.spread([(r["val_loss_at_crash"] / base[r["seed"]]["val_loss_at_crash"] - 1) * 100
                                            for r in runs])
    return row


def _pct(s: dict | None) -> str:
    return "-" if s is None else f"{s['mean']:+.2f} ± {s['std']:.2f}%"


def table(rows: list[dict], steps: int, seeds: list[int], crash_at: int, device: str) -> str:
    lines = [f"{bench.MODEL} on {bench.DATA}, {device}, {bench.STAGES} stages uncompressed, {steps} steps of {bench.MICRO_BATCHES} x "
             f"{bench.MICRO_BATCH_SIZE} sequences, Adam lr {bench.LR:g} (warm-up {bench.LR_WARMUP}), seeds {','.join(map(str, seeds))}; "
             f"stage {CRASHED} restored from a K-step-old snapshot after step {crash_at}; validation loss on "
             f"{bench.VALIDATION_BATCHES * bench.MICRO_BATCH_SIZE} held-out sequences (mean ± std over seeds; vs = paired, same seed)",
             f"{'run':>14} {'after crash':>16} {'vs undisturbed':>17} {'final val loss':>16} {'min..max':>13} "
             f"{'bits/byte':>15} {'vs undisturbed':>17}"]
    for r in rows:
        name = "undisturbed" if r["k"] is None else f"crash, K={r['k']}"
        d, dc = (_pct(r.get(key)) for key in ("delta_pct", "delta_at_crash_pct"))
        lines.append(f"{name:>14} {bench.pm(r['val_loss_at_crash'], 4):>16} {dc:>17} {bench.pm(r['val_loss'], 4):>16} "
                     f"{r['val_loss']['min']:.3f}..{r['val_loss']['max']:.3f} {bench.pm(r['bits_per_byte']):>15} {d:>17}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--crash-at", type=int, default=None, help="steps applied when the stage is lost (default: half)")
    parser.add_argument("--k", default="5,10", help="comma-separated snapshot ages in steps (tests/test_churn.py: 5; "
                                                    "training.backup_every_steps default: 10)")
    parser.add_argument("--json-out", default="benchmarks/results/churn-accuracy.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds, ks = [int(s) for s in args.seeds.split(",")], [int(k) for k in args.k.split(",")]
    crash_at = args.steps // 2 if args.crash_at is None else args.crash_at
    if not all(0 <= k <= crash_at for k in ks) or not 0 < crash_at <= args.steps:
        parser.error(f"need 0 <= K <= crash step ({crash_at}) <= steps ({args.steps})")
    started, batches = time.perf_counter(), bench.validation()
    runs: dict[int | None, list[dict]] = {k: [] for k in [None, *ks]}
    for seed in seeds:
        for k in runs:
            runs[k].append(run(seed, args.steps, crash_at, k, batches, args.device))
    base = {r["seed"]: r for r in runs[None]}
    rows = [summarise(k, rs, base) for k, rs in runs.items()]
    seconds = time.perf_counter() - started
    print(table(rows, args.steps, seeds, crash_at, args.device))
    print(f"({seconds / 60:.1f} min)")
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps({
        "model": bench.MODEL, "data": bench.DATA, "device": args.device, "threads": args.threads, "steps": args.steps, "seeds": seeds,
        "stages": bench.STAGES, "crashed_stage": CRASHED, "crash_at": crash_at, "micro_batches": bench.MICRO_BATCHES,
        "micro_batch_size": bench.MICRO_BATCH_SIZE, "lr": bench.LR, "lr_warmup_steps": bench.LR_WARMUP,
        "validation_sequences": bench.VALIDATION_BATCHES * bench.MICRO_BATCH_SIZE, "metric": "validation loss (nats/byte)",
        "command": "python -m benchmarks.churn_accuracy " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seconds": seconds, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
