"""What each codec costs in accuracy, measured once and shipped: the table the link policy and the
planner choose codecs and caps from instead of a fixed ``max_ratio`` (docs/adatopk.md).

``codecs.json`` (next to this module) is written by ``python -m benchmarks.compression --table-out``:
for each codec, its rows' measured wire ratio (both directions) and validation-loss gap against the
uncompressed bfloat16 wire, in percent, mean and standard deviation over the seeds. Pure: reading
the table and the rules on it, no I/O beyond that one file.

- ``safe_ratio(codecs, tolerance)``: the highest ratio up to which, at every ratio, one of the codecs
  costs at most ``tolerance`` percent by the table (``Cost.worst_pct``: the mean gap over the seeds
  plus one standard deviation; linear in log ratio between measured rows, 0 at ratio 1, nothing
  beyond the last row);
- ``gap_at(codec, ratio)``: that worst gap at a ratio between measured rows (linear in log ratio);
- ``choose(ratio, tolerance, codecs)``: the codec with the smallest gap at ``ratio`` (capped at their
  safe ratio together).
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

    @property
    def worst_pct(self) -> float:
        """The gap a cap must hold to: mean plus one standard deviation over the seeds (the unlucky
        seed too: at high ratios the seeds spread by several percent)."""
        return self.gap_pct + self.std_pct


@functools.cache
def table(path: Path = TABLE_PATH) -> dict[str, tuple[Cost, ...]]:
    """codec -> its measured rows by ratio (empty when the file is missing: nothing is measured)."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {codec: tuple(sorted((Cost(**row) for row in rows), key=lambda c: c.ratio))
            for codec, rows in data["codecs"].items()}


def _points(codec: str, costs: dict[str, tuple[Cost, ...]]) -> list[tuple[float, float]]:
    """(ratio, worst gap) of ``codec``'s rows, from (1, 0): nothing is lost uncompressed."""
    return [(1.0, 0.0), *((c.ratio, c.worst_pct) for c in costs.get(codec, ()))]


def _within(codec: str, tolerance_pct: float, costs: dict[str, tuple[Cost, ...]]) -> list[tuple[float, float]]:
    """The ratio intervals where ``codec``'s gap (``gap_at``: linear in log ratio between measured
    rows, from 0 at ratio 1) is at most ``tolerance_pct``."""
    points = _points(codec, costs)
    spans: list[tuple[float, float]] = []
    for (r0, g0), (r1, g1) in zip(points, points[1:]):
        if g0 > tolerance_pct and g1 > tolerance_pct:
            continue
        lo, hi = math.log(r0), math.log(r1)
        cross = lo + (tolerance_pct - g0) / (g1 - g0) * (hi - lo) if g0 != g1 else hi
        start, end = (r0, r1) if max(g0, g1) <= tolerance_pct else (r0, math.exp(cross)) if g0 <= tolerance_pct \
            else (math.exp(cross), r1)
        if spans and start <= spans[-1][1] * (1 + 1e-12):
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    return spans


def safe_ratio(codec: str | tuple[str, ...], tolerance_pct: float = DEFAULT_TOLERANCE_PCT,
               costs: dict[str, tuple[Cost, ...]] | None = None) -> float:
    """The highest ratio ``R`` such that at every ratio from 1 to ``R`` one of ``codec`` (a name or
    several) costs at most ``tolerance_pct`` by the measured table (1.0: nothing measured)."""
    costs = costs if costs is not None else table()
    names = (codec,) if isinstance(codec, str) else codec
    spans = sorted(span for name in names for span in _within(name, tolerance_pct, costs))
    reach = 1.0
    for start, end in spans:
        if start > reach * (1 + 1e-12):
            break
        reach = max(reach, end)
    return reach


def gap_at(codec: str, ratio: float, costs: dict[str, tuple[Cost, ...]] | None = None) -> float:
    """The measured worst gap (``Cost.worst_pct``) of ``codec`` at ``ratio`` (interpolated in log
    ratio; 0 at ratio 1; beyond its last row: infinite, nothing says it holds there)."""
    points = _points(codec, costs if costs is not None else table())
    for (r0, g0), (r1, g1) in zip(points, points[1:]):
        if ratio <= r1:
            if ratio <= r0:
                return g0
            t = (math.log(ratio) - math.log(r0)) / (math.log(r1) - math.log(r0))
            return g0 + t * (g1 - g0)
    return 0.0 if ratio <= points[-1][0] else math.inf


def choose(ratio: float, tolerance_pct: float = DEFAULT_TOLERANCE_PCT, codecs: tuple[str, ...] | None = None,
           costs: dict[str, tuple[Cost, ...]] | None = None) -> tuple[str | None, float]:
    """(codec, ratio) for a link that needs ``ratio``: the codec of ``codecs`` measured cheapest at
    ``ratio``, at most ``tolerance_pct``; beyond what they hold together (``safe_ratio``), the same at
    that cap. (None, ``ratio``) when nothing is measured."""
    costs = costs if costs is not None else table()
    names = [c for c in (codecs or tuple(costs)) if c in costs]
    if not names:
        return None, ratio
    ratio = min(ratio, safe_ratio(tuple(names), tolerance_pct, costs))
    return min(names, key=lambda c: (gap_at(c, ratio, costs), names.index(c))), ratio
