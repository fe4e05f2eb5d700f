"""Training across real node processes: three `node.py run` processes elect a 3-stage plan and train
gpt2-tiny to exactly the parameters of single-process training on the same data."""
import json
import math
from pathlib import Path

import torch

from swarm.data import ByteCorpus, generated_corpus, lm_loss
from swarm.models import load_model
from swarm.runtime import lr_at, make_optimizer
from swarm.runtime.metrics import read_metrics
from tests.conftest import ROOT, run_cli
from tests.swarmproc import Proc, p2pd_pids, wait_until

STEPS, MICRO_BATCHES, MICRO_BATCH_SIZE = 3, 4, 2


def write_config(tmp_path: Path, **sections) -> str:
    cfg = {"device": "cpu", "micro_batch_size": MICRO_BATCH_SIZE,
           "network": {"host_maddrs": ["/ip4/127.0.0.1/tcp/0"], "heartbeat_s": 1.0, "ttl_s": 6.0,
                       "startup_timeout_s": 30, "probe_interval_s": 5.0},
           "election": {"join_batch_s": 2, "min_members": 3, "stages": 3, "micro_batches": MICRO_BATCHES,
                        "drift_check_s": 600},
           **sections}
    path = tmp_path / "node.yaml"
    path.write_text(json.dumps(cfg))
    return str(path)


def start_swarm(procs, tmp_path: Path, config: str, n: int) -> None:
    first = Proc("node.py", "run", "--config", config, "--identity", str(tmp_path / "0.id"), "--initial-peers",
                 ready_file=tmp_path / "0.ready.json")
    procs.append(first)
    maddr = first.maddr(90)
    for i in range(1, n):
        procs.append(Proc("node.py", "run", "--config", config, "--identity", str(tmp_path / f"{i}.id"),
                          "--initial-peers", maddr))


def reference_parameters(steps: int) -> dict[str, torch.Tensor]:
    """Single-process training with the data and seed the swarm uses."""
    torch.manual_seed(0)
    model = load_model("gpt2-tiny").module
    opt = make_optimizer("adam", model.parameters(), 1e-3)
    corpus = ByteCorpus(generated_corpus(), 128)
    for step in range(steps):
        x, y = corpus.batch(step, MICRO_BATCHES * MICRO_BATCH_SIZE)
        opt.zero_grad()
        for xm, ym in zip(x.chunk(MICRO_BATCHES), y.chunk(MICRO_BATCHES)):
            (lm_loss(model(xm), ym) / MICRO_BATCHES).backward()
        opt.param_groups[0]["lr"] = lr_at(step, 1e-3, 20)   # the default linear warm-up
        opt.step()
    return dict(model.named_parameters())


def left_the_swarm(out: Path, node: int = 0) -> bool:
    """The demo's node left gracefully: its ready file's last state (the demo passes ``--ready-file``)."""
    return json.loads((out / f"node{node}.ready.json").read_text())["state"] == "offline"


def test_three_node_processes_train_exactly_like_one_process(tmp_path, swarm_procs):
    save = tmp_path / "save"
    config = write_config(tmp_path, training={"max_steps": STEPS, "save_dir": str(save), "threads": 1,
                                              "metrics_path": str(tmp_path / "metrics.jsonl")},
                          compression={"mode": "off"})
    start_swarm(swarm_procs, tmp_path, config, 3)
    files = wait_until(lambda: len(list(save.glob("*.pt"))) == 3 and list(save.glob("*.pt")), 150,
                       what="three stages saved their parameters")
    saved = [torch.load(f) for f in files]
    assert sorted(s["stage"] for s in saved) == [0, 1, 2] and all(s["step"] == STEPS for s in saved)
    ours = {name: t for s in saved for name, t in s["state"].items()}
    reference = reference_parameters(STEPS)
    assert set(reference) <= set(ours)
    for name, p in reference.items():
        assert torch.allclose(ours[name], p, atol=1e-5, rtol=1e-4), name
    rows = read_metrics(tmp_path / "metrics.jsonl")   # the step rows (event rows left out)
    driven = [r for r in rows if "loss" in r]
    assert [r["step"] for r in driven] == list(range(STEPS)) and len({r["plan_hash"] for r in rows}) == 1
    assert all(r["ratio"] == 1.0 and r["bytes_sent"] > 0 for r in rows)
    # the swarm's model, taken away in one file
    from swarm.export import SPEC_FILE, export, load_exported, write_spec

    if not (save / SPEC_FILE).exists():
        write_spec(save, "gpt2-tiny")
    exported = export(save, tmp_path / "gpt2-tiny.safetensors")
    one_process = load_model("gpt2-tiny").module.eval()
    one_process.load_state_dict(reference)
    x, _ = ByteCorpus(generated_corpus(), 128).batch(STEPS, 4)
    with torch.no_grad():
        assert exported.step == STEPS and (load_exported(exported.path)(x) - one_process(x)).abs().max() <= 1e-5


