"""How a stage's replicas synchronise: the settings and the exchange's wire format, without torch
(the planner and the config read them; ``swarm.runtime.outer`` does the arithmetic; docs/sync.md)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from swarm.errors import SwarmError

COMPRESSIONS = ("off", "int8", "topk8")
BLOCK = 256          # values per int8 scale


@dataclass(frozen=True)
class OuterSettings:
    """How replicas synchronise (``training.sync_every`` and ``training.outer_*``)."""

    sync_every: int = 1              # H: 1 = synchronous data parallelism; 0 = the planner chooses
    lr: float = 0.8                  # outer learning rate and Nesterov momentum: DiLoCo's 0.7 / 0.9 cost 13%
    momentum: float = 0.3            # of validation loss at H = 8 in benchmarks.sync; 0.8 / 0.3 ties plain averaging
    compression: str = "topk8"       # off | int8 (blockwise, 3.9x) | topk8 (top-k + int8, 12.8x at 1/16)
    topk_fraction: float = 1 / 16    # topk8: share of each part's values sent
    overlap: bool = True             # the exchange runs during the next H inner steps; its outer step is
                                     # applied at the next sync (one sync late), under this period's progress

    def __post_init__(self) -> None:
        if self.sync_every < 0:
            raise SwarmError("sync_every must be >= 1 (or 0: chosen by the planner)")
        if self.compression not in COMPRESSIONS:
            raise SwarmError(f"outer compression '{self.compression}' is not one of {', '.join(COMPRESSIONS)}")
        if not 0 < self.topk_fraction <= 1:
            raise SwarmError("outer topk_fraction must be in (0, 1]")

    def codec(self):
        """The ``runtime.outer.OuterCodec`` of these settings (imports torch)."""
        from swarm.runtime.outer import OuterCodec
        return OuterCodec(self.compression, self.topk_fraction)

    def ratio(self) -> float:
        """Raw float32 bytes per wire byte of this exchange (what the planner prices it at)."""
        return ExchangeFormat(self.compression, self.topk_fraction).ratio()

    def syncs_after(self, step: int, sync_every: int | None = None) -> bool:
        """Whether the replicas exchange their pseudo-gradient after the inner step of ``step``."""
        h = sync_every or self.sync_every or 1
        return (step + 1) % h == 0


@dataclass(frozen=True)
class ExchangeFormat:
    """What one part (``numel`` float32 values) of the exchange carries: every tensor's exact shape is
    known from ``numel`` alone, so a receiver checks the header before decoding anything."""

    compression: str = "off"
    topk_fraction: float = 1 / 16

    def kept(self, numel: int) -> int:
        return max(1, math.ceil(self.topk_fraction * numel)) if numel else 0

    def shapes(self, numel: int) -> dict[str, tuple[list[int], str]]:
        """Tensor name -> (shape, dtype name) of an encoded part."""
        if self.compression == "off":
            return {"g": ([numel], "float32")}
        n = self.kept(numel) if self.compression == "topk8" else numel
        out = {"q": ([n], "int8"), "s": ([math.ceil(n / BLOCK)], "float32")}
        if self.compression == "topk8":
            out["i"] = ([n], "int32")
        return out

    def wire_bytes(self, numel: int) -> int:
        size = {"float32": 4, "int8": 1, "int32": 4}
        return sum(math.prod(shape) * size[dtype] for shape, dtype in self.shapes(numel).values())

    def ratio(self, numel: int = 1 << 20) -> float:
        """Raw float32 bytes per wire byte (what the planner prices the exchange at)."""
        return 4 * numel / self.wire_bytes(numel) if numel else 1.0
