"""Gradient all-reduce among the replicas of one stage: butterfly (reduce-scatter, then all-gather).

Replicas are sorted by peer id; replica ``i`` owns part ``i`` of the flat gradient vector. Each replica
sends part ``j`` of its gradients to owner ``j`` and gets back the sum; the owner adds the parts in
peer-id order, once, so every replica ends with bit-identical sums (their optimizer steps stay
identical). Per replica that moves ``2 (n - 1) / n`` of the gradient, like a ring. The transport is
the caller's: ``ReduceRound`` only collects contributions and hands out the sum.
"""
from __future__ import annotations

import asyncio

import torch

from swarm.errors import SwarmError


def parts(numel: int, n: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each replica's part of a vector of ``numel`` values."""
    return [(numel * i // n, numel * (i + 1) // n) for i in range(n)]


class ReduceRound:
    """The sum of one part over all replicas, for one step; contributions may come in any order."""

    def __init__(self, replicas: tuple[str, ...], numel: int):
        self.replicas, self.numel = replicas, numel
        self.got: dict[str, torch.Tensor] = {}
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()

    def add(self, peer: str, part: torch.Tensor) -> None:
        if peer not in self.replicas:
            raise SwarmError(f"peer {peer} is not a replica of this stage")
        if part.dtype != torch.float32 or part.dim() != 1 or part.numel() != self.numel:
            raise SwarmError(f"gradient part must be float32 [{self.numel}], got {part.dtype} {list(part.shape)}")
        self.got[peer] = part
        if len(self.got) == len(self.replicas) and not self.done.done():
            total = torch.zeros(self.numel)
            for p in self.replicas:           # sorted: one summation order everywhere
                total += self.got[p]
            self.done.set_result(total)
