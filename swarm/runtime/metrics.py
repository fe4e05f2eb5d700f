"""The metrics file every stage appends to (``training.metrics_path``): reading it and summing it up.

Each line is one stage's row after one step: running counters, and on first-stage replicas the loss
of their shard and the step's samples (the whole step's, over all replicas) and seconds. Lines with an
``event`` field are event rows (``swarm.events``): ``read_events`` reads those, ``read_metrics`` the rest.
"""
from __future__ import annotations

import json
from pathlib import Path

from swarm.data import bits_per_byte, perplexity
from swarm.errors import SwarmError


def _rows(path: str | Path) -> list[dict]:
    path, rows = Path(path), []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:   # a line being written right now
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_metrics(path: str | Path) -> list[dict]:
    """The step rows sessions appended (event rows left out); a line being written right now is skipped."""
    return [r for r in _rows(path) if "event" not in r]


def read_events(path: str | Path, kind: str | None = None, since: float = 0.0) -> list[dict]:
    """The event rows (of ``kind``, if given) stamped at or after ``since`` (unix seconds), in file order."""
    return [r for r in _rows(path) if "event" in r and (kind is None or r["event"] == kind) and r.get("time", 0) >= since]


def validation_row(val, text: bool) -> dict:
    """A ``Validation``'s fields of a step row: ``val_loss`` (mean over ``val_samples``), ``val_s``, and
    ``val_accuracy`` (classifiers) or, for byte-level text, ``val_perplexity`` and ``val_bits_per_byte``."""
    row = {"val_loss": val.loss, "val_samples": val.samples, "val_s": val.seconds}
    if val.accuracy is not None:
        row["val_accuracy"] = val.accuracy
    if text:
        row.update(val_perplexity=perplexity(val.loss), val_bits_per_byte=bits_per_byte(val.loss))
    return row


def validation_curve(rows: list[dict]) -> list[dict]:
    """Per evaluated step: the sample-weighted mean of the first-stage replicas' validation fields."""
    by_step: dict[int, list[dict]] = {}
    for r in rows:
        if "val_loss" in r:
            by_step.setdefault(r["step"], []).append(r)
    out = []
    for step in sorted(by_step):
        part, total = by_step[step], sum(r["val_samples"] for r in by_step[step]) or 1
        point = {"step": step, "samples": total}
        for key in ("val_loss", "val_accuracy", "val_perplexity", "val_bits_per_byte"):
            if all(key in r for r in part):
                point[key] = sum(r[key] * r["val_samples"] for r in part) / total
        if "val_loss" in point and "val_perplexity" in point:
            point["val_perplexity"] = perplexity(point["val_loss"])   # of the mean loss
        out.append(point)
    return out


def newest_by_peer(rows: list[dict]) -> dict[str, dict]:
    """Each peer's newest row: its running counters as they stand."""
    return {r["peer"]: r for r in rows}


def summarise(rows: list[dict], skip_steps: int = 0) -> dict:
    """Per-step loss (mean over first-stage replicas) and samples/s, and throughput over the steps after
    the first ``skip_steps`` (warm-up), plus each peer's newest counters summed."""
    by_step: dict[int, list[dict]] = {}
    for r in rows:
        if "loss" in r:
            by_step.setdefault(r["step"], []).append(r)
    steps = sorted(by_step)
    if not steps:
        raise SwarmError("the swarm trained no step")
    timed = steps[skip_steps:] or steps
    loss = [sum(r["loss"] for r in by_step[k]) / len(by_step[k]) for k in steps]
    rate = [by_step[k][0]["samples"] / max(r["step_s"] for r in by_step[k]) for k in steps]
    last = newest_by_peer(rows)
    # a row is written after the step's evaluation, if any (``val_s``): evaluations are not training time
    start = min(r["time"] - r["step_s"] - r.get("val_s", 0.0) for r in by_step[timed[0]])
    span = max(r["time"] for r in by_step[timed[-1]]) - start - sum(max(r.get("val_s", 0.0) for r in by_step[k]) for k in timed)
    curve = validation_curve(rows)
    samples = sum(by_step[k][0]["samples"] for k in timed)
    act_raw, act_wire = sum(r["act_raw"] for r in last.values()), sum(r["act_wire"] for r in last.values())
    return {"steps": len(steps), "loss_first": loss[0], "loss_last": loss[-1], "samples_per_s": samples / span,
            "bytes_sent": sum(r["bytes_sent"] for r in last.values()), "plan_hash": rows[-1]["plan_hash"],
            "sync_every": rows[-1].get("sync_every", 1),
            "stages": 1 + max(r["stage"] for r in rows), "samples_per_step": by_step[steps[-1]][0]["samples"],
            "timed_from_step": timed[0], "wire_ratio": act_raw / act_wire if act_wire else 1.0,   # 1.0: no pipeline link
            "elapsed_s": span, "loss": loss, "step_samples_per_s": rate, "validation": curve,
            "val_loss_first": curve[0]["val_loss"] if curve else None, "val_loss_last": curve[-1]["val_loss"] if curve else None}
