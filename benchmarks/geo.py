"""Swarm against its baselines on an emulated geo-distributed testbed (root: ``swarm.testbed``).

    python -m benchmarks.geo --scenario geo [--steps 16] [--variants abcde] [--json-out FILE] [--plot FILE]

Variants, each a fresh swarm of real ``node.py run`` processes, one per testbed node, same model and data:
(a) naive plan (one peer per stage in id order, equal op counts), no compression; (b) OP-Fence plan,
no compression; (c) naive plan with AdaTopK; (d) swarm: OP-Fence + AdaTopK (a-d: replicas sum their
gradients every step); (f, not in the default set) swarm whose replicas sync rarely, each plan
choosing how rarely (``training.sync_every: 0``, docs/sync.md); (e) PyTorch's own
pipeline parallelism (``benchmarks/torch_pipeline.py``: GPipe over gloo, the naive stages, rank i on
node i). Before electing, the nodes
measure their links for ``--measure-s`` seconds. Reported per variant: samples/s over the steps after
the first two, the loss at the last step (mean over first-stage replicas), bytes sent in all and per
link, the plan, and the analytic bound of ``benchmarks/bound.py`` from each peer's measured compute
and each link's measured bytes over its shaped rate ("busy": the busiest resource alone; "bound": plus
the pipeline fill no synchronous schedule can hide). Prints a table, writes JSON and a PNG.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.bound import per_step, step_bound
from swarm.config import config_dir, load
from swarm.errors import SwarmError
from swarm.procs import kill_group, load_ready, poll_until, read_ready
from swarm.runtime.metrics import newest_by_peer, read_metrics
from swarm.runtime.metrics import summarise as summarise_metrics
from swarm.testbed import Scenario, Testbed

ROOT = Path(__file__).resolve().parent.parent
# key -> (planner, compression, training.sync_every): a-d keep their replicas synchronous (every step);
# f lets each plan choose how rarely its replicas sync (docs/sync.md), so replicas across sites pay
VARIANTS = {"a": ("naive", "off", 1), "b": ("opfence", "off", 1), "c": ("naive", "auto", 1), "d": ("opfence", "auto", 1),
            "f": ("opfence", "auto", 0)}
MICRO_BATCH_SIZE = 4
NAMES = {"a": "naive", "b": "OP-Fence", "c": "naive + AdaTopK", "d": "swarm (OP-Fence + AdaTopK)",
         "f": "swarm, replicas sync rarely"}


def node_config(path: Path, host: str, n: int, planner: str, compression: str, metrics: Path,
                run: argparse.Namespace, sync_every: int = 1) -> None:
    cfg = {"model": run.model, "device": "cpu", "micro_batch_size": MICRO_BATCH_SIZE,
           "network": {"host_maddrs": [f"/ip4/{host}/tcp/0"], "heartbeat_s": 1.0, "ttl_s": 20.0,
                       "startup_timeout_s": 60, "probe_interval_s": 30.0},
           "election": {"join_batch_s": run.measure_s, "min_members": n, "planner": planner,
                        "micro_batches": run.micro_batches,
                        "min_epoch_s": 3600, "drift_check_s": 3600, "election_timeout_s": 60},
           "training": {"max_steps": run.steps, "metrics_path": str(metrics), "threads": 1, "timeout_s": 120,
                        "schedule": run.schedule, "sync_every": sync_every},
           "compression": {"mode": compression, "warmup_steps": 0}}
    path.write_text(json.dumps(cfg))


def run_variant(bed: Testbed, scenario: Scenario, key: str, out: Path, run: argparse.Namespace) -> dict:
    planner, compression, sync_every = VARIANTS[key]
    work = out / f"variant-{key}"
    work.mkdir(parents=True, exist_ok=True)
    metrics = work / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    n = len(scenario.nodes())
    procs, maddr = [], None

    def alive() -> None:
        dead = [i for i, p in enumerate(procs) if p.poll() is not None]
        if dead:
            raise SwarmError(f"variant {key}: node {dead[0]} exited (log {work}/node{dead[0]}.log)")

    try:
        for i in range(n):
            cfg = work / f"node{i}.yaml"
            node_config(cfg, bed.hosts[i], n, planner, compression, metrics, run, sync_every)
            ready = ready_file(work, i)
            ready.unlink(missing_ok=True)
            argv = [sys.executable, str(ROOT / "node.py"), "run", "--config", str(cfg), "--identity",
                    str(work / f"node{i}.id"), "--ready-file", str(ready), "--initial-peers", *([maddr] if maddr else [])]
            # each node profiles its device under its own CPU quota (once; later variants reuse it)
            cache = out / "profiles" / f"node{i}"
            procs.append(bed.start(i, argv, work / f"node{i}.log", {"SWARM_CACHE_DIR": str(cache)}))
            if maddr is None:
                maddrs = _waited(lambda: read_ready(ready_file(work, 0), 300, check=alive, what="node 0 to listen"))
                maddr = next(a for a in maddrs["maddrs"] if a.startswith("/ip4/"))
        _waited(lambda: poll_until(lambda: len({r["step"] for r in read_metrics(metrics) if "loss" in r}) >= run.steps,
                                   run.timeout_s, f"variant {key}: {run.steps} steps (logs in {work})", 1.0, alive))
        return summarise(key, read_metrics(metrics), scenario, bed, work)
    finally:
        for p in procs:
            kill_group(p)


def run_torch(bed: Testbed, scenario: Scenario, out: Path, run: argparse.Namespace) -> dict:
    """Variant (e): torch.distributed.pipelining, GPipe over gloo, rank i on node i, the naive stages."""
    work = out / "variant-e"
    work.mkdir(parents=True, exist_ok=True)
    metrics = work / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    n = len(scenario.nodes())
    procs = [bed.start(i, [sys.executable, "-m", "benchmarks.torch_pipeline", "--rank", str(i), "--world", str(n),
                           "--master", bed.hosts[0], "--steps", str(run.steps), "--model", run.model,
                           "--micro-batches", str(run.micro_batches), "--micro-batch-size", str(MICRO_BATCH_SIZE),
                           "--metrics", str(metrics)],
                       work / f"rank{i}.log", {"PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": bed.interface(i)})
             for i in range(n)]
    def failed() -> None:
        if any(p.poll() not in (None, 0) for p in procs):
            raise SwarmError(f"variant e: {run.steps} steps not done (logs in {work})")

    try:   # the last rank appends to the metrics file
        _waited(lambda: poll_until(lambda: len(read_metrics(metrics)) >= run.steps, run.timeout_s,
                                   f"variant e: {run.steps} steps (logs in {work})", 1.0, failed))
    finally:
        for p in procs:
            kill_group(p)
    rows = sorted(read_metrics(metrics), key=lambda r: r["step"])
    timed = rows[2:] or rows
    span = timed[-1]["time"] - (timed[0]["time"] - timed[0]["step_s"])
    sites = [site for site, _ in scenario.nodes()]
    return {"variant": "e", "name": "torch.distributed.pipelining", "steps": len(rows),
            "samples_per_s": sum(r["samples"] for r in timed) / span, "loss_last": rows[-1]["loss"],
            "loss_first": rows[0]["loss"], "bytes_sent": None, "wire_ratio": 1.0,
            "stages": [[f"n{i}({sites[i]})"] for i in range(n)], "bound_samples_per_s": None,
            "losses": [r["loss"] for r in rows]}


def summarise(key: str, rows: list[dict], scenario: Scenario, bed: Testbed, work: Path) -> dict:
    """Throughput and loss over the steps after the first two, bytes per link, and the analytic bound."""
    summary = summarise_metrics(rows, skip_steps=2)
    last = newest_by_peer(rows)
    ids = {load_ready(ready_file(work, i))["peer_id"]: i for i in range(len(bed.hosts))}
    sites = [site for site, _ in scenario.nodes()]
    stages = sorted({r["stage"] for r in last.values()})
    holders = {s: sorted(ids[p] for p, r in last.items() if r["stage"] == s) for s in stages}
    # per step over the timed steps: each peer's counters after the step before them, and at the end
    stats, timeline = {}, {}
    for p in last:
        mine = [r for r in rows if r["peer"] == p]
        before = next((r for r in mine if r["step"] == summary["timed_from_step"] - 1), mine[0])
        stats[p] = per_step(before, last[p])
        timeline[f"n{ids[p]}"] = step_timeline(before, last[p])
    bound = step_bound(stats, lambda a, b: scenario.mbit(sites[ids[a]], sites[ids[b]]) * 1e6, lambda p: f"n{ids[p]}")
    batch = summary["samples_per_step"]
    return {"variant": key, "name": NAMES[key], "steps": summary["steps"], "samples_per_s": summary["samples_per_s"],
            "loss_last": summary["loss_last"], "loss_first": summary["loss_first"], "bytes_sent": summary["bytes_sent"],
            "wire_ratio": summary["wire_ratio"], "stages": [[f"n{i}({sites[i]})" for i in holders[s]] for s in stages],
            "sync_every": summary["sync_every"], "val_loss_last": summary["val_loss_last"],
            "mb_per_step_by_link": {f"n{ids[p]}->n{ids[q]}": round(b / 1e6, 3) for p, st in stats.items()
                                    for q, b in sorted(st.sent.items()) if q in ids and b > 0},
            "compute_s_per_step": {f"n{ids[p]}": round(st.compute_s, 4) for p, st in stats.items()},
            "timeline_s_per_step": timeline,
            "bound_samples_per_s": batch / bound.step_s, "busy_bound_samples_per_s": batch / bound.busy_step_s,
            "bound_limit": bound.limit, "losses": summary["loss"]}


def step_timeline(first: dict, last: dict) -> dict[str, float]:
    """Where a peer's wall time went per step between two of its rows: its passes (``compute``, of which
    ``compute_cpu`` on the CPU), waiting for the step's first pass (``fill``), from the last pass to
    the optimizer step (``drain``, of which ``reduce``: all-reduce and optimizer step), and between passes
    (``starved``); ``cpu``: the whole process."""
    n = last["step"] - first["step"]
    per = {k: (last.get(k, 0.0) - first.get(k, 0.0)) / n
           for k in ("time", "compute_s", "compute_cpu_s", "fill_s", "drain_s", "reduce_s", "cpu_s")}
    starved = per["time"] - per["compute_s"] - per["fill_s"] - per["drain_s"]
    return {k: round(v, 4) for k, v in {"step": per["time"], "compute": per["compute_s"], "fill": per["fill_s"],
            "starved": starved, "drain": per["drain_s"], "reduce": per["reduce_s"],
            "compute_cpu": per["compute_cpu_s"], "cpu": per["cpu_s"]}.items()}


def ready_file(work: Path, i: int) -> Path:
    """Node ``i``'s ready file (``node.py run --ready-file``): its peer id and multiaddrs."""
    return work / f"node{i}.ready.json"


