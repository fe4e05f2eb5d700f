"""A node's stage under ``memory_limit_gb``, in a process of its own (tests/test_recompute.py): the
cap is what this process holds at the start plus ``--headroom`` of the stage's predicted need with
recomputation (0) and without (1); the planner plans for the capped node, the stage trains two GPipe
steps (the planner's in-flight count: all micro-batches) and its measured peak (VmHWM, reset at the start) is printed as JSON.
``--force-off`` runs the stage without recomputation whatever the plan says (what the cap prevents).

    python -m tests.memory_probe MODEL_YAML [--headroom 0.5] [--force-off]
"""
from __future__ import annotations

import argparse
import json

import torch

from swarm.config import NodeConfig
from swarm.dag.stages import model_io
from swarm.data import lm_loss
from swarm.models import trace_model
from swarm.runtime.local import LocalPipeline, local_servers
from swarm.runtime.memory import MemoryGauge, return_freed_memory
from swarm.scheduler import PeerSpec, PlanSettings, Swarm, Workload, evaluate, schedule

MICRO_BATCH, MICRO_BATCHES = 8, 4


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--headroom", type=float, default=0.5)
    ap.add_argument("--force-off", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    return_freed_memory()   # what a capped node does (swarm.node): resident memory is what tensors hold
    traced = trace_model(args.model, "coarse", MICRO_BATCH)
    w = Workload.from_dag(traced.dag)
    gauge = MemoryGauge(torch.device("cpu"))
    used = gauge.used()    # the interpreter, torch and the traced model: the cap covers them too
    one = Swarm.build([PeerSpec("me", 1.0, 10**13)], lambda a, b: 1e9)
    need = {mode: evaluate(w, one, [((0, w.n), [0])], PlanSettings(MICRO_BATCHES, schedule="gpipe", recompute=mode))
            .stages[0].memory_bytes for mode in ("on", "off")}
    limit = used + need["on"] + args.headroom * (need["off"] - need["on"])
    cfg = NodeConfig(memory_limit_gb=limit / 1e9)
    advertised = cfg.advertised_memory(10**13, used)
    me = Swarm.build([PeerSpec("me", 1.0, advertised)], lambda a, b: 1e9)
    plans = {mode: schedule(w, me, PlanSettings(MICRO_BATCHES, schedule="gpipe", stages=1, recompute=mode))
             for mode in ("auto", "off")}
    plan = plans["auto"]
    recompute = plan.stages[0].recompute and not args.force_off
    (server,) = local_servers(traced, 1, lm_loss, max_batch=MICRO_BATCH, recompute=recompute)
    tokens = model_io(traced)[0][1]
    data = torch.randint(0, 256, (MICRO_BATCH * MICRO_BATCHES, tokens + 1), generator=torch.Generator().manual_seed(0))
    gauge.reset()
    pipeline = LocalPipeline([server.worker], "gpipe")   # every micro-batch's forward, then the backwards
    losses = [pipeline.train_step(data[:, :-1], data[:, 1:], MICRO_BATCHES) for _ in range(2)]
    print(json.dumps({"limit": cfg.memory_limit_bytes, "used_at_start": used, "advertised": advertised,
                      "need_recomputed": need["on"], "need_plain": need["off"],
                      "feasible": {m: p.feasible for m, p in plans.items()},
                      "planned": plan.stages[0].memory_bytes, "plan_recompute": plan.stages[0].recompute,
                      "recompute": recompute, "peak": gauge.peak(), "losses": losses,
                      "over": gauge.over(cfg.memory_limit_bytes, plan.stages[0].memory_bytes, 0)}))


if __name__ == "__main__":
    main()
