"""Churn while training, with real node processes on loopback: a killed middle-stage sole holder is
replaced by the spare from its snapshot (at most K steps of its ops lost), a joining node gets work and
state, a graceful leave loses nothing, a whole swarm restarts from its checkpoints. The step never goes
backwards."""
import json
import re
import signal
import time
from pathlib import Path

import pytest

from swarm.data import ByteCorpus, generated_corpus, lm_loss
from swarm.models import load_model
from swarm.runtime import lr_at, make_optimizer
from swarm.runtime.metrics import read_events, read_metrics
from tests.conftest import run_cli
from tests.swarmproc import Proc, wait_until

MB, SIZE, K = 4, 2, 5   # K: training.backup_every_steps, the most steps a crash may cost


def config(tmp_path: Path, name: str = "node.yaml", min_members: int = 4, max_replicas: int = 1, **training) -> str:
    cfg = {"device": "cpu", "micro_batch_size": SIZE,
           "network": {"host_maddrs": ["/ip4/127.0.0.1/tcp/0"], "heartbeat_s": 0.5, "ttl_s": 4.0,
                       "startup_timeout_s": 30, "probe_interval_s": 30.0, "leave_timeout_s": 40},
           "election": {"join_batch_s": 1, "min_epoch_s": 3, "election_timeout_s": 8, "drift_check_s": 3600, "probe_wait_s": 2,
                        "min_members": min_members, "stages": 3, "max_replicas": max_replicas, "micro_batches": MB},
           "training": {"threads": 1, "metrics_path": str(tmp_path / "metrics.jsonl"), "backup_every_steps": K,
                        "timeout_s": 10, **training},
           "compression": {"mode": "off"}}
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return str(path)


def start(procs, tmp_path, cfg: str, names: list[str], maddr: str | None = None) -> tuple[dict, str]:
    nodes = {}
    for name in names:
        proc = Proc("node.py", "run", "--config", cfg, "--identity", str(tmp_path / f"{name}.id"),
                    "--initial-peers", *([maddr] if maddr else []), ready_file=tmp_path / f"{name}.ready.json")
        procs.append(proc)
        nodes[name] = proc
        maddr = maddr or proc.maddr(60)
    return nodes, maddr


def steps(tmp_path: Path) -> list[dict]:
    return read_metrics(tmp_path / "metrics.jsonl")


def started(tmp_path: Path, since: float = 0.0, peers: set[str] | None = None) -> list[dict]:
    """The ``training`` event rows (a session started: its stage, step, and where its state came from)."""
    return [e for e in read_events(tmp_path / "metrics.jsonl", "training", since) if peers is None or e["peer"] in peers]


def driven(tmp_path: Path) -> list[int]:
    return [r["step"] for r in steps(tmp_path) if "loss" in r]


def reached(tmp_path: Path, step: int) -> bool:
    return bool(driven(tmp_path)) and max(driven(tmp_path)) >= step


def role(proc: Proc) -> str:
    """The node's part in the newest plan it committed ("stage 1", "spare", ...), from its ready file."""
    return proc.ready(5, until=lambda info: info["role"] is not None)["role"]


def peer_tail(proc: Proc) -> str:
    return proc.peer_id(5)[-8:]


def training_since(tmp_path: Path, plans: set[str]) -> dict[str, dict]:
    """Peer id -> its first metrics row under a plan not in ``plans``: the stage it trains, the step it began at."""
    first: dict[str, dict] = {}
    for r in steps(tmp_path):
        if r["plan_hash"] not in plans:
            first.setdefault(r["peer"], r)
    return first


def plans(tmp_path: Path) -> set[str]:
    return {r["plan_hash"] for r in steps(tmp_path)}


def reference_losses(n_steps: int) -> list[float]:
    """Undisturbed training (= the swarm's, which trains exactly like one process)."""
    import torch

    torch.manual_seed(0)
    model = load_model("gpt2-tiny").module
    opt = make_optimizer("adam", model.parameters(), 1e-3)
    corpus, out = ByteCorpus(generated_corpus(), 128), []
    for step in range(n_steps):
        x, y = corpus.batch(step, MB * SIZE)
        opt.zero_grad()
        total = 0.0
        for xm, ym in zip(x.chunk(MB), y.chunk(MB)):
            loss = lm_loss(model(xm), ym)
            (loss / MB).backward()
            total += loss.item() / MB
        opt.param_groups[0]["lr"] = lr_at(step, 1e-3, 20)
        opt.step()
        out.append(total)
    return out


def final_loss(rows: list[float]) -> float:
    return sum(rows[-5:]) / 5


