"""Training state keyed by OP-DAG op: what a node can hand over, back up and checkpoint.

An op's state is its parameters (``p:<name>``), its buffers (``b:<name>``, e.g. BatchNorm statistics)
and the optimizer's per-parameter state (``o:<key>:<name>``: Adam's moments and step count), all
tagged with the optimizer step they belong to; a stage stopped with the whole gradient of a step it
had not applied adds it (``g:<name>``), so the next holder can complete that step (docs/churn.md).
A replica that syncs rarely (``swarm.runtime.outer``) adds its *anchor* (the parameters at the last
sync, ``a:<name>``) and the outer optimizer's momentum (``m:<name>``): it resumes from its own
parameters, while a peer that takes the state over from it starts from the anchor (the inner steps
since the last sync stay the replica's own: ``runtime.outer.resume_outer``).
Because state is keyed by op and not by stage, a new plan that moves ops between peers moves exactly
those tensors, whoever held them before.

Checkpoints: ``<dir>/step-<step>/<op>.pt`` (``torch.save`` of nothing but tensors: the op's, and its
step as the 0-d tensor ``step``; written to a temporary name, then renamed), one directory per
checkpointed step; a stage's ``done-<k>`` marker closes its part of a step. A swarm restarted from the
directory resumes at the newest step that every op has. A write that fails (a full disk) leaves no
temporary or partial file behind; a directory whose step directories are all unusable (incomplete or
unreadable) is an error, never a silent start at step 0 (docs/churn.md).
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from swarm.dag.graph import OpDAG
from swarm.errors import SwarmError


@dataclass
class OpState:
    step: int
    tensors: dict[str, torch.Tensor]


def op_tensors(dag: OpDAG, module: torch.nn.Module) -> dict[str, list[tuple[str, str]]]:
    """For every op owning state: its (kind, qualified name) pairs, kind ``p`` (parameter) or ``b`` (buffer)."""
    buffers = dict(module.named_buffers())
    out = {}
    for op in dag.ops:
        names = [("p", n) for n in op.params]
        if op.op == "call_module":
            names += [("b", n) for n in buffers if n.startswith(op.target + ".")]
        elif op.op == "get_attr" and op.target in buffers:
            names.append(("b", op.target))
        if names:
            out[op.name] = names
    return out


def capture(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None, owned: dict[str, list[tuple[str, str]]],
            ops: list[str], step: int, grads: bool = False,
            outer: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, OpState]:
    """Copies (on the CPU) of the state of ``ops`` in ``module`` and ``optimizer`` at ``step`` (and the
    parameters' accumulated gradients, given ``grads``). ``outer``: parameter name -> (anchor, outer
    momentum) of a replica that syncs rarely: both go with the parameters, and no gradient goes."""
    params, buffers = dict(module.named_parameters()), dict(module.named_buffers())
    out = {}
    for op in ops:
        tensors = {}
        for kind, name in owned.get(op, []):
            if kind == "b":
                tensors[f"b:{name}"] = buffers[name].detach().cpu().clone()
                continue
            p = params[name]
            tensors[f"p:{name}"] = p.detach().cpu().clone()
            if outer and name in outer:
                tensors[f"a:{name}"], tensors[f"m:{name}"] = (t.to(p.dtype) for t in outer[name])
            elif grads and p.grad is not None:
                tensors[f"g:{name}"] = p.grad.detach().cpu().clone()
            for key, value in (optimizer.state.get(p, {}) if optimizer is not None else {}).items():
                if torch.is_tensor(value):
                    tensors[f"o:{key}:{name}"] = value.detach().cpu().clone()
        out[op] = OpState(step, tensors)
    return out


def _targets(module: torch.nn.Module, states: dict[str, OpState], owned: dict[str, list[tuple[str, str]]] | None = None):
    """(kind, optimizer slot, target tensor, value) for every tensor of ``states``, each checked to be
    ``module``'s (and, given ``owned``, its op's) with the right shape: else a one-line error."""
    params, buffers = dict(module.named_parameters()), dict(module.named_buffers())
    out = []
    for op, state in states.items():
        mine = None if owned is None else {name for _, name in owned.get(op, [])}
        for key, t in state.tensors.items():
            kind, _, rest = key.partition(":")
            slot, name = rest.partition(":")[::2] if kind == "o" else ("", rest)
            target = (buffers if kind == "b" else params).get(name) if kind in ("p", "b", "o", "g", "a", "m") else None
            if target is None or (mine is not None and name not in mine):
                raise SwarmError(f"state of op '{op}': '{key}' does not belong to this {'stage' if mine is None else 'op'}")
            if (kind != "o" or t.dim()) and t.shape != target.shape:
                raise SwarmError(f"state of op '{op}': '{key}' has shape {list(t.shape)}, expected {list(target.shape)}")
            out.append((kind, slot, target, t))
    return out


def check(module: torch.nn.Module, owned: dict[str, list[tuple[str, str]]], states: dict[str, OpState]) -> None:
    """Refuse (one line) states whose tensors are not their ops' in ``module``."""
    _targets(module, states, owned)


def restore(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None, states: dict[str, OpState]) -> None:
    """Load op states into ``module`` (and ``optimizer``'s per-parameter state). Every name and shape
    is checked first: a state that does not fit is a one-line error and nothing is loaded."""
    plan = _targets(module, states)
    with torch.no_grad():
        for kind, slot, target, t in plan:
            if kind == "g":
                target.grad = t.to(target.device, target.dtype).clone()
            elif kind in ("a", "m"):
                continue   # the outer state: ``runtime.outer.resume_outer``
            elif kind != "o":
                target.copy_(t)
            elif optimizer is not None:
                optimizer.state[target][slot] = t.to(target.device) if t.dim() else t.clone()