def test_demo_trains_a_private_swarm_and_leaves_nothing_running(tmp_path):
    out, before = tmp_path / "demo", p2pd_pids()
    result = run_cli("demo", "--nodes", "3", "--stages", "3", "--steps", "4", "--micro-batches", "2", "--micro-batch-size", "2",
                     "--compression", "8", "--warmup-steps", "0", "--out-dir", str(out),
                     "--json-out", str(tmp_path / "m.json"), timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["steps"] == 4 and metrics["nodes"] == metrics["stages"] == 3 and len(metrics["plan_hash"]) == 16
    assert metrics["loss_last"] < metrics["loss_first"] and metrics["samples_per_s"] > 0 and metrics["bytes_sent"] > 0
    assert metrics["wire_ratio"] >= 8   # every pipeline link at the fixed ratio (the gradients go back harder)
    rows = read_metrics(out / "metrics.jsonl")   # each stage's row says what it computes in and holds
    assert {r["stage"] for r in rows} == {0, 1, 2} and all(r["precision"] == "fp32" and r["recompute"] is False for r in rows)
    assert all(r["memory_peak_bytes"] >= r["memory_used_bytes"] > 0 and r["memory_planned_bytes"] > 0 for r in rows)
    assert all(r["memory_limit_bytes"] is None for r in rows)
    assert (out / "demo.png").stat().st_size > 10_000
    assert not p2pd_pids() - before and left_the_swarm(out)
    # real held-out text, measured through the pipeline after steps 0 and 3 (the last); the nodes left by themselves
    assert [p["step"] for p in metrics["validation"]] == [0, 3]
    assert json.loads((out / "node.yaml").read_text())["training"]["data"] == "shakespeare"
    assert metrics["val_loss_last"] < metrics["val_loss_first"] and metrics["exit_codes"] == [0, 0, 0]
    assert metrics["model_file"] == str(out / "model.safetensors") and f"model: {metrics['model_file']}" in result.stdout + result.stderr
    sampled = run_cli("generate", "--model", metrics["model_file"], "--prompt", "ROMEO:", "--tokens", "40", "--seed", "0")
    assert sampled.returncode == 0 and sampled.stdout.startswith("ROMEO:") and len(sampled.stdout.rstrip("\n").encode()) >= 40


def test_demo_trains_resnet18_on_synthetic_images_from_its_config_file(tmp_path):
    out, before = tmp_path / "demo", p2pd_pids()
    result = run_cli("demo", "--config", str(ROOT / "configs" / "resnet-demo.yaml"), "--nodes", "2", "--steps", "2",
                     "--micro-batches", "2", "--micro-batch-size", "2", "--out-dir", str(out),
                     "--json-out", str(tmp_path / "m.json"), timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["model"] == "resnet18" and metrics["steps"] == 2 and metrics["nodes"] == metrics["stages"] == 2
    assert all(math.isfinite(metrics[k]) and 0 < metrics[k] < 10 for k in ("loss_first", "loss_last"))
    assert metrics["bytes_sent"] > 0
    nodes = json.loads((out / "node.yaml").read_text())   # the file's values, the flags over them
    assert nodes["training"]["data"] == "synthetic-images" and nodes["election"]["stages"] == 2
    assert nodes["micro_batch_size"] == nodes["election"]["micro_batches"] == 2
    assert not p2pd_pids() - before and left_the_swarm(out)


def test_demo_rejects_bad_input_in_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("training: {data: [gone.txt]}\n")
    for args, message in [(["--nodes", "0"], "below the minimum"), (["--compression", "fast"], "auto, off or a ratio"),
                          (["--model", "nope"], "unknown model"), (["--config", str(tmp_path / "nope.yaml")], "not found"),
                          (["--config", str(tmp_path / "bad.yaml")], "cannot read training text gone.txt")]:
        result = run_cli("demo", "--out-dir", str(tmp_path / "d"), *args)
        assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