def monotonic(tmp_path: Path) -> None:
    """The step never goes backwards or repeats: each driver's steps increase, and every plan starts
    after the steps of the plans before it (first-stage replicas each record the steps they drive)."""
    by_peer, by_plan = {}, {}
    for r in steps(tmp_path):
        if "loss" in r:
            by_peer.setdefault(r["peer"], []).append(r["step"])
            by_plan.setdefault(r["plan_hash"], []).append(r["step"])
    for order in by_peer.values():
        assert all(b > a for a, b in zip(order, order[1:])), order
    plans = list(by_plan.values())   # in the order they first trained
    assert all(min(b) > max(a) for a, b in zip(plans, plans[1:])), plans


@pytest.mark.scenario   # 100 s of node processes: run by `python -m benchmarks.scenarios` (the suite keeps
# tests/test_backup.py's K-step snapshot bound and tests/test_adoption.py::test_the_step_never_goes_back_when_the_only_holder_dies)
def test_a_killed_middle_stage_holder_is_replaced_by_the_spare_from_its_snapshot(tmp_path, swarm_procs):
    total = 72   # the kill, the re-plan and the spare's take-over all come before max_steps on 2 busy cores
    cfg = config(tmp_path, max_steps=total, min_members=4)
    nodes, maddr = start(swarm_procs, tmp_path, cfg, list("abcd"))
    wait_until(lambda: reached(tmp_path, 12), 150, what="12 steps trained")
    roles = {n: role(p) for n, p in nodes.items()}
    middle, spare = (next(n for n, r in roles.items() if r == want) for want in ("stage 1", "spare"))
    tail = {n: peer_tail(p) for n, p in nodes.items()}
    ids = {n: p.peer_id(5) for n, p in nodes.items()}
    backed_up = rf"stage 1: held by {tail[middle]} at step \d+; snapshots: .*{tail[spare]} \(\d+ steps old\)"

    def status_with_backup():   # the spare's snapshot of the middle stage, as status shows it (one call, usually)
        res = run_cli("status", "--config", cfg, "--initial-peers", maddr, timeout=60)
        return re.search(backed_up, res.stdout) and res

    status = wait_until(status_with_backup, 60, interval_s=0.5, what="status showing the spare's snapshot of stage 1")
    assert re.search(rf"stage 1: held by {tail[middle]} at step \d+; snapshots: .*{tail[spare]} \(\d+ steps old\)",
                     status.stdout) and f"spares: {tail[spare]}" in status.stdout, status.stdout + status.stderr
    nodes[middle].kill(signal.SIGKILL)
    alive = {n: p for n, p in nodes.items() if n != middle}
    since, before, survivors = time.time(), plans(tmp_path), {ids[n] for n in nodes if n != middle}
    # the spare gets work in the plan without the dead node
    wait_until(lambda: ids[spare] in training_since(tmp_path, before), 90, what="the spare training")
    wait_until(lambda: {ids[n] for n in alive} <= set(training_since(tmp_path, before)), 30,
               what="every survivor training")
    # the dead holder's ops came from the spare's snapshot: its own store, or fetched from it
    sessions = started(tmp_path, since, survivors)
    assert any(e["peer"] == ids[spare] and e["fetched"] < e["ops"] or ids[spare] in e["donors"] for e in sessions), sessions
    lost = [e["lost_steps"] for e in started(tmp_path, peers=survivors)]
    assert max(lost, default=0) <= K, lost   # (none lost when the newest snapshot is of the step it died at)
    assert not any(e["initial"] for e in started(tmp_path, peers=survivors)), started(tmp_path, peers=survivors)
    wait_until(lambda: reached(tmp_path, total - 1), 180, what=f"{total} steps trained")
    monotonic(tmp_path)
    by_step = {r["step"]: r["loss"] for r in steps(tmp_path) if "loss" in r}
    ours, ref = final_loss([by_step[k] for k in range(total) if k in by_step]), final_loss(reference_losses(total))
    print(f"steps lost: {lost or [0]} (K = {K}); final loss {ours:.3f}, undisturbed {ref:.3f}")
    assert abs(ours - ref) <= 0.05 * ref, (ours, ref)