def _file_name(op: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", op) + ".pt"


def _reason(e: BaseException) -> str:
    """Why a file operation failed, in one line."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return " ".join(str(e).split())[:200] or type(e).__name__


def check_writable_dir(directory: str | Path, what: str = "training.checkpoint_dir") -> Path:
    """At start: ``directory`` is (or can be made) a directory this process can write, checked by
    really creating and removing a file in it (permission bits do not stop root; a read-only mount,
    or a full disk, does). Anything else is a one-line error naming ``what``."""
    root = Path(directory).expanduser()
    if root.exists() and not root.is_dir():
        raise SwarmError(f"{what} {root} is not a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SwarmError(f"{what} {root} cannot be created: {_reason(e)}") from None
    probe = root / f".write-probe-{os.getpid()}.tmp"
    try:
        with probe.open("wb") as f:
            f.write(b"swarm")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise SwarmError(f"{what} {root} is not writable: {_reason(e)}") from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
    return root


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every ``step-<step>`` directory, oldest first (by number, not by name)."""
    out = []
    for d in root.glob("step-*"):
        if d.name[5:].isdigit() and d.is_dir():
            out.append((int(d.name[5:]), d))
    return sorted(out)


def write_checkpoint(directory: str | Path, states: dict[str, OpState], stage: int, step: int, keep: int = 2) -> Path:
    """Write ``states`` (all at ``step``; a stage without state writes none) under ``directory/step-<step>/``,
    then this stage's marker; older step directories beyond the newest ``keep`` are removed."""
    root = Path(directory)
    if others := sorted({s.step for s in states.values()} - {step}):
        raise SwarmError(f"a checkpoint of step {step} holds states of steps {others}")
    step_dir = root / f"step-{step:09d}"
    made_dir = not step_dir.exists()
    written: list[Path] = []
    tmp: Path | None = None
    try:
        step_dir.mkdir(parents=True, exist_ok=True)
        for op, state in states.items():
            tmp = step_dir / f".{_file_name(op)}.tmp"
            torch.save({**state.tensors, "step": torch.tensor(state.step)}, tmp)   # tensors only
            os.replace(tmp, step_dir / _file_name(op))
            written.append(step_dir / _file_name(op))
            tmp = None
        marker = step_dir / f"done-{stage}"
        marker.touch()
        written.append(marker)
    except Exception as e:   # a full disk, a read-only or vanished directory: leave nothing half-written
        reason = _reason(e)
        if not isinstance(e, OSError):   # torch.save hides ENOSPC behind "[enforce fail ...] unexpected pos"
            need = sum(t.numel() * t.element_size() for st in states.values() for t in st.tensors.values())
            try:
                free = shutil.disk_usage(step_dir if step_dir.exists() else root).free
            except OSError:
                free = need
            if free < need:
                reason = f"No space left on device ({free >> 10} KiB free, {need >> 10} KiB to write)"
        for f in ([tmp] if tmp is not None else []) + written:   # this stage's part of the step is useless partial
            try:
                f.unlink(missing_ok=True)
            except OSError:
                pass
        if made_dir:
            try:
                step_dir.rmdir()   # only if empty: another stage's part of the step stays
            except OSError:
                pass
        raise SwarmError(f"cannot write checkpoint {step_dir}: {reason}") from None
    # keep this step and the newest keep - 1 below it; a newer directory (left by an earlier run) is not ours to drop
    older = [d for s, d in _step_dirs(root) if s < step]
    for old in older[:max(len(older) - (keep - 1), 0)]:
        try:
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
        except OSError as e:
            raise SwarmError(f"checkpoint {step_dir} written, but the old {old} cannot be removed: {_reason(e)}") from None
    return step_dir


def _load(f: Path) -> OpState:
    data = torch.load(f, weights_only=True)
    if not isinstance(data, dict):
        raise ValueError(f"holds a {type(data).__name__}, not a mapping of tensors")
    if "tensors" in data:   # the first format: {"op", "step", "tensors"}
        data = {**data["tensors"], "step": data["step"]}
    step = data.pop("step")
    if not all(torch.is_tensor(t) for t in data.values()):
        raise ValueError("holds something other than tensors")
    return OpState(int(step), data)


def read_checkpoint(directory: str | Path, ops: list[str], log=None) -> dict[str, OpState]:
    """The state of ``ops`` at the newest checkpointed step that has all of them, readable ({} when the
    directory holds no step directory). Newer steps passed over are named in one warning (``log``);
    step directories none of which is usable are a one-line error: a restart must not silently begin
    at step 0 beside checkpoints it could not use."""
    root = Path(directory)
    unusable: list[str] = []
    dirs = _step_dirs(root) if root.is_dir() else []
    for _, step_dir in reversed(dirs):
        files = [step_dir / _file_name(op) for op in ops]
        missing = [f for f in files if not f.exists()]
        if missing:
            unusable.append(f"{step_dir.name} lacks {len(missing)} of {len(files)} ops ({missing[0].stem}...)")
            continue
        out, bad = {}, None
        for op, f in zip(ops, files):
            try:
                out[op] = _load(f)
            except Exception as e:   # truncated, corrupt, or not ours
                bad = f"{step_dir.name}: cannot read {f.name} ({_reason(e)})"
                break
        if bad is not None:
            unusable.append(bad)
            continue
        if unusable and log is not None:
            log(f"warning: checkpoint: resuming from {step_dir.name}; newer steps unusable: {'; '.join(unusable)}")
        return out
    if dirs:
        raise SwarmError(f"checkpoint directory {root} has {len(dirs)} step directories but none is usable "
                         f"({unusable[0]}{'; ...' if len(unusable) > 1 else ''}): refusing to start at step 0 beside "
                         "them (a directory of another model, or not shared by every node?); move them away to start afresh")
    return {}
