"""Churn under rare sync (docs/sync.md), with real node processes on loopback: three replicas of one
stage sync every 6 steps; one is SIGKILLed between two syncs. The others keep training, the new plan
resumes their outer state as it was (the anchor's digest in their metrics rows and training events),
and a node that joins afterwards starts from the last synced parameters."""
import json
import signal
import time
from pathlib import Path

import pytest

from swarm.runtime.metrics import read_events, read_metrics
from tests.swarmproc import Proc, wait_until

H = 6


def config(tmp_path: Path, name: str, members: int) -> str:
    cfg = {"device": "cpu", "micro_batch_size": 2,
           "network": {"host_maddrs": ["/ip4/127.0.0.1/tcp/0"], "heartbeat_s": 0.5, "ttl_s": 4.0,
                       "startup_timeout_s": 30, "probe_interval_s": 30.0},
           "election": {"join_batch_s": 1, "min_epoch_s": 3, "election_timeout_s": 8, "drift_check_s": 3600, "probe_wait_s": 2,
                        "min_members": members, "stages": 1, "max_replicas": 0, "micro_batches": 2},
           "training": {"threads": 1, "metrics_path": str(tmp_path / "metrics.jsonl"), "timeout_s": 10,
                        "sync_every": H, "backup_every_steps": 0, "eval_every_steps": 0},
           "compression": {"mode": "off"}}
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return str(path)


def rows(tmp_path: Path) -> list[dict]:
    return [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]


@pytest.mark.scenario   # about 2 minutes of node processes: run by `python -m benchmarks.scenarios` (the suite
# keeps tests/test_outer.py: the exchange, overlapped syncs, the anchor a taken-over state starts from)
def test_a_replica_killed_between_syncs_costs_the_others_nothing(tmp_path, swarm_procs):
    cfg, nodes, maddr = config(tmp_path, "node.yaml", 3), {}, None
    for name in "abc":
        nodes[name] = Proc("node.py", "run", "--config", cfg, "--identity", str(tmp_path / f"{name}.id"),
                           "--initial-peers", *([maddr] if maddr else []), ready_file=tmp_path / f"{name}.ready.json")
        swarm_procs.append(nodes[name])
        maddr = maddr or nodes[name].maddr(60)
    ids = {n: p.peer_id(60) for n, p in nodes.items()}
    synced = wait_until(lambda: [r for r in rows(tmp_path) if r["syncs"] >= 1], 240, what="a first sync of the replicas")
    assert synced[0]["sync_every"] == H and synced[0]["anchor"]
    nodes["c"].kill(signal.SIGKILL)   # between two syncs: the next is H steps away
    killed_at, before = time.time(), {r["plan_hash"] for r in rows(tmp_path)}
    survivors = {ids["a"], ids["b"]}

    def replanned() -> dict | None:
        new = {}
        for r in rows(tmp_path):
            if r["plan_hash"] not in before and r["peer"] in survivors:
                new.setdefault(r["peer"], r)
        return new if len(new) == 2 else None
    first = wait_until(replanned, 120, what="both survivors training under a plan without the killed replica")
    old = {p: [r for r in rows(tmp_path) if r["peer"] == p and r["plan_hash"] in before] for p in survivors}
    assert all(len(old[p]) > 0 for p in survivors)
    events = {e["peer"]: e for e in read_events(tmp_path / "metrics.jsonl", "training", killed_at) if e["peer"] in survivors}
    assert set(events) == survivors, events
    for p in survivors:   # the outer state came through the re-plan as it was, and no step of theirs was lost
        assert events[p]["anchor"] == old[p][-1]["anchor"], (events[p], old[p][-1])
        assert events[p]["lost_steps"] == 0 and events[p]["params"] != events[p]["anchor"]   # inner steps kept
    assert events[ids["a"]]["anchor"] == events[ids["b"]]["anchor"]
    assert all(r["step"] > max(s["step"] for s in old[r["peer"]]) for r in first.values())
    print(f"[sync-churn] killed after step {synced[0]['step']}; new plan after {time.time() - killed_at:.0f} s")

    joined_at = time.time()
    nodes["d"] = Proc("node.py", "run", "--config", config(tmp_path, "late.yaml", 2), "--identity", str(tmp_path / "d.id"),
                      "--initial-peers", maddr, ready_file=tmp_path / "d.ready.json")
    swarm_procs.append(nodes["d"])
    d = nodes["d"].peer_id(60)
    (joined,) = wait_until(lambda: [e for e in read_events(tmp_path / "metrics.jsonl", "training", joined_at)
                                    if e["peer"] == d], 180, what="the joiner's training event")
    assert joined["fetched"] > 0 and joined["params"] == joined["anchor"], joined   # from the last synced parameters
    anchors = {r["anchor"] for r in rows(tmp_path) if r["peer"] in survivors}
    assert joined["anchor"] in anchors, (joined, anchors)
    wait_until(lambda: len([r for r in rows(tmp_path) if r["peer"] == d]) >= 3, 120, what="the joiner training")