@pytest.mark.scenario   # 110 s of node processes: run by `python -m benchmarks.scenarios` (the suite keeps
# tests/test_adoption.py::test_state_from_the_own_store_and_from_donors_then_ready and the demo's graceful leaves)
def test_a_joining_node_gets_work_and_state_and_a_leaver_hands_its_state_over(tmp_path, swarm_procs):
    total = 72   # a joiner needs ~25 s to train on 2 busy cores, while the swarm trains ~1.4 steps/s
    ckpt = tmp_path / "ckpt"   # written on the way out only (the period is longer than the run)
    nodes, maddr = start(swarm_procs, tmp_path, config(tmp_path, max_steps=total, max_replicas=0, checkpoint_dir=str(ckpt),
                                                       checkpoint_every_steps=1000), list("abcd"))
    wait_until(lambda: reached(tmp_path, 8), 120, what="8 steps trained")
    joined_at = max(driven(tmp_path))
    joiner, _ = start(swarm_procs, tmp_path, config(tmp_path, "late.yaml", max_steps=total, max_replicas=0, checkpoint_dir=str(ckpt),
                                                    checkpoint_every_steps=1000), ["e"], maddr)
    nodes.update(joiner)
    e = joiner["e"].peer_id(60)
    first = wait_until(lambda: training_since(tmp_path, set()).get(e), 120, what="the joiner training")   # work
    got = wait_until(lambda: started(tmp_path, peers={e}), 5, what="the joiner's training event")[0]
    assert first["step"] >= joined_at and got["fetched"] == got["ops"], (first, got)   # the state of its ops from the others
    assert got["ops"] == 0 or got["donors"], got
    wait_until(lambda: max(driven(tmp_path)) >= first["step"] + 3, 60, what="the 5-node plan training")

    roles = {n: role(p) for n, p in nodes.items()}
    assert "spare" not in roles.values(), roles
    leaver = next(n for n, r in roles.items() if list(roles.values()).count(r) == 1)   # a sole holder
    since, before = time.time(), plans(tmp_path)
    nodes[leaver].kill(signal.SIGTERM)   # graceful: it finishes its step, hands its state over, no step lost
    left = nodes[leaver].ready(60, until=lambda info: info["state"] == "offline", what="the leaver to have left")
    leaver_id = nodes[leaver].peer_id(5)
    (gone,) = wait_until(lambda: read_events(tmp_path / "metrics.jsonl", "left"), 10, what="the leaver's left event")
    assert gone["peer"] == leaver_id and gone["handed_over"] and not gone["finished"], gone
    stage = int(roles[leaver].split()[1])   # SIGTERM wrote the leaver's checkpoint before it handed over
    assert list(ckpt.glob(f"step-*/done-{stage}")) and (ckpt / "model.json").exists(), sorted(p.name for p in ckpt.rglob("*"))
    mark = max(driven(tmp_path))
    wait_until(lambda: reached(tmp_path, mark + 5), 120, what="training resumed without the leaver")
    rest = {p.peer_id(5) for n, p in nodes.items() if n != leaver}
    resumed = started(tmp_path, since, rest)
    assert training_since(tmp_path, before) and resumed and not any(e["lost_steps"] or e["initial"] for e in resumed), resumed
    print(f"joiner: {got}; leaver ({roles[leaver]}): {left}")
    wait_until(lambda: reached(tmp_path, total - 1), 180, what=f"{total} steps trained")
    monotonic(tmp_path)


def test_a_whole_swarm_restarts_from_its_checkpoints(tmp_path, swarm_procs):
    ckpt = str(tmp_path / "ckpt")
    first, _ = start(swarm_procs, tmp_path, config(tmp_path, max_steps=8, min_members=3, checkpoint_dir=ckpt,
                                                   checkpoint_every_steps=4), list("abc"))
    wait_until(lambda: len(list(Path(ckpt).glob("step-000000008/done-*"))) == 3, 120, what="the step-8 checkpoint")
    # (the first stage writes step 7's row after the step's validation, which follows the checkpoint)
    wait_until(lambda: 7 in {r["step"] for r in steps(tmp_path) if "loss" in r}, 60, what="step 7's metrics row")
    losses = {r["step"]: r["loss"] for r in steps(tmp_path) if "loss" in r}
    for proc in first.values():
        proc.kill(signal.SIGKILL)   # the whole swarm goes down
    (tmp_path / "metrics.jsonl").unlink()
    again, _ = start(swarm_procs, tmp_path, config(tmp_path, "again.yaml", max_steps=12, min_members=3,
                                                   checkpoint_dir=ckpt, checkpoint_every_steps=4), list("xyz"))
    wait_until(lambda: reached(tmp_path, 11), 120, what="steps 8-11 trained after the restart")
    assert driven(tmp_path)[0] == 8
    resumed = {r["step"]: r["loss"] for r in steps(tmp_path) if "loss" in r}
    assert resumed[8] < 0.9 * losses[0] and abs(resumed[8] - losses[7]) < 0.3 * losses[7]
