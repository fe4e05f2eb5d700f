"""What a stage computes in (node config ``precision``, docs/runtime.md): ``fp32``, or ``bf16`` autocast
with float32 master weights and optimizer state. A stage's outputs leave as float32 holding bfloat16
values, so with a bfloat16 wire (which ``bf16`` implies) they cross the link at 2 bytes a value with
nothing lost, and the receiving stage's input checks stay those of the traced model.

``fp16`` needs a loss scale that travels with each micro-batch and one overflow check for the whole
pipeline per step: not built yet, so it is refused with a line that says so."""
from __future__ import annotations

import torch

from swarm.errors import SwarmError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve(setting: str, device: torch.device | str) -> str:
    """``fp32`` or ``bf16`` for ``setting`` on ``device`` (auto: bf16 on a CUDA device that supports it,
    else fp32: on a CPU only when asked for)."""
    device = torch.device(device)
    if setting not in PRECISIONS:
        raise SwarmError(f"precision '{setting}': must be one of {', '.join(PRECISIONS)}")
    if setting == "fp16":
        raise SwarmError("precision fp16 needs a loss scale shared across stages, which is not built yet: use bf16 or fp32")
    if setting == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return setting
