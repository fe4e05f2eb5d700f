"""The OP-DAG as plain data: operators in topological order, what crosses each cut, partitions.

No torch here: the scheduler and the estimator work on this representation alone.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from swarm.errors import SwarmError

# Ops whose value never crosses a stage boundary: parameters are re-read where they are used.
_LOCAL_OPS = {"get_attr", "output"}


@dataclass
class Op:
    """One operator of the model. Costs are per traced batch (``OpDAG.batch_size`` samples)."""

    name: str
    kind: str                      # readable operator kind: "Linear", "add", "view", "input", ...
    op: str                        # torch.fx opcode: placeholder, call_module, call_function, ...
    target: str                    # module path, function or method name
    inputs: list[str] = field(default_factory=list)
    out_shapes: list[list[int]] = field(default_factory=list)   # one per output tensor
    out_dtypes: list[str] = field(default_factory=list)
    out_bytes: int = 0
    params: list[str] = field(default_factory=list)             # parameters this op owns
    n_params: int = 0
    param_bytes: int = 0
    buffer_bytes: int = 0
    act_bytes: int = 0             # activations saved for backward (not parameters)
    flops_fwd: int = 0
    flops_bwd: int = 0
    mem_bytes_fwd: int = 0         # bytes read+written by memory-bound kernels
    mem_bytes_bwd: int = 0
    kernels_fwd: int = 0           # aten kernels launched
    kernels_bwd: int = 0
    flops_by_size: dict[int, int] = field(default_factory=dict)  # log2(matmul size) -> fwd+bwd FLOPs

    @property
    def flops(self) -> int:
        """FLOPs of one training pass (forward + backward)."""
        return self.flops_fwd + self.flops_bwd

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["flops"] = self.flops
        d["flops_by_size"] = {str(k): v for k, v in self.flops_by_size.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Op:
        known = {f.name for f in fields(cls)}
        op = cls(**{k: v for k, v in d.items() if k in known})  # unknown fields: newer writers
        op.flops_by_size = {int(k): int(v) for k, v in op.flops_by_size.items()}
        return op


@dataclass
class Partition:
    """Contiguous stages over the topological order: stage s holds ops ``[starts[s], starts[s+1])``."""

    starts: tuple[int, ...]
    n_ops: int

    @classmethod
    def from_sizes(cls, sizes: Sequence[int]) -> Partition:
        if not sizes or any(s <= 0 for s in sizes):
            raise SwarmError(f"stage sizes must be positive, got {list(sizes)}")
        starts = [0]
        for s in sizes[:-1]:
            starts.append(starts[-1] + s)
        return cls(tuple(starts), sum(sizes))

    @classmethod
    def even(cls, n_ops: int, n_stages: int) -> Partition:
        """Equal op counts per stage (the naive baseline)."""
        if not 1 <= n_stages <= n_ops:
            raise SwarmError(f"cannot cut {n_ops} ops into {n_stages} stages")
        return cls(tuple(n_ops * s // n_stages for s in range(n_stages)), n_ops)

    def __post_init__(self) -> None:
        starts = tuple(self.starts)
        if not starts or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= self.n_ops:
            raise SwarmError(f"invalid partition starts {list(starts)} for {self.n_ops} ops")
        self.starts = starts

    @property
    def n_stages(self) -> int:
        return len(self.starts)

    def ranges(self) -> list[range]:
        ends = self.starts[1:] + (self.n_ops,)
        return [range(a, b) for a, b in zip(self.starts, ends)]


@dataclass
class StageIO:
    """What a stage receives and emits: value names in topological order."""

    index: int
    ops: list[str]
    inputs: list[str]
    outputs: list[str]


@dataclass
class OpDAG:
    ops: list[Op]
    model: str = ""
    granularity: str = "coarse"
    batch_size: int = 1

    def __post_init__(self) -> None:
        self.index = {}
        for i, op in enumerate(self.ops):
            if op.name in self.index:
                raise SwarmError(f"duplicate op name '{op.name}'")
            for src in op.inputs:
                if src not in self.index:
                    raise SwarmError(f"op '{op.name}' reads '{src}', which is not defined before it")
            self.index[op.name] = i
        self._last_use = self._compute_last_use()

    def __len__(self) -> int:
        return len(self.ops)

    # ---- costs ---------------------------------------------------------------------------
    @property
    def param_bytes(self) -> int:
        return sum(op.param_bytes for op in self.ops)

    @property
    def output_bytes(self) -> int:
        """Bytes of the model's output (what the ops feeding the ``output`` op return), per traced batch."""
        out = next((op for op in self.ops if op.op == "output"), None)
        return sum(self.ops[self.index[name]].out_bytes for name in out.inputs) if out is not None else 0

    @property
    def total_flops(self) -> int:
        return sum(op.flops for op in self.ops)

    def last_use(self) -> list[int]:
        """For each op, the index of its last consumer (its own index if unused)."""
        return self._last_use

    def _compute_last_use(self) -> list[int]:
        last = list(range(len(self.ops)))
        for i, op in enumerate(self.ops):
            for src in op.inputs:
                j = self.index[src]
                last[j] = max(last[j], i)
        return last

    def crossing(self, cut: int) -> list[str]:
        """Values produced at or before op ``cut`` and consumed after it (the boundary after ``cut``)."""
        last = self.last_use()
        return [op.name for i, op in enumerate(self.ops[: cut + 1]) if last[i] > cut and op.op not in _LOCAL_OPS]

    def cut_bytes(self) -> list[int]:
        """Bytes crossing the boundary after each op, for all cuts at once (O(ops))."""
        delta = [0] * (len(self.ops) + 1)
        for i, last in enumerate(self.last_use()):
            if last > i and self.ops[i].op not in _LOCAL_OPS:
                delta[i] += self.ops[i].out_bytes
                delta[last] -= self.ops[i].out_bytes
        out, run = [], 0
        for d in delta[:-1]:
            run += d
            out.append(run)
        return out

    def valid_cuts(self) -> list[bool]:
        """Whether a pipeline may cut after each op: only tensors may cross a network boundary, and
        the model's output op is not a stage of its own."""
        return [cut < len(self.ops) - 2 and all(self.ops[self.index[v]].out_shapes for v in self.crossing(cut))
                for cut in range(len(self.ops))]

    def balanced_partition(self, n_stages: int) -> Partition:
        """Cut where cumulative FLOPs come closest to k/n of the total, at valid cuts only (a simple
        compute-balanced split; the OP-Fence scheduler does the real, cost-aware partitioning)."""
        valid, total, acc, starts = self.valid_cuts(), self.total_flops, 0, [0]
        for i, op in enumerate(self.ops[:-1]):
            acc += op.flops
            target = total * len(starts) / n_stages
            if valid[i] and len(starts) < n_stages and acc + self.ops[i + 1].flops - target > target - acc:
                starts.append(i + 1)
        return Partition(tuple(starts), len(self.ops))

    # ---- stages --------------------------------------------------------------------------
    def check_partition(self, partition: Partition) -> None:
        if partition.n_ops != len(self.ops):
            raise SwarmError(f"partition covers {partition.n_ops} ops but the DAG has {len(self.ops)}")
        inputs = [i for i, op in enumerate(self.ops) if op.op == "placeholder"]
        if inputs and max(inputs) >= partition.ranges()[0].stop:
            raise SwarmError("every model input must be in the first stage")

    def stage_io(self, partition: Partition) -> list[StageIO]:
        self.check_partition(partition)
        stages = []
        for s, r in enumerate(partition.ranges()):
            inputs = [op.name for op in self.ops if op.op == "placeholder"] if s == 0 else self.crossing(r.start - 1)
            is_last = s == partition.n_stages - 1
            outputs = [self.ops[-1].name] if is_last else self.crossing(r.stop - 1)
            stages.append(StageIO(s, [self.ops[i].name for i in r], inputs, outputs))
        return stages

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "granularity": self.granularity, "batch_size": self.batch_size,
                "params": sum(op.n_params for op in self.ops), "param_bytes": self.param_bytes,
                "total_flops": self.total_flops,
                "ops": [op.to_dict() for op in self.ops]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OpDAG:
        try:
            return cls([Op.from_dict(o) for o in d["ops"]], d.get("model", ""), d.get("granularity", "coarse"),
                       int(d.get("batch_size", 1)))
        except (KeyError, TypeError, ValueError) as e:
            raise SwarmError(f"malformed OP-DAG JSON: {type(e).__name__}: {e}") from None

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> OpDAG:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise SwarmError(f"malformed OP-DAG JSON: {e}") from None

