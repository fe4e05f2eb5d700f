"""What each codec costs in accuracy, measured once and shipped: the table the link policy and the
planner choose codecs and caps from instead of a fixed ``max_ratio`` (docs/adatopk.md).

``codecs.json`` (next to this module) is written by ``python -m benchmarks.compression --table-out``:
for each codec, its rows' measured wire ratio (both directions) and validation-loss gap against the
uncompressed bfloat16 wire, in percent, mean and standard deviation over the seeds. Pure: reading
the table and the rules on it, no I/O beyond that one file.

- ``safe_ratio(codec, tolerance)``: the highest measured ratio up to which every measured row of the
  codec costs at most ``tolerance`` percent (the mean gap over the seeds);
- ``gap_at(codec, ratio)``: the gap at a ratio between measured rows (linear in log ratio);
- ``choose(ratio, tolerance, codecs)``: the codec with the smallest gap at ``ratio`` among those whose
  safe ratio reaches it, else the one reaching furthest, at its own cap.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

TABLE_PATH = Path(__file__).with_name("codecs.json")
DEFAULT_TOLERANCE_PCT = 3.0   # compression.max_loss_pct: the validation-loss cost a link may pay


@dataclass(frozen=True)
class Cost:
    ratio: float         # the ratio the link policy asks the codec for (ATK2: = the wire ratio of both directions)
    wire_ratio: float    # measured: raw bytes of activations and gradients / bytes on the wire
    gap_pct: float       # validation loss against the uncompressed bfloat16 wire, percent (mean over seeds)
    std_pct: float


@functools.cache
def table(path: Path = TABLE_PATH) -> dict[str, tuple[Cost, ...]]:
    """codec -> its measured rows by ratio (empty when the file is missing: nothing is measured)."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {codec: tuple(sorted((Cost(**row) for row in rows), key=lambda c: c.ratio))
            for codec, rows in data["codecs"].items()}


def safe_ratio(codec: str, tolerance_pct: float = DEFAULT_TOLERANCE_PCT,
               costs: dict[str, tuple[Cost, ...]] | None = None) -> float:
    """The highest measured ratio of ``codec`` below which no measured row costs more than
    ``tolerance_pct`` (1.0: none measured, or even its gentlest row costs more)."""
    best = 1.0
    for cost in (costs if costs is not None else table()).get(codec, ()):
        if cost.gap_pct > tolerance_pct:
            break
        best = cost.ratio
    return best


def gap_at(codec: str, ratio: float, costs: dict[str, tuple[Cost, ...]] | None = None) -> float:
    """The measured gap of ``codec`` at ``ratio`` (interpolated in log ratio; 0 at ratio 1; beyond its
    last row: infinite, nothing says it holds there)."""
    rows = (costs if costs is not None else table()).get(codec, ())
    points = [(1.0, 0.0), *((c.ratio, c.gap_pct) for c in rows)]
    for (r0, g0), (r1, g1) in zip(points, points[1:]):
        if ratio <= r1:
            if ratio <= r0:
                return g0
            t = (math.log(ratio) - math.log(r0)) / (math.log(r1) - math.log(r0))
            return g0 + t * (g1 - g0)
    return 0.0 if ratio <= points[-1][0] else math.inf


def choose(ratio: float, tolerance_pct: float = DEFAULT_TOLERANCE_PCT, codecs: tuple[str, ...] | None = None,
           costs: dict[str, tuple[Cost, ...]] | None = None) -> tuple[str | None, float]:
    """(codec, ratio) for a link that needs ``ratio``: the cheapest codec in accuracy whose safe ratio
    reaches it; else the codec that reaches furthest, at its safe ratio. (None, ``ratio``) when
    nothing is measured."""
    costs = costs if costs is not None else table()
    names = [c for c in (codecs or tuple(costs)) if c in costs]
    if not names:
        return None, ratio
    caps = {c: safe_ratio(c, tolerance_pct, costs) for c in names}
    reaching = [c for c in names if caps[c] >= ratio]
    if reaching:
        return min(reaching, key=lambda c: (gap_at(c, ratio, costs), names.index(c))), ratio
    furthest = max(names, key=lambda c: (caps[c], -names.index(c)))
    return furthest, caps[furthest]
