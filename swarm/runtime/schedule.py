"""Micro-batch schedules: the order in which one stage runs forward (F) and backward (B) passes.

GPipe: all forwards, then all backwards (holds M micro-batches of activations). 1F1B: stage ``s`` of
``S`` first runs ``S - s`` forwards (warm-up), then alternates one backward and one forward, then
drains the backwards (holds at most ``S - s``). Both give the same gradients; only memory and bubble
differ.
"""
from __future__ import annotations

from typing import Literal

Action = tuple[Literal["F", "B"], int]


def gpipe(stage: int, n_stages: int, micro_batches: int) -> list[Action]:
    return [("F", m) for m in range(micro_batches)] + [("B", m) for m in range(micro_batches)]


def one_f_one_b(stage: int, n_stages: int, micro_batches: int) -> list[Action]:
    warmup = min(n_stages - stage, micro_batches)
    out: list[Action] = [("F", m) for m in range(warmup)]
    next_f, next_b = warmup, 0
    while next_b < micro_batches:
        out.append(("B", next_b))
        next_b += 1
        if next_f < micro_batches:
            out.append(("F", next_f))
            next_f += 1
    return out


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b}


def in_flight(actions: list[Action]) -> int:
    """Most micro-batches whose activations the stage holds at once under ``actions``."""
    held = peak = 0
    for kind, _ in actions:
        held += 1 if kind == "F" else -1
        peak = max(peak, held)
    return peak
