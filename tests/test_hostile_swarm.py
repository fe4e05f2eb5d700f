"""A public swarm of real ``node.py run`` processes on loopback under attack (issue 22): one extra
hivemind peer (its own identity, the swarm's record validators) stores crafted member records and
ballots and opens raw libp2p streams; a real member poisons its pipeline neighbours with NaN.

Every row of the issue's table is one attack; the rows are grouped on three swarms to keep the suite
fast. After every attack: training goes on (steps advance in the metrics file), no honest node exits,
the attacker never gets a stage, and the bad record, ballot or frame is named in a log line (a few at
most: the refusal log is rate-limited). A row that fails is reported with the others at the end of its
group (each names what it saw); a swarm an attack broke is restarted for the next row.

Memory bound under the floods: each honest node's process tree (node, DHT child, p2pd) stays within
``RSS_BOUND_MIB`` of its resident size before the flood (peak: 0.1 s samples and each process's VmHWM).
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from hivemind.utils import get_dht_time

from swarm.runtime.metrics import read_events, read_metrics
from tests.hostile import (
    LEN,
    STAGE,
    STATE,
    Attacker,
    EnvProc,
    RssWatch,
    ballot_of,
    bomb_frame,
    fetch_frame,
    hijack_plan,
    identity,
    prefixed,
    reply_text,
    wait_for_time,
)
from tests.swarmproc import Proc, wait_until

TTL = 4.0
RSS_BOUND_MIB = 512          # growth of a node's process tree allowed under a flood
MAX_LINES = 6                # lines naming one attacker per node and attack: "one line", give or take its kinds
ROWS = os.environ.get("HOSTILE_ROWS", "")   # developer knob: run only the rows named here (comma-separated)


def config(directory: Path, model: str = "gpt2-tiny", planner: str = "opfence", stages: int = 2,
           **training) -> str:
    cfg = {"device": "cpu", "model": model, "micro_batch_size": 2,
           "network": {"host_maddrs": ["/ip4/127.0.0.1/tcp/0"], "heartbeat_s": 0.5, "ttl_s": TTL,
                       "startup_timeout_s": 30, "probe_interval_s": 30.0, "leave_timeout_s": 10},
           "election": {"join_batch_s": 1, "min_epoch_s": 3, "election_timeout_s": 8, "drift_check_s": 3600,
                        "min_members": 3, "stages": stages, "max_replicas": 1, "micro_batches": 4, "planner": planner},
           "training": {"threads": 1, "metrics_path": str(directory / "metrics.jsonl"), "backup_every_steps": 5,
                        "timeout_s": 10, **training},
           "compression": {"mode": "off"}}
    path = directory / "node.yaml"
    path.write_text(json.dumps(cfg))
    return str(path)


def wanted(row: str) -> bool:
    return not ROWS or row in ROWS.split(",")


class Swarm:
    """Three honest nodes (one may be given a poisoning environment) training on loopback."""

    def __init__(self, procs: list, directory: Path, envs: dict[str, dict] | None = None,
                 identities: dict[str, str] | None = None, programs: dict[str, str] | None = None, **cfg):
        self.procs, self.dir, self.cfg_kw, self.programs = procs, directory, cfg, programs or {}
        self.envs, self.identities = envs or {}, identities or {}
        self.generation = 0
        self.start()

    def start(self) -> None:
        self.generation += 1
        self.run_dir = self.dir / f"run{self.generation}"
        self.run_dir.mkdir(parents=True)
        cfg = config(self.run_dir, **self.cfg_kw)
        self.nodes: dict[str, Proc] = {}
        maddr = None
        for name in ("a", "b", "c"):
            ident = self.identities.get(name) or str(self.run_dir / f"{name}.id")
            args = (self.programs.get(name, "node.py"), "run", "--config", cfg, "--identity", ident,
                    "--initial-peers", *([maddr] if maddr else []))
            proc = EnvProc(*args, env=self.envs.get(name), ready_file=self.run_dir / f"{name}.ready.json")
            self.procs.append(proc)
            self.nodes[name] = proc
            maddr = maddr or proc.maddr(90)
        self.maddr = maddr
        self.ids = {n: p.peer_id(90) for n, p in self.nodes.items()}

    def restart(self) -> None:
        for p in self.nodes.values():
            p.cleanup()
        self.start()

    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def rows(self) -> list[dict]:
        return [r for r in read_metrics(self.metrics) if "loss" in r]

    def top(self) -> int:
        return max((r["step"] for r in self.rows()), default=-1)

    def exited(self, names=None) -> list[str]:
        out = []
        for n in names or self.nodes:
            code = self.nodes[n].popen.poll()
            if code is not None:
                last = [line.strip() for line in self.nodes[n].lines if "error" in line.lower()][-1:]
                out.append(f"node {n} ({self.ids[n][-8:]}) exited with {code}: {last or self.nodes[n].lines[-1:]}")
        return out

    def marks(self) -> float:
        """Now (unix s): event rows stamped after it are what happened since."""
        return time.time()

    def events(self, kind: str, since: float, names=None) -> dict[str, list[dict]]:
        """Node name -> its event rows of ``kind`` (``swarm.events``) since ``since``."""
        rows = read_events(self.metrics, kind, since)
        return {n: [r for r in rows if r["peer"] == self.ids[n]] for n in names or self.nodes}

    def training(self, steps: int = 2, timeout_s: float = 240) -> None:
        wait_until(lambda: self.top() >= steps or self.exited(), timeout_s, what=f"{steps} steps trained")
        assert not self.exited(), self.exited()

    def healthy(self) -> bool:
        if self.exited():
            return False
        mark = self.top()
        try:
            wait_until(lambda: self.top() > mark, 40, what="a step")
            return True
        except AssertionError:
            return False

    def keeps_training(self, seconds: float, steps: int, names=None, limit_s: float = 120) -> list[str]:
        """Failures, if any: an honest node exited, or, once ``seconds`` have passed (the attack had time
        to act), fewer than ``steps`` new steps since the start or no new step since then."""
        start, mark, later = time.monotonic(), self.top(), None
        while True:
            if gone := self.exited(names):
                return gone
            elapsed = time.monotonic() - start
            if elapsed >= seconds:
                later = self.top() if later is None else later
                if self.top() >= max(mark + steps, later + 1):
                    return []
            if elapsed > seconds + limit_s:
                return [f"training stalled: step {self.top()} after {elapsed:.0f} s (was {mark} at the start, "
                        f"{later} after {seconds:.0f} s; wanted +{steps} and one more)"]
            time.sleep(0.5)   # polling the metrics file


def named(swarm: Swarm, since: float, tail: str, names=None) -> dict[str, list[str]]:
    """Per honest node, its refusals of peer ``tail`` (its last 8 characters) since ``since``, one per
    refusal line it logged (``refused`` event rows)."""
    return {n: [f"refused {r['kind']} from {tail}: {r['detail']}" for r in rows if r["from"].endswith(tail)]
            for n, rows in swarm.events("refused", since, names).items()}


def commits(swarm: Swarm, since: float, names=None) -> list[dict]:
    """The ``commit`` event rows of honest nodes since ``since``."""
    return [r for rows in swarm.events("commit", since, names).values() for r in rows]


def stage_holders(swarm: Swarm, since: float, names=None) -> set[str]:
    """Id tails (6 characters) holding a stage in every plan an honest node committed since ``since``."""
    return {peer[-6:] for c in commits(swarm, since, names) for replicas in c["stages"] for peer in replicas}


def verdict(row: str, swarm: Swarm, since: float, attackers: list[Attacker], seconds: float, steps: int = 3,
            names=None, must_name: bool = True) -> list[str]:
    """The checks after one attack: training goes on, nobody exits, no attacker gets a stage, each
    attacker is named (refused) on some honest node, in a few lines at most."""
    failures = [f"{row}: {f}" for f in swarm.keeps_training(seconds, steps, names)]
    holders = stage_holders(swarm, since, names)
    for a in attackers:
        if a.peer_id[-6:] in holders:
            failures.append(f"{row}: attacker {a.tail} got a stage ({sorted(holders)})")
        lines = named(swarm, since, a.tail, names)
        count = {n: len(v) for n, v in lines.items()}
        if must_name and not any(count.values()):
            failures.append(f"{row}: no honest node names attacker {a.tail} in a log line "
                            f"(stores accepted: {a.stores['ok']}, refused: {a.stores['refused']})")
        if max(count.values(), default=0) > MAX_LINES:
            failures.append(f"{row}: attacker {a.tail} named in {count} lines (a flood of log lines)")
        print(f"[{row}] attacker {a.tail}: named {count}; e.g. {next((v[0] for v in lines.values() if v), None)}")
    print(f"[{row}] step {swarm.top()}; {'OK' if not failures else failures}")
    return failures


def mend(swarm: Swarm, failures: list[str], row: str) -> None:
    """After a row that broke the swarm, start a fresh one for the next row."""
    if failures and not swarm.healthy():
        print(f"[{row}] the swarm is broken: restarting it for the next row")
        swarm.restart()
        swarm.training()


@pytest.mark.slow
@pytest.mark.scenario   # minutes long: run by `python -m benchmarks.hostile`, not by the default suite
@pytest.mark.timeout(900)
def test_hostile_records_and_ballots_neither_crash_stall_nor_hijack_the_swarm(tmp_path, swarm_procs):
    """Rows: a vote in epoch 2^64-1; bandwidth -1 / NaN to every member; TFLOP/s 1e9 / inf / -1 / NaN;
    a ballot at epoch 10^12 giving every op to the attacker, with its vote; ghost records (1-year
    expiration, updated_at 1e12) whose writer is gone, then a real member SIGKILLed."""
    swarm = Swarm(swarm_procs, tmp_path)
    swarm.training()
    failures: list[str] = []
    honest = lambda: sorted(swarm.ids.values())

    def attacker(name: str, first: bool = False) -> Attacker:
        return Attacker([swarm.maddr], identity(tmp_path / "keys", name, honest(), first), ttl_s=TTL)

    def like(a: Attacker) -> dict:
        records = wait_until(lambda: (r := a.records()) and all(p in r for p in honest()) and r, 20, what="honest records")
        return records[honest()[0]]

    def row(name: str, attackers: list[Attacker], seconds: float = 15, steps: int = 3):
        since = swarm.marks()
        try:
            for a, record, vote in attackers:
                a.keep(record, vote=vote)
            return verdict(name, swarm, since, [a for a, _, _ in attackers], seconds, steps)
        finally:
            for a, _, _ in attackers:
                a.go_offline()
                a.close()

    if wanted("epoch"):
        a = attacker("epoch")
        got = row("vote in epoch 2^64-1", [(a, a.clone_record(like(a), vote_epoch=2 ** 64 - 1, vote_hash="f" * 16), False)])
        failures += got
        mend(swarm, got, "epoch")

    if wanted("bandwidth"):
        minus, nan = attacker("bw-minus"), attacker("bw-nan")
        got = row("bandwidth -1 / NaN", [
            (minus, minus.clone_record(like(minus), bandwidth_bps={p: -1.0 for p in honest()}), False),
            (nan, nan.clone_record(like(nan), bandwidth_bps={p: float("nan") for p in honest()}), False)])
        failures += got
        mend(swarm, got, "bandwidth")

    if wanted("tflops"):
        liars = [(attacker(f"tflops-{i}"), value) for i, value in enumerate((1e9, math.inf, -1.0, math.nan))]
        got = row("tflops 1e9 / inf / -1 / NaN", [
            (a, a.clone_record(like(a), tflops=v, model_tflops=v), True) for a, v in liars], seconds=20)
        failures += got
        mend(swarm, got, "tflops")

    if wanted("hijack"):
        from swarm.models import trace_model
        from swarm.scheduler import Plan
        from swarm.scheduler.costs import Workload

        a = attacker("hijack")
        traced = trace_model("gpt2-tiny", "coarse", 2)
        names = Workload.from_dag(traced.dag).names
        model, micro_batches = traced.dag.model, 4   # the swarm's (config: election.micro_batches)
        for honest_ballot in a.ballots().values():   # (ballots expire: a steady swarm may have none left)
            compact = json.loads(honest_ballot["plan"])
            # the toolkit rebuilds plans as the nodes do: an honest ballot's plan hashes to its hash here too
            assert Plan.from_compact(compact, names).hash == honest_ballot["plan_hash"]
            assert (compact["model"], compact["micro_batches"]) == (model, micro_batches)
        plan = hijack_plan(traced, a.peer_id, honest(), micro_batches, model)
        epoch = 10 ** 12
        ballot = ballot_of(plan, epoch, a.peer_id)
        since = swarm.marks()
        try:
            assert a.publish_ballot(ballot), "no honest node stored the hijack ballot"
            a.keep(a.clone_record(like(a), vote_epoch=epoch, vote_hash=plan.hash))
            got = verdict("hijack ballot at epoch 10^12", swarm, since, [a], 15)
        finally:
            a.go_offline()
            a.close()
        committed = [c for c in commits(swarm, since) if c["epoch"] == epoch]
        if committed:
            got.append(f"hijack ballot at epoch 10^12: committed by honest nodes: {committed[:3]}")
        failures += got
        mend(swarm, got, "hijack")

    if wanted("ghost"):
        since = swarm.marks()
        ghosts = []
        for name, first, updated_at in (("ghost-year", True, None), ("ghost-future", False, 1e12)):
            g = attacker(name, first)
            record = g.clone_record(like(g))
            if updated_at:
                record["updated_at"] = updated_at
            stored = g.publish(record, get_dht_time() + 365 * 86400)   # stored once, for a year
            ghosts.append((g.peer_id, stored))
            g.close()   # the writer is gone
        print(f"[ghost] ghosts {[(p[-8:], ok) for p, ok in ghosts]} (first sorts before every honest id)")
        got = [f"ghost records: {f}" for f in swarm.keeps_training(2 * TTL, 1)]   # within 2 TTLs they must be gone
        roles = {n: [r] if (r := p.ready(5)["role"]) else [] for n, p in swarm.nodes.items()}   # from the ready files
        victim = next((n for n, r in roles.items() if r == ["stage 1"]), "c")
        swarm.nodes[victim].kill(signal.SIGKILL)
        survivors = [n for n in swarm.nodes if n != victim]
        killed = swarm.marks()
        print(f"[ghost] SIGKILLed node {victim} ({roles[victim]}) at step {swarm.top()}")
        got += [f"ghost records, then a member SIGKILLed: {f}" for f in swarm.keeps_training(0, 3, survivors, limit_s=120)]
        after = commits(swarm, killed, survivors)
        if not any(c["members"] == 2 for c in after):
            got.append(f"ghost records: no plan of the 2 survivors committed after the kill ({after[-2:]})")
        for peer, _ in ghosts:
            lines = named(swarm, since, peer[-8:], survivors)
            if not any(lines.values()):
                got.append(f"ghost records: ghost {peer[-8:]} not named in any log line")
            print(f"[ghost] ghost {peer[-8:]} named: {next((v[0] for v in lines.values() if v), None)}")
            if peer[-6:] in stage_holders(swarm, since, survivors):
                got.append(f"ghost records: ghost {peer[-8:]} got a stage")
        print(f"[ghost] step {swarm.top()}; {'OK' if not got else got}")
        failures += got

    assert not failures, "\n".join(failures)


@pytest.mark.slow
@pytest.mark.scenario   # minutes long: run by `python -m benchmarks.hostile`, not by the default suite
@pytest.mark.timeout(900)
def test_data_plane_floods_are_refused_in_bounded_memory_while_training_goes_on(tmp_path, swarm_procs):
    """Rows: decompression bombs (k = 0 AdaTopK packets of 2^28 elements, and frames of 8 of them) on
    swarm.stage.v1 and swarm.state.v1 in a loop; 300 fetch requests whose replies are never read; 200
    stage streams each sending all but the last byte of a frame of the largest size allowed."""
    swarm = Swarm(swarm_procs, tmp_path)
    swarm.training()
    failures: list[str] = []
    a = Attacker([swarm.maddr], identity(tmp_path / "keys", "flood"), ttl_s=TTL)
    try:
        # the strongest flooder is a member: a weak peer (sane numbers, too little memory for a stage) that
        # answers probes and votes, so the swarm re-plans with it as a spare and serves it state
        records = wait_until(lambda: (r := a.records()) and all(p in r for p in swarm.ids.values()) and r, 20,
                             what="honest records")
        joined = swarm.marks()
        a.keep(a.clone_record(records[swarm.ids["a"]], tflops=1e-3, model_tflops=1e-3, memory_bytes=1 << 20), vote=True)
        try:
            wait_until(lambda: any(c["members"] == 4 for c in commits(swarm, joined)), 60, what="a plan with the flooder as a spare")
            print(f"[flood] attacker {a.tail} is a member (a spare) of the plan")
        except AssertionError:
            print(f"[flood] attacker {a.tail} was not let into a plan: it floods as a stranger")
        failures += [f"flooder joining: {f}" for f in swarm.keeps_training(0, 2)]
        if a.peer_id[-6:] in stage_holders(swarm, joined):
            failures.append(f"flooder joining: attacker {a.tail} got a stage")

        def targets():
            records = a.records()
            stage = {n: records.get(p, {}).get("stage") for n, p in swarm.ids.items()}
            return {n: s for n, s in stage.items() if s is not None}, records

        def flood(row: str, attack) -> None:
            nonlocal failures
            since = swarm.marks()
            watch = RssWatch({n: p.popen.pid for n, p in swarm.nodes.items()})
            over = lambda: {n: round(watch.peak_mib(n) - watch.baseline_mib(n)) for n in swarm.nodes
                            if watch.peak_mib(n) - watch.baseline_mib(n) > RSS_BOUND_MIB}
            try:
                victims, detail = attack(over)
                got = [f"{row}: {f}" for f in swarm.keeps_training(10, 2)]
            finally:
                a.release()
                watch.close()
            growth = {n: (round(watch.baseline_mib(n)), round(watch.peak_mib(n))) for n in swarm.nodes}
            print(f"[{row}] RSS MiB (before, peak) per node: {growth}; {detail}")
            if over():
                got.append(f"{row}: RSS grew by more than {RSS_BOUND_MIB} MiB: {over()} (before, peak: {growth})")
            lines = named(swarm, since, a.tail, victims)
            count = {n: len(v) for n, v in lines.items()}
            print(f"[{row}] named: {count}; e.g. {next((v[0] for v in lines.values() if v), None)}")
            if not any(count.values()):
                got.append(f"{row}: no targeted node ({', '.join(victims)}) logs the refusal naming {a.tail}")
            if max(count.values(), default=0) > MAX_LINES:
                got.append(f"{row}: the refusal is logged {count} times (not rate-limited)")
            print(f"[{row}] step {swarm.top()}; {'OK' if not got else got}")
            failures += got
            mend(swarm, got, row)

        def bombs(over):
            stages, _ = targets()
            one, eight = prefixed(bomb_frame()), prefixed(bomb_frame(packets=8))
            replies, sent, deadline = {}, 0, time.monotonic() + 15
            plan = [(n, STAGE) for n in stages] + [(n, STATE) for n in swarm.nodes]
            while time.monotonic() < deadline and not over() and not swarm.exited():
                for n, protocol in plan:
                    replies.setdefault((n, protocol), reply_text(a.request(swarm.ids[n], protocol, one)))
                    sent += 1
                    if over():
                        break
            if not over():   # 8 packets in one 790-byte frame: 8 GiB if decoded; only once one packet was safe
                for n, protocol in plan:
                    replies.setdefault((n, protocol, 8), reply_text(a.request(swarm.ids[n], protocol, eight)))
                    sent += 1
            return list(swarm.nodes), f"{sent} bomb frames of {len(one)} / {len(eight)} bytes; replies: {replies}"

        def fetches(over):
            _, records = targets()
            from swarm.models import trace_model
            dag = trace_model("gpt2-tiny", "coarse", 2).dag
            best = None
            for n, p in swarm.ids.items():
                for first, stop, _ in records.get(p, {}).get("holds") or []:
                    for i in range(first, stop):
                        if best is None or dag.ops[i].param_bytes > best[2]:
                            best = (n, dag.ops[i].name, dag.ops[i].param_bytes)
            assert best is not None, "no node advertises the state it holds"
            n, op, size = best
            frame = prefixed(fetch_frame(op))
            opened = 0
            for _ in range(6):
                if over() or swarm.exited():
                    break
                opened += a.hold(swarm.ids[n], STATE, frame, 50)
                wait_for_time(1.0, lambda: not over())
            wait_for_time(8, lambda: not over() and not swarm.exited())
            return [n], f"{opened} unread fetches of '{op}' ({size / 1e6:.1f} MB of parameters) from node {n}, {len(frame)} bytes each"

        def half_frames(over):
            stages, _ = targets()
            n = next(iter(sorted(stages, key=stages.get)))
            probe = reply_text(a.request(swarm.ids[n], STAGE, LEN.pack(1 << 40)))
            m = re.search(r"limit (\d+)", probe)
            assert m, f"the stage did not say its frame limit: {probe!r}"
            limit = int(m.group(1))
            data = LEN.pack(limit) + bytes(limit - 1)
            opened = 0
            for _ in range(8):
                if over() or swarm.exited():
                    break
                opened += a.hold(swarm.ids[n], STAGE, data, 25)
                wait_for_time(1.0, lambda: not over())
            wait_for_time(8, lambda: not over() and not swarm.exited())
            return [n], f"{opened} stage streams of node {n} left one byte short of a {limit}-byte frame"

        for name, attack in (("bombs", bombs), ("fetch flood", fetches), ("half-sent frames", half_frames)):
            if wanted(name.split()[0]):
                flood(name, attack)
    finally:
        a.go_offline()
        a.close()
    assert not failures, "\n".join(failures)


def _finite_file(path: Path) -> list[str]:
    """Names of the non-finite floating-point tensors in a saved stage file."""
    saved = torch.load(path, weights_only=True)
    return [k for k, t in saved["state"].items() if t.is_floating_point() and not torch.isfinite(t).all()]


@pytest.mark.slow
@pytest.mark.scenario   # run by `python -m benchmarks.hostile` (tests/test_hostile_frames.py covers NaN in the suite)
@pytest.mark.timeout(600)
def test_a_member_poisoning_its_neighbours_with_nan_never_reaches_honest_parameters(tmp_path, swarm_procs):
    """A real member (node.py minus its check of what it sends, same model) whose stage sends NaN
    activations and NaN gradients: training
    goes on to max_steps, every loss is finite, no honest stage's saved parameters hold a NaN, and the
    poisoner is named in a log line. The naive planner places peers in id order, so the poisoner gets
    the middle stage of three (both its neighbours are honest)."""
    keys = tmp_path / "keys"
    ids = sorted((identity(keys, f"n{i}") for i in range(3)), key=lambda ident: ident.peer_id)
    identities = {"a": ids[0].path, "b": ids[1].path, "c": ids[2].path}   # b: the middle of the id order
    total = 12
    save = tmp_path / "saved"
    swarm = Swarm(swarm_procs, tmp_path, envs={"b": {"SWARM_TEST_POISON": "act,grad"}}, identities=identities,
                  programs={"b": "tests/poisoner.py"},   # node.py without its own check of what it sends
                  model="tests.user_models:poisonable_gpt", planner="naive", stages=0, max_steps=total,
                  save_dir=str(save))
    honest = ["a", "c"]
    poisoner = swarm.ids["b"]
    since = swarm.marks()
    failures = []
    try:
        wait_until(lambda: swarm.top() >= total - 1 or swarm.exited(honest), 240, what=f"{total} steps trained")
    except AssertionError as e:
        failures.append(f"training did not reach step {total - 1}: at step {swarm.top()} ({e})")
    failures += swarm.exited(honest)
    losses = {r["step"]: r["loss"] for r in swarm.rows()}
    bad = {s: v for s, v in losses.items() if not math.isfinite(v)}
    if bad:
        failures.append(f"non-finite losses reached the driver: {bad}")
    stopped = [line.strip() for p in (swarm.nodes[n] for n in honest) for line in p.lines if "training stopped" in line]
    if stopped:
        failures.append(f"an honest driver stopped: {stopped[:2]}")
    files = {f: _finite_file(f) for f in save.glob("stage*-*.pt") if poisoner[-8:] not in f.name} if save.exists() else {}
    if not files:
        failures.append("no honest stage saved its parameters at max_steps")
    for f, nonfinite in files.items():
        if nonfinite:
            failures.append(f"NaN reached honest parameters: {f.name}: {nonfinite[:4]} ({len(nonfinite)} tensors)")
    lines = named(swarm, since, poisoner[-8:], honest)
    print(f"poisoner {poisoner[-8:]}: named {({n: len(v) for n, v in lines.items()})}; "
          f"e.g. {next((v[0] for v in lines.values() if v), None)}; losses {losses}")
    if not any(lines.values()):
        failures.append(f"no honest node names the poisoner {poisoner[-8:]} in a log line")
    if failures:   # where the NaN went: the honest nodes' live state, fetched as any peer can
        failures.append(_nan_report(swarm, honest, tmp_path))
    assert not failures, "\n".join(failures)


def _nan_report(swarm: Swarm, honest: list[str], tmp_path: Path) -> str:
    from swarm.models import trace_model
    from swarm.wire import Limits, unpack

    if swarm.exited(honest):
        return "(no live state to fetch)"
    try:
        a = Attacker([swarm.maddr], identity(tmp_path / "keys", "observer"), ttl_s=TTL)
    except Exception as e:
        return f"(no observer: {e})"
    try:
        ops = [op.name for op in trace_model("tests.user_models:poisonable_gpt", "coarse", 2).dag.ops if op.n_params]
        found = {}
        for n in honest:
            for op in ops:
                reply = a.request(swarm.ids[n], STATE, prefixed(fetch_frame(op)), 20)
                if not reply:
                    continue
                msg = unpack(reply, Limits(max_tensors=4096, max_header_bytes=1 << 20))
                if msg.kind == "state":
                    nan = [k for k, t in msg.tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
                    found[f"{n}:{op}@{msg.meta.get('step')}"] = len(nan)
        return f"honest live state, non-finite tensors per op: {found}"
    finally:
        a.close()
