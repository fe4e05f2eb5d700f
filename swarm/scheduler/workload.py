"""Per-micro-batch costs of a model's segments (runs of ops between two allowed cuts), as prefix sums:
what the planning cost model (``swarm.scheduler.costs``) prices. Pure numpy over the OP-DAG's numbers."""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np

from swarm.dag.graph import OpDAG

FWD_SHARE = 1 / 3  # a segment's forward share of its FLOPs and kernels when the DAG does not say (backward ~2x)


@dataclass(frozen=True)
class Workload:
    """Per-micro-batch costs of the model's *segments*: runs of ops between two allowed cuts.

    Arrays hold prefix sums over segments (length ``n + 1``) so any stage's cost is O(1);
    ``cut_bytes[k]`` is the activation crossing the boundary after segment ``k``."""

    names: tuple[str, ...]          # op names, in topological order
    seg_stop: tuple[int, ...]       # op index one past each segment's last op
    flops: np.ndarray
    kernels: np.ndarray
    param_bytes: np.ndarray
    buffer_bytes: np.ndarray
    act_bytes: np.ndarray
    cut_bytes: np.ndarray
    model: str = ""
    samples: int = 1                # samples per micro-batch (what the costs are scaled to)
    fwd_flops: np.ndarray | None = None     # the forward pass's share of ``flops`` (None: ``FWD_SHARE``)
    fwd_kernels: np.ndarray | None = None   # ... and of ``kernels``
    output_bytes: float = 0.0       # the model's output (logits) per micro-batch: the loss keeps it and its log-probabilities

    def __post_init__(self) -> None:
        for name, of in (("fwd_flops", self.flops), ("fwd_kernels", self.kernels)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, of * FWD_SHARE)

    @functools.cached_property
    def cuts_before(self) -> np.ndarray:
        """``cuts_before[k]``: the activation entering segment ``k`` (0 for the model's input), and
        ``cuts_before[b]`` the one leaving segments ``[a, b)`` (0 after the last)."""
        return np.concatenate([[0.0], self.cut_bytes])

    @property
    def n(self) -> int:
        return len(self.seg_stop)

    def op_range(self, a: int, b: int) -> tuple[int, int]:
        """Op indices ``[first, stop)`` of segments ``[a, b)``."""
        return (self.seg_stop[a - 1] if a else 0), self.seg_stop[b - 1]

    @classmethod
    def from_segments(cls, flops, kernels, param_bytes, act_bytes, cut_bytes, buffer_bytes=None,
                      names=None, model: str = "", samples: int = 1, fwd_flops=None, fwd_kernels=None,
                      output_bytes: float = 0.0) -> Workload:
        """From per-segment costs (one op per segment); ``cut_bytes`` has one entry per segment."""
        n = len(flops)
        names = tuple(names or (f"op{i}" for i in range(n)))
        prefix = lambda v: None if v is None else np.concatenate([[0.0], np.cumsum(np.asarray(v, dtype=np.float64))])  # noqa: E731
        return cls(names, tuple(range(1, n + 1)), prefix(flops), prefix(kernels), prefix(param_bytes),
                   prefix(buffer_bytes if buffer_bytes is not None else [0] * n), prefix(act_bytes),
                   np.asarray(cut_bytes, dtype=np.float64), model, samples, prefix(fwd_flops), prefix(fwd_kernels),
                   float(output_bytes))

    @classmethod
    def from_dag(cls, dag: OpDAG, micro_batch_size: int | None = None) -> Workload:
        """Segments of ``dag`` at its valid cuts, costs scaled to ``micro_batch_size`` samples."""
        scale = (micro_batch_size or dag.batch_size) / dag.batch_size
        valid, cuts = dag.valid_cuts(), dag.cut_bytes()
        last_input = max((i for i, op in enumerate(dag.ops) if op.op == "placeholder"), default=0)
        stops = [i + 1 for i in range(len(dag.ops) - 1) if valid[i] and i >= last_input] + [len(dag.ops)]
        starts = [0] + stops[:-1]
        seg = lambda f: [sum(f(op) for op in dag.ops[a:b]) for a, b in zip(starts, stops)]  # noqa: E731
        return cls.from_segments(
            flops=[x * scale for x in seg(lambda o: o.flops)], kernels=seg(lambda o: o.kernels_fwd + o.kernels_bwd),
            param_bytes=seg(lambda o: o.param_bytes), buffer_bytes=seg(lambda o: o.buffer_bytes),
            act_bytes=[x * scale for x in seg(lambda o: o.act_bytes)],
            cut_bytes=[cuts[b - 1] * scale if b < len(dag.ops) else 0 for b in stops],
            names=[op.name for op in dag.ops], model=dag.model, samples=micro_batch_size or dag.batch_size,
            fwd_flops=[x * scale for x in seg(lambda o: o.flops_fwd)], fwd_kernels=seg(lambda o: o.kernels_fwd),
            output_bytes=dag.output_bytes * scale,
        )._with_stops(tuple(stops))

    def _with_stops(self, stops: tuple[int, ...]) -> Workload:
        return replace(self, seg_stop=stops)

    @functools.cached_property
    def largest_act(self) -> np.ndarray:
        """``largest_act[a, b]``: the most activations one segment of ``[a, b)`` saves; its backward pass
        holds gradients about as large on top of what is kept (an ``(n + 1) x (n + 1)`` table)."""
        seg, n = np.diff(self.act_bytes), self.n
        table = np.zeros((n + 1, n + 1))
        for i in range(n):
            table[i, i + 1:] = np.maximum.accumulate(seg[i:])
        return table
