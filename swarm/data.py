"""Training data that needs no download: byte-level text (a generated corpus or local files),
sampled deterministically by step so that every first-stage replica can take its own shard."""
from __future__ import annotations

import random
from pathlib import Path

import torch

from swarm.errors import SwarmError

_SUBJECTS = ["the node", "a peer", "the swarm", "each stage", "the scheduler", "a replica", "the network", "every link"]
_VERBS = ["sends", "measures", "elects", "compresses", "averages", "trains", "forwards", "receives"]
_OBJECTS = ["the activations", "its gradients", "a new plan", "the bandwidth", "the next batch", "small tensors",
            "the loss", "a checkpoint"]
_TAILS = ["quickly", "over a slow link", "without a coordinator", "every step", "to its neighbour", "in order", "again"]


def generated_corpus(n_bytes: int = 1 << 20, seed: int = 0) -> bytes:
    """Deterministic English-like sentences from a small grammar: structure a byte-level model can learn."""
    rng, out, size = random.Random(seed), [], 0
    while size < n_bytes:
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}. "
        out.append(s)
        size += len(s)
    return "".join(out).encode()[:n_bytes]


class ByteCorpus:
    """Sequences of ``seq_len + 1`` bytes; ``batch(step, size, rank, world)`` is the same in every process."""

    def __init__(self, data: bytes, seq_len: int, seed: int = 0):
        if len(data) < seq_len + 2:
            raise SwarmError(f"corpus of {len(data)} bytes is shorter than one sequence of {seq_len + 1}")
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        self.seq_len, self.seed = seq_len, seed

    @classmethod
    def from_files(cls, paths: list[str], seq_len: int) -> "ByteCorpus":
        try:
            return cls(b"\n".join(Path(p).read_bytes() for p in paths), seq_len)
        except OSError as e:
            raise SwarmError(f"cannot read training text {e.filename}: {e.strerror}") from None

    def batch(self, step: int, size: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-byte targets of shard ``rank`` of ``world`` of step ``step``'s global batch."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.data) - self.seq_len - 1, (size * world,), generator=gen)[rank::world]
        rows = torch.stack([self.data[s: s + self.seq_len + 1] for s in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]
