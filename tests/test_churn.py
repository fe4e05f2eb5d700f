"""Churn while training, with real node processes on loopback: a killed sole holder is replaced by the
spare from its snapshot (at most K steps of its ops lost), a graceful leave loses nothing, a joining
node gets work and state, a whole swarm restarts from its checkpoints. The step never goes backwards."""
import json
import re
import signal
from pathlib import Path

from swarm.data import ByteCorpus, generated_corpus, lm_loss
from swarm.models import load_model
from swarm.runtime import lr_at, make_optimizer
from tests.swarmproc import MADDR, Proc, wait_until

MB, SIZE, BACKUP_EVERY = 4, 2, 5


def config(tmp_path: Path, name: str = "node.yaml", min_members: int = 4, **training) -> str:
    cfg = {"device": "cpu", "micro_batch_size": SIZE,
           "network": {"host_maddrs": ["/ip4/127.0.0.1/tcp/0"], "heartbeat_s": 0.5, "ttl_s": 4.0,
                       "startup_timeout_s": 30, "probe_interval_s": 30.0, "leave_timeout_s": 40},
           "election": {"join_batch_s": 1, "min_epoch_s": 3, "election_timeout_s": 8, "drift_check_s": 3600,
                        "min_members": min_members, "stages": 3, "max_replicas": 1, "micro_batches": MB},
           "training": {"threads": 1, "metrics_path": str(tmp_path / "metrics.jsonl"), "backup_every_steps": BACKUP_EVERY,
                        "timeout_s": 10, **training},
           "compression": {"mode": "off"}}
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return str(path)


def start(procs, tmp_path, cfg: str, names: list[str], maddr: str | None = None) -> tuple[dict, str]:
    nodes = {}
    for name in names:
        proc = Proc("node.py", "run", "--config", cfg, "--identity", str(tmp_path / f"{name}.id"),
                    "--initial-peers", *([maddr] if maddr else []))
        procs.append(proc)
        nodes[name] = proc
        maddr = maddr or proc.wait_for(MADDR, 60).group(1)
    return nodes, maddr


def steps(tmp_path: Path) -> list[dict]:
    path = tmp_path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def driven(tmp_path: Path) -> list[int]:
    return [r["step"] for r in steps(tmp_path) if "loss" in r]


def reached(tmp_path: Path, step: int) -> bool:
    return bool(driven(tmp_path)) and max(driven(tmp_path)) >= step


def role_of(nodes: dict, pattern: str) -> str:
    return next(n for n, p in nodes.items() if any(re.search(pattern, line) for line in p.lines))


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


def lost_lines(nodes: dict) -> list[str]:
    return [line for p in nodes.values() for line in p.lines if "steps of them lost" in line]


def test_killed_sole_holder_is_replaced_from_a_snapshot_and_a_leaver_hands_over(tmp_path, swarm_procs):
    total = 45
    nodes, _ = start(swarm_procs, tmp_path, config(tmp_path, max_steps=total, min_members=5), list("abcde"))
    wait_until(lambda: reached(tmp_path, 12), 150, what="12 steps trained")
    middle = role_of(nodes, r"training: stage 1 of 3")
    nodes[middle].kill(signal.SIGKILL)
    alive = {n: p for n, p in nodes.items() if n != middle}
    replaced = lambda: any(re.search(r"training: stage 1 of 3 from step [1-9]", line)  # noqa: E731
                           for p in alive.values() for line in p.lines)
    wait_until(replaced, 90, what="the killed stage restored from a snapshot")
    restarted = max(driven(tmp_path))
    wait_until(lambda: reached(tmp_path, restarted + 6), 120, what="training resumed after the kill")
    # (none lost when the newest snapshot is of the very step the holder died at)
    lost = [int(re.search(r"up to (\d+) steps", line).group(1)) for line in lost_lines(alive)]
    assert max(lost, default=0) <= BACKUP_EVERY + 4, lost   # the period, plus the steps of a heartbeat and a transfer

    leaver = role_of(alive, r"training: stage 2 of 3")
    rest = {n: p for n, p in alive.items() if n != leaver}
    before = len(lost_lines(rest))
    alive[leaver].kill(signal.SIGTERM)   # graceful: its state is handed over, no step lost
    alive[leaver].wait_for("left the swarm", 60)
    assert not any("did not take" in line for line in alive[leaver].lines)
    mark = max(driven(tmp_path))
    wait_until(lambda: reached(tmp_path, mark + 6), 120, what="training resumed after the leave")
    assert len(lost_lines(rest)) == before

    wait_until(lambda: reached(tmp_path, total - 1), 180, what=f"{total} steps trained")
    order = driven(tmp_path)
    assert all(b > a for a, b in zip(order, order[1:])), order     # the step never goes backwards or repeats
    by_step = {r["step"]: r["loss"] for r in steps(tmp_path) if "loss" in r}
    ours = [by_step[k] for k in range(total) if k in by_step]
    assert final_loss(ours) <= 1.05 * final_loss(reference_losses(total))


def test_a_joining_node_gets_work_and_state(tmp_path, swarm_procs):
    nodes, maddr = start(swarm_procs, tmp_path, config(tmp_path, max_steps=30, min_members=4), list("abcd"))
    wait_until(lambda: reached(tmp_path, 8), 120, what="8 steps trained")
    joined_at = max(driven(tmp_path))
    joiner, _ = start(swarm_procs, tmp_path, config(tmp_path, "late.yaml", max_steps=30, min_members=4), ["z"], maddr)
    got = joiner["z"].wait_for(r"training: stage \d+ of 3 from step (\d+) \(\d+ ops of state, ([1-9]\d*) fetched\)"
                               r"|backup: snapshot of ([1-9]\d*) ops at step (\d+)", 120)
    start_step = int(got.group(1) or got.group(4))
    assert start_step >= joined_at
    wait_until(lambda: reached(tmp_path, 29), 180, what="30 steps trained")
    order = driven(tmp_path)
    assert all(b > a for a, b in zip(order, order[1:])), order


def test_a_whole_swarm_restarts_from_its_checkpoints(tmp_path, swarm_procs):
    ckpt = str(tmp_path / "ckpt")
    first, _ = start(swarm_procs, tmp_path, config(tmp_path, max_steps=8, min_members=3, checkpoint_dir=ckpt,
                                                   checkpoint_every_steps=4), list("abc"))
    wait_until(lambda: len(list(Path(ckpt).glob("step-000000008/done-*"))) == 3, 120, what="the step-8 checkpoint")
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
