"""Compression of pipeline links: AdaTopK selection and its packets (``adatopk``), their low-bit
values (``lowbit``) and Rice-coded indices (``rice``), the measured cost table (``measured``, free of
torch: the planner and the config read it), and the run-time policy (``policy``)."""
from __future__ import annotations

__all__ = ["Packet", "decode", "encode", "encode_like", "keep_for_ratio"]


def __getattr__(name: str):   # the codec's names, imported on first use: ``measured`` stays free of torch
    if name in __all__:
        from swarm.compression import adatopk
        return getattr(adatopk, name)
    raise AttributeError(f"module 'swarm.compression' has no attribute {name!r}")
