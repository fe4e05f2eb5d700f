"""What a stage computes in (node config ``precision``, docs/runtime.md): ``fp32``, or ``bf16`` / ``fp16``
autocast with float32 master weights and optimizer state. A stage's outputs leave as float32 holding
the half-precision values; with a bfloat16 wire (which both imply) they cross the link at 2 bytes a value,
and the receiving stage's input checks stay those of the traced model. (fp16 crosses as bfloat16 too:
the same 2 bytes with float32's range, so a loss-scaled gradient cannot overflow on the wire.)

fp16 needs a loss scale (``swarm.runtime.worker.LossScale``): the first stage's travels with every micro-batch (``Forward``
meta ``lscale``) and each reply says the scale its gradients carry, so a stage brings every gradient to
its step's own scale (powers of two: exact) and removes it before the optimizer step. A non-finite
gradient of a scaled step is an overflow: flagged upstream (``Grads``), downstream (``Step``) and to the
replicas (``Reduce``), so every stage skips that step alike; the scale halves, and doubles again after
``GROWTH_INTERVAL`` applied steps."""
from __future__ import annotations

import torch

from swarm.errors import SwarmError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
HALF_PRECISIONS = ("bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
INIT_SCALE = 2.0 ** 16
MAX_SCALE = 2.0 ** 24
GROWTH_INTERVAL = 2000   # applied steps in a row before the scale doubles


def resolve(setting: str, device: torch.device | str) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``setting`` on ``device`` (auto: bf16 on a CUDA device that
    supports it, fp16 on an older CUDA card, else fp32: on a CPU only when asked for)."""
    device = torch.device(device)
    if setting not in PRECISIONS:
        raise SwarmError(f"precision '{setting}': must be one of {', '.join(PRECISIONS)}")
    if setting == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"   # Ampere and newer
    return setting
