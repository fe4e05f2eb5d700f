"""Gradient all-reduce among the replicas of one stage: butterfly (reduce-scatter, then all-gather).

Replicas are sorted by peer id; replica ``i`` owns part ``i`` of the flat gradient vector. Each replica
sends part ``j`` of its gradients to owner ``j`` and gets back the sum; the owner adds the parts in
peer-id order, once, so every replica ends with bit-identical sums (their optimizer steps stay
identical). Per replica that moves ``2 (n - 1) / n`` of the gradient, like a ring. The transport is
the caller's (``swarm.pipeline``: ``StageProtocol.contribute`` collects a part's contributions).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


def parts(numel: int, n: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each replica's part of a vector of ``numel`` values."""
    return [(numel * i // n, numel * (i + 1) // n) for i in range(n)]


def flatten(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """``tensors`` as one float32 CPU vector, in order: the flat layout every replica shares."""
    pieces = [t.detach().flatten().float().cpu() for t in tensors]
    return torch.cat(pieces) if pieces else torch.zeros(0)


def split(flat: torch.Tensor, like: Iterable[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(tensor, its slice of ``flat`` shaped like it) for each of ``like``: ``flatten``'s inverse."""
    offset = 0
    for t in like:
        yield t, flat[offset:offset + t.numel()].view_as(t)
        offset += t.numel()
