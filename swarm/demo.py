"""The main job: a private swarm of N node processes on loopback elects a plan and trains on real text
(Shakespeare's works, fetched at set-up) or a config's data; progress, a metrics JSON with the
validation loss, a loss/throughput plot and an exported model come out, and nothing is left running.

Every node is a real ``node.py run`` (its own DHT, p2p daemon, election, stage server); the demo
only creates the swarm's keys and config, starts the nodes (the first one's address comes from its
ready file, ``node.py run --ready-file``), follows the metrics rows they append to one JSON-lines
file, and waits for them to leave once they reached ``max_steps`` (they save their stages to
``<out_dir>/model``, which is then exported to ``<out_dir>/model.safetensors``). Their logs are for the
user to read; nothing here parses them. The nodes'
config is the demo's defaults, overridden by a node config file (``--config``), overridden by the
demo's flags that were given.

A node that dies once training has begun is churn, which the demo is meant to show: it is reported
(a line, and ``nodes_died`` in the metrics JSON) and the swarm re-plans without it. The demo fails
only when no node is left, when one dies before the first step (the first plan waits for every
node), or when no step completes within ``stall_s``.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from swarm.config import NodeConfig, read_yaml, validate
from swarm.errors import SwarmError
from swarm.procs import poll_until, read_ready, stop_groups
from swarm.runtime.metrics import newest_by_peer, read_metrics
from swarm.runtime.metrics import summarise as summarise_metrics

ROOT = Path(__file__).resolve().parent.parent
TEXT = "shakespeare"    # the demo's data for token models, unless the config names some
LEAVE_S = 120.0         # how long the nodes may take to save and leave after the last step
logger = logging.getLogger(__name__)


@dataclass
class DemoSettings:
    """What the demo runs; None: the ``config`` file's value, else the demo's default (in brackets)."""

    nodes: int = 4
    steps: int = 100
    model: str | None = None             # [gpt2-tiny]
    input_shape: list[int] | None = None  # a factory model's per-sample input shape (no example_inputs)
    stages: int | None = None            # [0: elected freely]
    compression: str | None = None       # auto | off | a fixed wire ratio [auto]
    micro_batches: int | None = None     # [8]
    micro_batch_size: int | None = None  # [4]
    warmup_steps: int | None = None      # uncompressed steps first [5]
    out_dir: str = "demo-out"
    json_out: str | None = None      # default: <out_dir>/metrics.json
    plot: str | None = None          # default: <out_dir>/demo.png
    device: str | None = None            # [cpu]
    config: str | None = None            # node config YAML the nodes start from
    timeout_s: float = 1800.0
    stall_s: float = 300.0               # once training began: fail when no step completes for this long


def node_env() -> dict[str, str]:
    """The environment of the demo's nodes: this checkout first on the import path, then the directory
    the demo started in and the user's own ``PYTHONPATH``, so a user's model module resolves in every node."""
    paths = [str(ROOT), os.getcwd(), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


class _Node:
    def __init__(self, index: int, config: Path, member, log: Path, initial_peer: str | None):
        self.log, self.ready_file = log, log.with_suffix(".ready.json")
        self.ready_file.unlink(missing_ok=True)
        peers = [initial_peer] if initial_peer else []
        self.popen = subprocess.Popen(
            [sys.executable, str(ROOT / "node.py"), "run", "--config", str(config), "--identity", member.identity_path,
             "--credentials", member.credential_path, "--ready-file", str(self.ready_file), "--initial-peers", *peers],
            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
            env=node_env())

    def last_line(self) -> str:
        """The node's last log line: shown to the user when the node died, never parsed."""
        return (self.log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"])[0]

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise SwarmError(f"node {self.log.stem} exited with code {self.popen.returncode}: {self.last_line()}")

    def address(self, timeout_s: float) -> str:
        """The loopback multiaddr other nodes dial (from the node's ready file)."""
        try:
            info = read_ready(self.ready_file, timeout_s, check=self.check_alive,
                              what=f"node {self.log.stem} to listen")
        except TimeoutError as e:
            raise SwarmError(str(e)) from None
        return next((a for a in info["maddrs"] if a.startswith("/ip4/127.0.0.1/")), info["maddrs"][0])


def _compression(text: str) -> dict:
    """The ``--compression`` flag as config values."""
    if text in ("auto", "off"):
        return {"mode": text}
    try:
        ratio = float(text)
    except ValueError:
        raise SwarmError(f"--compression must be auto, off or a ratio >= 1, not '{text}'") from None
    if ratio < 1:
        raise SwarmError(f"--compression ratio must be >= 1, not {ratio:g}")
    return {"mode": "fixed", "ratio": ratio}


def _merge(base: dict, over: dict) -> dict:
    """``base`` with ``over``'s values (nested mappings merged key by key; None: keep ``base``'s)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        elif value is not None:
            out[key] = value
    return out


def _config(s: DemoSettings, metrics: Path, saved: Path) -> dict:
    """The nodes' config: the demo's defaults, then the ``config`` file, then the flags given, then what
    the demo itself needs (loopback, ``nodes`` members, ``steps`` steps, its metrics file)."""
    threads = max(1, (os.cpu_count() or 1) // s.nodes)
    defaults = {"model": "gpt2-tiny", "device": "cpu", "micro_batch_size": 4,
                "network": {"heartbeat_s": 1.0, "ttl_s": 8.0, "startup_timeout_s": 60, "probe_interval_s": 15.0},
                "election": {"join_batch_s": 2, "stages": 0, "micro_batches": 8, "min_epoch_s": 3600,
                             "drift_check_s": 3600},
                "training": {"threads": threads},
                "compression": {"mode": "auto", "warmup_steps": 5}}
    flags = {"model": s.model, "device": s.device, "micro_batch_size": s.micro_batch_size, "input_shape": s.input_shape,
             "election": {"stages": s.stages, "micro_batches": s.micro_batches},
             "compression": {**(_compression(s.compression) if s.compression is not None else {}),
                             "warmup_steps": s.warmup_steps}}
    needs = {"network": {"host_maddrs": ["/ip4/127.0.0.1/tcp/0"]}, "election": {"min_members": s.nodes},
             "training": {"max_steps": s.steps, "metrics_path": str(metrics), "save_dir": str(saved)}}
    return _merge(_merge(_merge(defaults, read_yaml(s.config) if s.config else {}), flags), needs)


def summarise(rows: list[dict], s: DemoSettings, model: str, died: list[dict] | None = None) -> dict:
    """The metrics JSON: per-step losses (mean over first-stage replicas) and throughput, totals, and
    the nodes that died on the way (``node``, ``exit_code``, ``at_step``: steps done when it was seen)."""
    return {**summarise_metrics(rows), "nodes": s.nodes, "model": model, "nodes_died": list(died or [])}


def _deaths(nodes: list[_Node], died: list[dict], done: int, s: DemoSettings) -> None:
    """Report nodes that exited since the last look; raise when the swarm cannot go on without them."""
    for i, n in enumerate(nodes):
        if n.popen.poll() is None or any(d["node"] == i for d in died):
            continue
        if done == 0:   # the first plan waits for min_members = every node
            raise SwarmError(f"node {i} exited with code {n.popen.returncode} before the first step "
                             f"(the first plan needs all {s.nodes} nodes): {n.last_line()}")
        died.append({"node": i, "exit_code": n.popen.returncode, "at_step": done})
        alive = sum(m.popen.poll() is None for m in nodes)
        logger.info(f"node {i} died (exit code {n.popen.returncode}) after {done} steps: {n.last_line()[:160]}; "
                    f"{alive} nodes left, the swarm re-plans without it")
        if alive == 0:
            raise SwarmError(f"every node died; the swarm trained {done} of {s.steps} steps")


def _follow(nodes: list[_Node], died: list[dict], metrics: Path, s: DemoSettings, bar, deadline: float) -> None:
    """Follow the metrics rows the nodes append until ``s.steps`` steps are done (the bar shows them);
    report nodes that died; raise when no step completes for ``s.stall_s`` or the deadline passes."""
    progress = {"done": 0, "at": time.monotonic()}

    def trained() -> bool:
        rows = [r for r in read_metrics(metrics) if "loss" in r]
        done = len({r["step"] for r in rows})
        if done > bar.n:
            r = rows[-1]
            sent = sum(x["bytes_sent"] for x in newest_by_peer(read_metrics(metrics)).values())
            bar.set_postfix(loss=f"{r['loss']:.3f}", samples_s=f"{r['samples_per_s']:.1f}", sent=f"{sent / 1e6:.0f}MB")
            bar.update(done - bar.n)
            progress["at"] = time.monotonic()
        progress["done"] = done
        return done >= s.steps

    def check() -> None:
        done = progress["done"]
        _deaths(nodes, died, done, s)
        if done and time.monotonic() - progress["at"] > s.stall_s:
            after = f" (since node {died[-1]['node']} died)" if died else ""
            raise SwarmError(f"no step completed for {s.stall_s:.0f} s after step {done - 1}{after}")

    try:
        poll_until(trained, deadline - time.monotonic(), f"{s.steps} steps", interval_s=0.5, check=check)
    except TimeoutError:
        raise SwarmError(f"the demo did not finish {s.steps} steps within {s.timeout_s:.0f} s") from None
    _deaths(nodes, died, progress["done"], s)   # one that died during the last steps is reported too


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = range(len(summary["loss"]))
    a.plot(steps, summary["loss"], label="training (its micro-batches)")
    curve = summary.get("validation") or []
    if curve:
        a.plot([p["step"] for p in curve], [p["val_loss"] for p in curve], "o-", label="validation (held-out)")
    a.legend()
    a.set(xlabel="step", ylabel="loss", title=f"{summary['model']}: {summary['nodes']} nodes, "
          f"{summary['stages']} stages")
    b.plot(steps, summary["step_samples_per_s"])
    b.set(xlabel="step", ylabel="samples/s", title=f"wire ratio {summary['wire_ratio']:.1f}x, "
          f"{summary['bytes_sent'] / 1e6:.0f} MB sent")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_demo(s: DemoSettings) -> dict:
    """Start the swarm, train ``s.steps`` steps, stop everything; returns the metrics written. Progress
    is a bar on stderr; lines go to this module's logger (above the bar)."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from swarm.data import training_data
    from swarm.estimator.profile import load_or_measure
    from swarm.models import trace_model
    from swarm.net.private import init_swarm
    from swarm.runtime.session import model_io

    if s.nodes < 1 or s.steps < 1:
        raise SwarmError("--nodes and --steps must be at least 1")
    out = Path(s.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics, saved = out / "metrics.jsonl", out / "model"
    metrics.unlink(missing_ok=True)
    for old in saved.glob("stage*.pt") if saved.is_dir() else ():   # an earlier run's stages (other peers)
        old.unlink()
    values = _config(s, metrics, saved)
    cfg = validate(NodeConfig, values, s.config or "demo settings")   # a bad value fails here, in one line
    from swarm.cli import check_local_dirs
    check_local_dirs(cfg)                                                # and so does a directory nodes cannot write
    traced = trace_model(cfg.model, cfg.granularity, cfg.micro_batch_size,   # a bad model name fails here, in one line,
                         cfg.election.micro_batches, data=cfg.training.data,   # and so does a step too big for memory
                         input_shape=cfg.input_shape)
    if model_io(traced)[1] == "int64" and "data" not in (read_yaml(s.config) if s.config else {}).get("training", {}):
        values["training"]["data"] = TEXT   # a language model learns real text
        cfg = validate(NodeConfig, values, s.config or "demo settings")
    training_data(cfg.training.data, *model_io(traced), loss=cfg.training.loss)   # and so does a bad data source (or a corpus not fetched)
    config = out / "node.yaml"
    config.write_text(json.dumps(values, indent=1))
    load_or_measure(cfg.device)                             # profile once; the nodes read the cache
    keys = out / "keys"
    if keys.exists():
        for f in sorted(keys.rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
    members = init_swarm(str(keys), "demo", s.nodes).members
    nodes: list[_Node] = []
    died: list[dict] = []
    deadline = time.monotonic() + s.timeout_s
    try:
        nodes.append(_Node(0, config, members[0], out / "node0.log", None))
        maddr = nodes[0].address(90)
        for i in range(1, s.nodes):
            nodes.append(_Node(i, config, members[i], out / f"node{i}.log", maddr))
        logger.info(f"{s.nodes} nodes started (private swarm, logs in {out}/); electing a plan ...")
        with tqdm(total=s.steps, unit="step", dynamic_ncols=True) as bar, \
                logging_redirect_tqdm([logging.getLogger("swarm")]):   # lines above the progress bar
            _follow(nodes, died, metrics, s, bar, deadline)
        try:   # at max_steps every node saves its stage and leaves by itself
            poll_until(lambda: all(n.popen.poll() is not None for n in nodes), LEAVE_S, "the nodes to save and leave")
        except TimeoutError:
            logger.warning(f"not every node left within {LEAVE_S:.0f} s of the last step: stopping them")
        summary = summarise(read_metrics(metrics), s, cfg.model, died)
    finally:
        stop_groups([n.popen for n in nodes], grace_s=20)   # each node leaves; what is left after 20 s is killed
    summary["exit_codes"] = [n.popen.returncode for n in nodes]
    summary["model_file"] = _export(saved, out / "model.safetensors")
    json_out = Path(s.json_out or out / "metrics.json")
    json_out.write_text(json.dumps(summary, indent=1))
    png = Path(s.plot or out / "demo.png")
    plot(summary, png)
    val = (f", validation loss {summary['val_loss_first']:.3f} -> {summary['val_loss_last']:.3f}"
           if summary["val_loss_first"] is not None else "")
    logger.info(f"trained {summary['steps']} steps on {s.nodes} nodes ({summary['stages']} stages, "
                f"plan {summary['plan_hash']}): loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f}{val}, "
                f"{summary['samples_per_s']:.1f} samples/s, "
                f"{summary['bytes_sent'] / 1e6:.1f} MB sent (wire ratio {summary['wire_ratio']:.1f}x)")
    if died:
        logger.info(f"{len(died)} of {s.nodes} nodes died on the way (" + ", ".join(
            f"node {d['node']} after {d['at_step']} steps" for d in died) + "); the swarm trained on without them")
    logger.info(f"metrics: {json_out}  plot: {png}")
    if summary["model_file"]:
        logger.info(f"model: {summary['model_file']}  (try: node.py generate --model {summary['model_file']} --prompt 'ROMEO:')")
    return summary


def _export(saved: Path, out_file: Path) -> str | None:
    """The nodes' saved stages as one model file (its path), or None with a warning saying why not."""
    from swarm.export import export

    try:
        return str(export(saved, out_file).path)
    except SwarmError as e:
        logger.warning(f"no model exported: {e}")
        return None

