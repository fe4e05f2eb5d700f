"""AdaTopK's rule at run time: the ratio each pipeline link uses, re-decided for every micro-batch from
the plan's per-micro-batch budget and the newest measurements (docs/adatopk.md).

The planner priced every link with the cost model of ``swarm.scheduler.costs``; a running stage
applies the *same* rule (``ratio_for``: the smallest ratio that keeps the link within the budget, 1
when raw transfer fits or compression does not pay) with live inputs instead of planned ones:

- bandwidth: the newest probe of that exact peer (else the plan's figure for the link);
- codec throughput: this node's measured encode + decode seconds per raw byte (EMA);
- budget: the plan's bottleneck per micro-batch, or this stage's measured compute per micro-batch
  if that is larger (a link faster than the slowest stage cannot speed the pipeline up).

The first ``warmup_steps`` optimizer steps always go uncompressed.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from swarm.compression.measured import DEFAULT_TOLERANCE_PCT, choose
from swarm.config import AUTO_CODECS, CODEC_BITS, CompressionConfig
from swarm.scheduler.costs import PlanSettings, ratio_for, wire_fraction
from swarm.scheduler.plan import LinkPlan

EMA = 0.2   # weight of a new measurement


def ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - EMA) * old + EMA * new


@functools.cache
def measure_codec_rate(shape: tuple[int, ...] = (4, 128, 256), ratio: float = 10.0, repeats: int = 3,
                       bits: int | None = None) -> float:
    """This device's encode + decode throughput in raw bytes/s (best of ``repeats``; ~50 ms; ``bits``:
    of ATK2 packets, None: ATK1),
    so that the first plan already prices compression at what this node can do. Measured once per
    process: the node's start-up measurement seeds every later session's link policy."""
    import time

    import torch

    from swarm.compression.adatopk import decode, encode

    x = torch.randn(shape)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        decode(encode(x, ratio, bits=bits).data)
        best = min(best, time.perf_counter() - started)
    return x.numel() * x.element_size() / best


def codec_bits(codec: str) -> int | None:
    """The bits whose throughput stands for ``compression.codec`` (auto: its middle codec, q4)."""
    return CODEC_BITS[AUTO_CODECS[1] if codec == "auto" else codec]


@dataclass
class LinkPolicy:
    """One outgoing pipeline link of this stage (to any replica of the next stage)."""

    mode: str                   # auto | off | fixed
    cut_bytes: float            # raw activation bytes per micro-batch of the planned size
    budget_s: float             # the plan's bottleneck per micro-batch
    flows: int                  # parallel replica pairs on this link
    planned_bps: float          # the plan's bandwidth for this link
    fixed_ratio: float = CompressionConfig.model_fields["ratio"].default
    max_ratio: float = PlanSettings.max_ratio
    warmup_steps: int = 0
    codec_s_per_byte: float | None = None   # measured encode + decode time per raw byte
    compute_s: float | None = None          # measured forward + backward per micro-batch of this stage
    codec: str = CompressionConfig.model_fields["codec"].default   # compression.codec (auto: per ratio, from the table)
    max_loss_pct: float = DEFAULT_TOLERANCE_PCT
    half: bool = False                      # uncompressed float32 goes as bfloat16 (compression.wire_dtype)

    @classmethod
    def from_config(cls, comp: CompressionConfig, link: LinkPlan, budget_s: float, flows: int,
                    codec_s_per_byte: float | None = None, half: bool = False) -> LinkPolicy:
        """The policy of a planned ``link`` under the ``compression`` config; in auto mode the codec
        time starts at this device's measured rate (``measure_codec_rate``) unless given."""
        if comp.mode == "auto" and codec_s_per_byte is None:
            codec_s_per_byte = 1 / measure_codec_rate(bits=codec_bits(comp.codec))
        return cls(comp.mode, link.bytes, budget_s, flows, link.bandwidth_bps, comp.ratio, comp.cap(),
                   comp.warmup_steps, codec_s_per_byte=codec_s_per_byte if comp.mode == "auto" else None,
                   codec=comp.codec, max_loss_pct=comp.max_loss_pct, half=half or comp.wire_dtype == "bfloat16")

    def bits_for(self, ratio: float) -> int | None:
        """The value bits of packets at ``ratio``: the configured codec's, or (codec auto) those of the
        ATK2 codec the shipped table measured cheapest at that ratio (docs/adatopk.md)."""
        if self.codec != "auto":
            return CODEC_BITS[self.codec]
        chosen, _ = choose(ratio, self.max_loss_pct, AUTO_CODECS)
        return CODEC_BITS[chosen or AUTO_CODECS[0]]

    def ratio(self, step: int, bandwidth_bps: float | None, cut_bytes: float | None = None) -> float:
        """The ratio for a micro-batch of ``cut_bytes`` (default: planned) at ``step`` to a peer
        measured at ``bandwidth_bps`` (None: not measured yet)."""
        if self.mode == "off" or step < self.warmup_steps:
            return 1.0
        if self.mode == "fixed":
            return self.fixed_ratio
        settings = PlanSettings(max_ratio=self.max_ratio, codec_bytes_per_s=self.codec_bytes_per_s,
                                wire_fraction=wire_fraction(self.half))
        budget = max(self.budget_s, self.compute_s or 0.0)
        return ratio_for(cut_bytes or self.cut_bytes, bandwidth_bps or self.planned_bps, self.flows, budget, settings)

    @property
    def codec_bytes_per_s(self) -> float:
        return 1 / self.codec_s_per_byte if self.codec_s_per_byte else PlanSettings().codec_bytes_per_s

    def observe_codec(self, raw_bytes: int, seconds: float) -> None:
        if raw_bytes > 0 and seconds > 0:
            self.codec_s_per_byte = ema(self.codec_s_per_byte, seconds / raw_bytes)

    def observe_compute(self, seconds: float) -> None:
        self.compute_s = ema(self.compute_s, seconds)
