"""Event rows (``swarm.events``): what a node did, in the metrics file, for programs to read instead of
its log. Step rows and event rows share the file; each reader gets its own kind."""
import dataclasses
import json
import time

from swarm.config import ElectionConfig
from swarm.events import COMMIT, REFUSED, Events
from swarm.models import trace_model
from swarm.net.membership import MembershipView
from swarm.planning import Elector
from swarm.refusals import Refusals
from swarm.runtime.metrics import read_events, read_metrics, summarise
from swarm.scheduler import Workload
from tests.test_planning import Ballots, member


def test_event_rows_share_the_metrics_file_without_reaching_the_step_readers(tmp_path):
    path = tmp_path / "metrics.jsonl"
    events = Events(str(path), "peerA")
    events.emit("training", stage=1, step=5)
    step = {"step": 0, "stage": 0, "peer": "peerA", "plan_hash": "h" * 16, "time": time.time(), "bytes_sent": 10,
            "act_raw": 0, "act_wire": 0, "loss": 2.0, "samples": 4, "step_s": 0.5}
    with open(path, "a") as f:
        f.write(json.dumps(step) + "\n")
    mark = time.time()
    events.emit(COMMIT, epoch=3)
    with open(path, "a") as f:
        f.write('{"event": "commit", "peer": "peerB", "ti')   # a row being written right now
    assert read_metrics(path) == [step] and summarise(read_metrics(path))["steps"] == 1
    assert [(e["event"], e["peer"]) for e in read_events(path)] == [("training", "peerA"), ("commit", "peerA")]
    assert [e["epoch"] for e in read_events(path, COMMIT, since=mark)] == [3] and not read_events(path, "left")
    size = path.stat().st_size
    Events(None, "peerA").emit(COMMIT, epoch=4)   # no metrics file: nothing written, nothing raised
    assert path.stat().st_size == size


def test_an_unwritable_metrics_file_costs_a_warning_not_the_node(tmp_path, caplog):
    Events(str(tmp_path / "missing" / "metrics.jsonl"), "p").emit(COMMIT, epoch=1)
    assert "cannot append to the metrics file" in caplog.text


def test_a_flood_of_refusals_is_one_event_row_per_peer_kind_and_interval(tmp_path):
    path, now = tmp_path / "m.jsonl", [0.0]
    refusals = Refusals(log=lambda line: None, clock=lambda: now[0], events=Events(str(path), "me"))
    for _ in range(100):
        refusals.note("QmAttacker", "record", "bandwidth_bps -1 out of range")
    refusals.note("QmOther", "ballot", "malformed")
    now[0] += 61
    refusals.note("QmAttacker", "record", "bandwidth_bps -1 out of range")
    rows = read_events(path, REFUSED)
    assert [(r["from"], r["kind"], r["detail"]) for r in rows] == [
        ("QmAttacker", "record", "bandwidth_bps -1 out of range"), ("QmOther", "ballot", "malformed"),
        ("QmAttacker", "record", "bandwidth_bps -1 out of range")]
    assert refusals.total() == 102 and all(r["peer"] == "me" for r in rows)


def test_a_commit_is_an_event_row_with_the_plan_s_stage_holders(tmp_path):
    workload = Workload.from_dag(trace_model("gpt2-tiny", "coarse", 4).dag)
    path = tmp_path / "m.jsonl"
    ballots = Ballots()   # one shared ballot store: the DHT's
    electors = {p: Elector(p, ballots, workload,
                           ElectionConfig(join_batch_s=0, min_members=3, stages=2, min_epoch_s=0),
                           events=Events(str(path), p)) for p in "ABC"}
    records = {p: member(p, None) for p in "ABC"}
    for _ in range(20):
        for p, e in electors.items():
            advert = e.step(MembershipView(dict(records), time.time()))
            records[p] = dataclasses.replace(records[p], **{k: v for k, v in dataclasses.asdict(advert).items()})
        if all(e.plan is not None for e in electors.values()):
            break
    rows = read_events(path, COMMIT)
    assert sorted(r["peer"] for r in rows) == ["A", "B", "C"], rows
    plan = electors["A"].plan
    for r in rows:
        assert r["plan_hash"] == plan.hash and r["members"] == 3 and r["stages"] == [list(s.peers) for s in plan.stages]
        assert r["role"] == records[r["peer"]].role
