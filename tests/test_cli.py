"""The command line: JSON fields scripts depend on, and one-line errors with exit code 2."""
import json

import pytest

from tests.conftest import run_cli


def test_dag_json_fields():
    res = run_cli("dag", "--model", "gpt2-tiny", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert {"ops", "params", "total_flops"} <= set(data)
    assert data["params"] == 3323392
    assert all({"name", "kind", "inputs", "flops", "param_bytes", "out_bytes"} <= set(op) for op in data["ops"])
    assert data["total_flops"] == sum(op["flops"] for op in data["ops"])


def test_dag_table_for_a_user_model_with_fine_granularity():
    res = run_cli("dag", "--model", "tests.user_models:branchy", "--granularity", "fine", "--batch-size", "4")
    assert res.returncode == 0, res.stderr
    assert "cat" in res.stdout and "largest cut" in res.stdout.splitlines()[-1]


def test_profile_json_is_cached(tmp_path):
    first = run_cli("profile", "--device", "cpu", "--json")
    assert first.returncode == 0, first.stderr
    profile = json.loads(first.stdout)
    assert profile["device"] == "cpu" and profile["tflops"] > 0 and profile["memory_total_bytes"] > 0
    again = json.loads(run_cli("profile", "--device", "cpu", "--json").stdout)
    assert again["measured_at"] == profile["measured_at"]  # served from the cache


@pytest.mark.parametrize("args, message", [
    (["dag", "--model", "nosuchmodel"], "unknown model 'nosuchmodel'"),
    (["dag", "--model", "tests.user_models:untraceable"], "torch.fx cannot trace model"),
    (["dag", "--config", "/nonexistent/node.yaml"], "config file not found"),
    (["dag", "--granularity", "medium"], "invalid choice: 'medium'"),
    (["dag", "--batch-size", "0"], "argument --batch-size: 0 is below the minimum 1"),
    (["nonsense"], "invalid choice"),
])
def test_bad_input_is_one_line_exit_2(args, message):
    res = run_cli(*args)
    assert res.returncode == 2
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.stderr


def test_bad_config_key_via_cli(tmp_path):
    cfg = tmp_path / "node.yaml"
    cfg.write_text("model: gpt2-tiny\ngranularty: fine\n")
    res = run_cli("dag", "--config", str(cfg))
    assert res.returncode == 2 and "key 'granularty': unknown key" in res.stderr


def test_plan_what_if_json(tmp_path):
    res = run_cli("plan", "--model", "gpt2-tiny", "--peers", "configs/peers/three-sites.yaml", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    for plan in (out, out["baseline"]):
        assert {"stages", "links", "spares", "predicted_step_s"} <= set(plan)
        assert all({"ops", "peers"} <= set(s) for s in plan["stages"])
        assert all({"src", "dst", "bandwidth_bps", "ratio"} <= set(link) for link in plan["links"])
    assert out["predicted_step_s"] < out["baseline"]["predicted_step_s"]
    for plan in (out, out["baseline"], out["best_single"]):
        assert plan["sync_every"] >= 1 and 0 < plan["utilization"] <= 1 and plan["predicted_samples_per_s"] > 0
    assert out["predicted_samples_per_s"] >= out["best_single"]["predicted_samples_per_s"]
    staged = [p for s in out["stages"] for p in s["peers"]]
    assert sorted(staged + out["spares"]) == sorted(p for s in out["baseline"]["stages"] for p in s["peers"])


@pytest.mark.parametrize("text, message", [
    ("peers: []", "peers"),
    ("peers: [{id: a, tflops: -1, memory_gb: 8}]", "tflops"),
    ("peers: [{id: a, tflops: 1, memory_gb: 8, site: moon}]", "unknown site 'moon'"),
    ("peers: [{id: a, tflops: 1, memory_gb: 8}]\nlinks: [{between: [a, nowhere], mbps: 5}]", "both must be peer ids"),
])
def test_plan_bad_peers_file(tmp_path, text, message):
    path = tmp_path / "peers.yaml"
    path.write_text(text)
    res = run_cli("plan", "--model", "gpt2-tiny", "--peers", str(path))
    assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_status_stage_table_shows_holders_and_snapshot_age():
    from swarm.net.membership import MemberRecord
    from swarm.node.status import stage_table

    def rec(peer, stage, step, holds, role=None):
        return MemberRecord(peer, [], "cpu", "x", 1.0, 1, {}, 0.0, stage=stage, step=step, holds=holds, role=role)

    records = [rec("A", 0, 30, [[0, 9, 30]]), rec("B", 1, 30, [[9, 12, 30]]),
               rec("S", None, 25, [[0, 9, 25], [9, 12, 22]], role="spare")]
    assert stage_table(records) == [{"stage": 0, "holders": ["A"], "step": 30, "backups": [("S", 5)]},
                                    {"stage": 1, "holders": ["B"], "step": 30, "backups": [("S", 8)]}]


def test_status_json_is_the_member_view_with_links():
    from swarm.net.membership import MemberRecord
    from swarm.node.status import member_json

    rec = MemberRecord("A", ["/ip4/127.0.0.1/tcp/1/p2p/A"], "cpu", "x", 1.0, 1, {}, 10.0, updated_at=70.0,
                       bandwidth_bps={"B": 5e6}, rtt_s={"B": 0.02, "C": 0.1}, stage=1, step=7, role="stage 1",
                       credential=b"\x00binary")
    (out,) = json.loads(json.dumps(member_json([rec])))   # JSON all the way
    assert {k: out[k] for k in ("peer_id", "maddrs", "state", "role", "stage", "step")} == \
        {"peer_id": "A", "maddrs": ["/ip4/127.0.0.1/tcp/1/p2p/A"], "state": "online", "role": "stage 1", "stage": 1, "step": 7}
    assert out["links"] == {"B": {"bandwidth_bps": 5e6, "rtt_s": 0.02}, "C": {"rtt_s": 0.1}}
    assert out["uptime_s"] == 60.0 and "credential" not in out


def test_run_passes_its_ready_file_to_the_node(tmp_path, monkeypatch):
    import swarm.cli
    import swarm.node

    got = {}

    def run_node(cfg, net, ready_file=None):
        got["ready_file"] = ready_file
        return 0

    monkeypatch.setattr(swarm.node, "run_node", run_node)
    path = str(tmp_path / "ready.json")
    assert swarm.cli.main(["run", "--initial-peers", "--ready-file", path]) == 0 and got == {"ready_file": path}
