"""Issue 22, item 7: local input. Bad config files and numbers, a model factory that exits, unusable
checkpoint directories, and a node dying under the demo: each is one clear line (``error: ...``,
exit code 2) that loses nothing, or, for the demo, churn it reports and survives."""
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from swarm.config import MAX_MICRO_BATCH_SIZE, MAX_MICRO_BATCHES, NodeConfig, TrainingConfig, load
from swarm.errors import SwarmError
from swarm.refusals import CallableLogger
from swarm.runtime.metrics import read_metrics
from swarm.runtime.session import TrainingSession, _Checkpoints
from swarm.runtime.state import OpState, check_writable_dir, read_checkpoint, write_checkpoint
from tests.conftest import ROOT, run_cli
from tests.swarmproc import Proc, wait_until


# model factories the CLI imports as tests.test_local_input:<name>
def exits_zero():
    raise SystemExit(0)


def interrupts():
    raise KeyboardInterrupt


def one_line_error(res: subprocess.CompletedProcess, message: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stdout[-1000:], res.stderr[-2000:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr


def group_alive(pgid: int) -> bool:
    """Some process (a node, its p2pd daemon) is still in process group ``pgid``."""
    return subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True).returncode == 0


def run_node_cli(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """``node.py ARGS`` in a session of its own; afterwards nothing of it (p2pd included) may be left."""
    popen = subprocess.Popen([sys.executable, str(ROOT / "node.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        out, err = popen.communicate(timeout=timeout)
        wait_until(lambda: not group_alive(popen.pid), 15, what="the node and its p2pd gone")
    finally:
        try:
            os.killpg(popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        popen.wait()
    return subprocess.CompletedProcess(popen.args, popen.returncode, out, err)


def run_config(tmp_path, values: dict, *extra: str, timeout: float = 120, ready_file: Path | None = None) -> subprocess.CompletedProcess:
    """``node.py run`` with ``values`` over a loopback, CPU-only node config (a new swarm of its own)."""
    base = {"device": "cpu", "network": {"host_maddrs": ["/ip4/127.0.0.1/tcp/0"], "heartbeat_s": 1.0, "ttl_s": 5.0}}
    for key, value in values.items():
        if isinstance(value, dict):
            base[key] = {**base.get(key, {}), **value}
        else:
            base[key] = value
    path = tmp_path / "node.yaml"
    path.write_text(json.dumps(base))
    ready = ("--ready-file", str(ready_file)) if ready_file else ()
    return run_node_cli("run", "--config", str(path), "--identity", str(tmp_path / "identity"), *ready, "--initial-peers",
                        *extra, timeout=timeout)


# --- row 1: config files and numbers, model factories ---------------------------------------------

def test_a_config_file_of_binary_bytes_is_one_line(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 16)
    one_line_error(run_cli("run", "--config", str(binary), "--initial-peers"), "is binary (a NUL byte at offset 0)")
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("model: gpt2-tiny # caf\u00e9\n".encode("latin-1"))
    one_line_error(run_cli("dag", "--config", str(latin)), "is not UTF-8 text (byte 0xe9 at offset 22)")
    control = tmp_path / "control.yaml"
    control.write_bytes(b"model: \x07gpt2\n")
    one_line_error(run_cli("dag", "--config", str(control)), "invalid YAML")


@pytest.mark.parametrize("values, message", [
    ({"micro_batch_size": 1_000_000_000}, f"key 'micro_batch_size': Input should be less than or equal to {MAX_MICRO_BATCH_SIZE}"),
    ({"election": {"micro_batches": 1_000_000_000}},
     f"key 'election.micro_batches': Input should be less than or equal to {MAX_MICRO_BATCHES}"),
    ({"network": {"ttl_s": float("inf")}}, "key 'network.ttl_s': Input should be a finite number"),
    ({"training": {"lr": float("nan")}}, "key 'training.lr': Input should be a finite number"),
    ({"network": {"ttl_s": 4000}}, "key 'network.ttl_s': Input should be less than or equal to 3600"),
    ({"network": {"heartbeat_s": 10, "ttl_s": 5}}, "heartbeat_s (10) must be below ttl_s (5)"),
    ({"training": {"timeout_s": 1e300}}, "key 'training.timeout_s': Input should be less than or equal to 3600"),
])
def test_every_config_number_has_a_sane_range(tmp_path, values, message):
    res = run_config(tmp_path, values)
    one_line_error(res, message)
    assert not (tmp_path / "identity").exists()   # refused before the node did anything


def test_the_inf_and_the_bounds_come_from_yaml_too(tmp_path):
    path = tmp_path / "node.yaml"
    for text, key in [("network: {ttl_s: .inf}\n", "network.ttl_s"), ("training: {lr: .nan}\n", "training.lr"),
                      ("election: {drift_gain: .inf}\n", "election.drift_gain"),
                      ("compression: {ratio: 1.0e+9}\n", "compression.ratio")]:
        path.write_text(text)
        with pytest.raises(SwarmError, match=f"key '{key}'"):
            load(NodeConfig, path)
    path.write_text("micro_batch_size: 65536\nelection: {micro_batches: 4096}\n")   # the maxima themselves are fine
    assert load(NodeConfig, path).micro_batch_size == MAX_MICRO_BATCH_SIZE


def test_a_micro_batch_that_cannot_fit_memory_is_refused_before_it_is_traced(tmp_path):
    model = tmp_path / "long.yaml"   # ~140 MiB of activations per sample: 65536 of them need terabytes
    model.write_text("kind: gpt\nseq_len: 2048\nd_model: 128\nn_layer: 2\nn_head: 2\n")
    res = run_config(tmp_path, {"model": str(model), "micro_batch_size": MAX_MICRO_BATCH_SIZE}, timeout=240)
    one_line_error(res, "a micro-batch of 65536 samples of model 'long'")
    assert "more than the" in res.stderr and "lower micro_batch_size" in res.stderr
    huge = tmp_path / "huge.yaml"
    huge.write_text("kind: gpt\nn_layer: 1024\nd_model: 65536\n")
    one_line_error(run_cli("dag", "--model", str(huge)), "parameters) needs about")


@pytest.mark.parametrize("factory, message", [("exits_zero", "failed: SystemExit: 0"),
                                              ("interrupts", "failed: KeyboardInterrupt")])
def test_a_model_factory_that_exits_is_an_error_not_success(factory, message):
    res = run_cli("dag", "--model", f"tests.test_local_input:{factory}")
    one_line_error(res, f"model factory 'tests.test_local_input:{factory}' {message}")
    assert res.stdout == ""


# --- row 2: checkpoint directories -----------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs (root only): ``tmpfs(size, ro=False)`` -> its directory; unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = []

    def mount(size: str = "2m", ro: bool = False) -> Path:
        d = tmp_path / f"tmpfs{len(mounted)}"
        d.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}" + (",ro" if ro else ""), "tmpfs", str(d)],
                             capture_output=True, text=True)
        if res.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
        mounted.append(d)
        return d

    try:
        yield mount
    finally:
        for d in mounted:
            subprocess.run(["umount", "-l", str(d)], check=True)


def test_a_checkpoint_dir_that_is_a_file_stops_the_node_at_start(tmp_path):
    (tmp_path / "ckpt").write_text("not a directory")
    one_line_error(run_config(tmp_path, {"training": {"checkpoint_dir": str(tmp_path / "ckpt")}}),
                   f"training.checkpoint_dir {tmp_path / 'ckpt'} is not a directory")
    one_line_error(run_config(tmp_path, {"training": {"save_dir": str(tmp_path / "ckpt" / "sub")}}),
                   "training.save_dir")
    assert (tmp_path / "ckpt").read_text() == "not a directory" and not (tmp_path / "identity").exists()


def test_a_read_only_checkpoint_dir_stops_the_node_at_start(tmp_path, tmpfs):
    ro = tmpfs("1m", ro=True)   # root ignores permission bits; a read-only mount stops it
    one_line_error(run_config(tmp_path, {"training": {"checkpoint_dir": str(ro)}}),
                   f"training.checkpoint_dir {ro} is not writable: Read-only file system")
    one_line_error(run_config(tmp_path, {"training": {"checkpoint_dir": str(ro / "new")}}),
                   f"training.checkpoint_dir {ro / 'new'} cannot be created: Read-only file system")


def test_a_full_disk_leaves_no_temporary_or_partial_files(tmpfs):
    disk = tmpfs("3m")
    mib = lambda v: {"p:w": torch.full((256 * 1024,), float(v))}  # noqa: E731  (1 MiB of float32)
    write_checkpoint(disk, {"a": OpState(4, mib(4))}, stage=0, step=4)
    with pytest.raises(SwarmError) as err:   # under 2 MiB free, 3 MiB to write
        write_checkpoint(disk, {op: OpState(8, mib(8)) for op in "abc"}, stage=0, step=8)
    assert "cannot write checkpoint" in str(err.value) and "No space left on device" in str(err.value)
    assert "\n" not in str(err.value)
    assert sorted(str(p.relative_to(disk)) for p in disk.rglob("*")) == ["step-000000004", "step-000000004/a.pt",
                                                                          "step-000000004/done-0"]
    assert read_checkpoint(disk, ["a"])["a"].step == 4   # the older checkpoint is intact
    write_checkpoint(disk, {"a": OpState(8, mib(8))}, stage=0, step=8)   # the space came back: the next one fits
    assert read_checkpoint(disk, ["a"])["a"].step == 8
    with open(disk / "filler", "wb") as f:   # fill the disk: a node must not start on it
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    with pytest.raises(SwarmError, match="is not writable: No space left on device"):
        check_writable_dir(disk)
    assert not [p for p in disk.rglob("*.tmp")]


def test_a_failing_checkpoint_is_warned_once_not_at_every_checkpoint(tmp_path):
    class Loop:   # runs the write at once, as the executor would
        def run_in_executor(self, executor, fn, *args):
            future = concurrent.futures.Future()
            try:
                future.set_result(fn(*args))
            except Exception as e:
                future.set_exception(e)
            return future

    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the directory should be")
    lines: list[str] = []
    training = TrainingConfig(checkpoint_dir=str(blocker / "ckpt"), checkpoint_every_steps=1)
    session = SimpleNamespace(index=1, me="me", cfg=SimpleNamespace(training=training),
                              server=SimpleNamespace(peers=SimpleNamespace(replicas=("me",))),
                              loop=SimpleNamespace(loop=Loop()), worker=SimpleNamespace(step_id=0),
                              final_state=lambda: {}, checkpoints=_Checkpoints(CallableLogger(lines.append), ("gpt2-tiny", "coarse")),
                              _record=lambda *a, **k: None)
    for step in range(4):
        session.worker.step_id = step + 1
        TrainingSession._stepped(session, step)
    warnings = [line for line in lines if "checkpoint not written" in line]
    assert len(warnings) == 1 and "\n" not in warnings[0] and "not repeated" in warnings[0], lines
    blocker.unlink()
    blocker.mkdir()
    session.worker.step_id = 5
    TrainingSession._stepped(session, 4)
    assert lines[-1] == "checkpoint of step 5 written again" and (blocker / "ckpt" / "step-000000005").is_dir()


def test_unusable_checkpoints_are_never_a_silent_step_0(tmp_path):
    t = lambda v: {"p:w": torch.full((2,), float(v))}  # noqa: E731
    write_checkpoint(tmp_path, {"a": OpState(10, t(10)), "b": OpState(10, t(10))}, stage=0, step=10)
    write_checkpoint(tmp_path, {"a": OpState(20, t(20)), "b": OpState(20, t(20))}, stage=0, step=20)
    (tmp_path / "step-000000020" / "b.pt").write_bytes(b"truncated")   # a disk that filled while it was written
    logged: list[str] = []
    got = read_checkpoint(tmp_path, ["a", "b"], log=logged.append)
    assert {op: s.step for op, s in got.items()} == {"a": 10, "b": 10}
    assert len(logged) == 1 and "resuming from step-000000010" in logged[0] and "cannot read b.pt" in logged[0]
    (tmp_path / "step-000000010" / "b.pt").unlink()
    with pytest.raises(SwarmError, match="has 2 step directories but none is usable .*refusing to start at step 0"):
        read_checkpoint(tmp_path, ["a", "b"])
    assert sorted(p.name for p in tmp_path.glob("step-*/*")) == ["a.pt", "a.pt", "b.pt", "done-0", "done-0"]   # nothing lost


def test_a_node_restarted_on_unusable_checkpoints_stops_in_one_line(tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "step-000000050").mkdir(parents=True)
    (ckpt / "step-000000050" / "done-0").touch()   # a step whose op files never made it
    ready = tmp_path / "ready.json"
    res = run_config(tmp_path, {"training": {"checkpoint_dir": str(ckpt)}}, timeout=240, ready_file=ready)   # its p2pd is gone too
    one_line_error(res, f"checkpoint directory {ckpt} has 1 step directories but none is usable (step-000000050 lacks")
    assert (ckpt / "step-000000050" / "done-0").exists() and json.loads(ready.read_text())["maddrs"]   # it had started


# --- row 3: a node dies under the demo -------------------------------------------------------------

def demo_nodes(demo_pid: int, out: Path) -> dict[int, int]:
    """{member index: pid} of the demo's node processes: its children, by their --identity argument
    (not their DHT processes, forked with the same command line)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        for i in range(8):
            if ppid == demo_pid and str(out / "keys" / "members" / str(i) / "identity").encode() in args:
                found[i] = int(proc.name)
    return found


@pytest.mark.scenario   # a whole demo with a SIGKILL: run by `python -m benchmarks.hostile`, not by the default suite
def test_the_demo_reports_a_dead_node_and_trains_on(tmp_path):
    out, steps = tmp_path / "demo", 10
    demo = Proc(str(ROOT / "node.py"), "demo", "--nodes", "3", "--steps", str(steps), "--micro-batches", "2",
                "--micro-batch-size", "2", "--out-dir", str(out), "--json-out", str(tmp_path / "m.json"))
    pids: dict[int, int] = {}
    try:
        def trained(n: int) -> bool:
            rows = read_metrics(out / "metrics.jsonl")
            assert demo.popen.poll() is None, "".join(demo.lines)[-2000:]
            return len({r["step"] for r in rows if "loss" in r}) >= n
        wait_until(lambda: trained(2), 300, what="two steps trained")
        pids = demo_nodes(demo.popen.pid, out)
        assert sorted(pids) == [0, 1, 2]
        holders = [i for i in (1, 2) if "training: stage" in (out / f"node{i}.log").read_text()]
        victim = (holders or [2])[-1]   # a stage holder if one is (node 0 is the bootstrap peer)
        os.kill(pids[victim], signal.SIGKILL)
        assert demo.popen.wait(timeout=400) == 0, "".join(demo.lines)[-3000:]
        # the demo stopped its nodes, the dead one's orphaned p2pd too (each node is a process group of its own)
        wait_until(lambda: not any(group_alive(pid) for pid in [demo.popen.pid, *pids.values()]), 30,
                   what="every node and p2pd of the demo gone")
    finally:
        for pid in [*pids.values()]:   # the nodes live in sessions of their own
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        demo.cleanup()
    text = "".join(demo.lines)
    logs = "\n".join(f"--- node{i}: " + "".join(line for line in (out / f"node{i}.log").read_text().splitlines(True)
                                               if not line.startswith("link"))[-1500:] for i in range(3))
    assert f"node {victim} died (exit code -9) after" in text and "the swarm re-plans without it" in text, \
        f"victim {victim}, holders {holders}\n{text[-3000:]}\n{logs}"
    assert f"1 of 3 nodes died on the way (node {victim} after" in text
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["steps"] == steps and [d["node"] for d in metrics["nodes_died"]] == [victim]
    assert metrics["nodes_died"][0]["exit_code"] == -9 and metrics["nodes_died"][0]["at_step"] >= 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    plans_by_step: dict[int, set] = {}
    for r in rows:
        if "loss" in r:
            plans_by_step.setdefault(r["step"], set()).add(r["plan_hash"])
    assert sorted(plans_by_step) == list(range(steps))
    # a step trained under two plans was lost with the dead node and trained again: never more than K
    # (backup_every_steps) of them, the churn bound (docs/churn.md), and never under three plans
    k = NodeConfig.model_validate(json.loads((out / "node.yaml").read_text())).training.backup_every_steps
    again = [s for s, p in plans_by_step.items() if len(p) > 1]
    assert len(again) <= k and all(len(p) <= 2 for p in plans_by_step.values()), plans_by_step