def _waited(wait):
    """``wait()``'s value; its ``TimeoutError`` as the benchmark's one-line error."""
    try:
        return wait()
    except TimeoutError as e:
        raise SwarmError(str(e)) from None


def plot(results: list[dict], path: Path, scenario: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    a.bar([r["variant"] for r in results], [r["samples_per_s"] for r in results])
    a.set(ylabel="samples/s", title=f"throughput on '{scenario}'")
    for r in results:
        b.plot(r["losses"], label=f"({r['variant']}) {r['name']}")
    b.set(xlabel="step", ylabel="loss", title="training loss")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="geo", help="name in configs/scenarios or a YAML path")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--variants", default="abcde")
    parser.add_argument("--model", default="gpt2-tiny")
    parser.add_argument("--measure-s", type=float, default=25.0, help="link probing before the first plan")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per variant")
    parser.add_argument("--schedule", default="1f1b", choices=["1f1b", "gpipe"], help="of variants a-d and f")
    parser.add_argument("--micro-batches", type=int, default=16,
                        help="per first-stage replica and step (enough to amortise the step boundary)")
    parser.add_argument("--out-dir", default="geo-out")
    parser.add_argument("--json-out")
    parser.add_argument("--plot")
    args = parser.parse_args(argv)
    try:
        path = Path(args.scenario) if args.scenario.endswith((".yaml", ".yml")) else \
            config_dir() / "scenarios" / f"{args.scenario}.yaml"
        scenario = load(Scenario, path)
        name = scenario.name or path.stem
        out = Path(args.out_dir)
        results = []
        with Testbed(scenario) as bed:
            for key in args.variants:
                if key == "e":
                    results.append(run_torch(bed, scenario, out, args))
                elif key in VARIANTS:
                    results.append(run_variant(bed, scenario, key, out, args))
                else:
                    raise SwarmError(f"unknown variant '{key}' (a, b, c, d, e, f)")
                r = results[-1]
                print(f"({key}) {r['name']}: {r['samples_per_s']:.2f} samples/s, loss {r['loss_last']:.3f}", flush=True)
    except SwarmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    base = {r["variant"]: r for r in results}
    print(f"\nscenario {name}, {args.model}, {args.steps} steps of {args.micro_batches} x {MICRO_BATCH_SIZE} "
          "sequences per first-stage replica")
    print(f"{'variant':<30}{'samples/s':>10}{'vs (a)':>8}{'bound':>8}{'of bound':>9}{'busy':>7}{'loss':>8}"
          f"{'MB sent':>9}{'wire x':>8}  stages")
    for r in results:
        vs = r["samples_per_s"] / base["a"]["samples_per_s"] if "a" in base else float("nan")
        bound = r["bound_samples_per_s"]
        bound_text = (f"{bound:>8.2f}{r['samples_per_s'] / bound:>9.0%}{r['samples_per_s'] / r['busy_bound_samples_per_s']:>7.0%}"
                      if bound else f"{'-':>8}{'-':>9}{'-':>7}")
        sent = f"{r['bytes_sent'] / 1e6:>9.1f}" if r["bytes_sent"] is not None else f"{'-':>9}"
        print(f"({r['variant']}) {r['name'][:26]:<26}{r['samples_per_s']:>10.2f}{vs:>8.2f}{bound_text}{r['loss_last']:>8.3f}"
              f"{sent}{r['wire_ratio']:>8.1f}  {' | '.join(','.join(s) for s in r['stages'])}")
    print("\nValidation loss (held-out text) after the last step, and how often the replicas synced")
    for r in results:
        if r.get("val_loss_last") is not None:
            print(f"({r['variant']}) {r['name'][:26]:<26} val loss {r['val_loss_last']:.4f}, sync every {r['sync_every']}")
    print("\nMB per step on each link (a -> b), and what limits the bound")
    for r in results:
        if r.get("mb_per_step_by_link") is not None:
            links = sorted(r["mb_per_step_by_link"].items(), key=lambda kv: -kv[1])
            print(f"({r['variant']}) {r['bound_limit']:<18} " + "  ".join(f"{k} {v:.2f}" for k, v in links))
    print("\nSeconds per step of the busiest peer: passes (of which CPU), fill, starved between passes, drain; CPU of its process")
    for r in results:
        if r.get("timeline_s_per_step"):
            peer, t = max(r["timeline_s_per_step"].items(), key=lambda kv: kv[1]["compute"])
            print(f"({r['variant']}) {peer:<4} step {t['step']:.2f} = compute {t['compute']:.2f} (cpu {t['compute_cpu']:.2f})"
                  f" + fill {t['fill']:.2f} + starved {t['starved']:.2f} + drain {t['drain']:.2f} (reduce {t['reduce']:.2f});"
                  f"  process cpu {t['cpu']:.2f}")
    json_out = Path(args.json_out or f"benchmarks/results/geo-{name}.json")
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps({"scenario": name, "model": args.model, "steps": args.steps,
                                   "micro_batches": args.micro_batches, "results": results},
                                   indent=1))
    plot(results, Path(args.plot or out / f"geo-{name}.png"), name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
