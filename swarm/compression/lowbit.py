"""Low-bit values with per-block scales: the value half of a compressed packet (docs/wire.md).

``b`` bits per value (8, 4 or 2), ``2**b`` uniform levels symmetric about zero and without a zero
level (mid-rise: kept values are the large ones, so no level is wasted on zero). Each block of
``block`` consecutive values has one scale: the step between levels, ``2 * max|v| / (2**b - 1)``,
stored as bfloat16 (the float32 range, so tiny gradients do not flush to zero; the step is rounded
up to the next bfloat16, so no value of the block is clipped). A value ``v`` is sent as the code
``c = round(v / step + (2**b - 1) / 2)`` in ``0 .. 2**b - 1`` (or with stochastic rounding: unbiased),
packed little-endian within a byte (the first value in the lowest bits); ``c`` decodes to
``(c - (2**b - 1) / 2) * step``.

    scales   u16[ceil(n / block)]: the upper half of each step's float32 (bfloat16)
    codes    u8[ceil(n * b / 8)]

Pure: torch and numpy, no I/O. ``value_bytes`` is the size, ``quantise`` / ``dequantise`` the codec.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from swarm.errors import SwarmError

BITS = (8, 4, 2)
BLOCK = 32


def value_bytes(n: int, bits: int, block: int = BLOCK) -> int:
    """Bytes of ``n`` values: their scales and their packed codes."""
    return 2 * math.ceil(n / block) + math.ceil(n * bits / 8)


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise SwarmError(f"low-bit values: {bits} bits (supported: {', '.join(map(str, BITS))})")


def _bf16_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 >= x (x >= 0, float32), as its upper 16 bits."""
    bits = x.contiguous().view(torch.int32)
    up = ((bits + 0xFFFF) >> 16) & 0xFFFF   # round the magnitude up: non-negative floats order as integers
    return up.to(torch.int32)


def _bf16_value(upper: torch.Tensor) -> torch.Tensor:
    return (upper.to(torch.int32) << 16).view(torch.float32)


def quantise(values: torch.Tensor, bits: int, block: int = BLOCK, generator: torch.Generator | None = None) -> bytes:
    """``values`` (1-D) as scales and codes; ``generator``: stochastic rounding drawn from it."""
    _check_bits(bits)
    v = values.detach().float().flatten().cpu()
    n = v.numel()
    if n == 0:
        return b""
    pad = (-n) % block
    blocks = torch.nn.functional.pad(v, (0, pad)).view(-1, block)
    top = (1 << bits) - 1
    upper = _bf16_up(blocks.abs().amax(dim=1) * (2.0 / top))
    step = _bf16_value(upper)
    z = blocks / torch.where(step > 0, step, torch.ones_like(step))[:, None] + top / 2
    if generator is not None:
        z = torch.floor(z + torch.rand(z.shape, generator=generator))
    codes = torch.round(z).clamp_(0, top).to(torch.uint8).flatten()[:n].numpy()
    per_byte = 8 // bits
    if per_byte > 1:
        codes = np.pad(codes, (0, (-n) % per_byte)).reshape(-1, per_byte)
        codes = np.bitwise_or.reduce(codes << (np.arange(per_byte, dtype=np.uint8) * bits), axis=1).astype(np.uint8)
    return upper.to(torch.int32).numpy().astype("<u2").tobytes() + codes.tobytes()


def dequantise(data: bytes | memoryview, n: int, bits: int, block: int = BLOCK) -> torch.Tensor:
    """The float32 values of ``quantise``'s bytes for ``n`` values (sizes checked by the caller:
    ``len(data) == value_bytes(n, bits, block)``); non-finite scales are refused."""
    _check_bits(bits)
    if len(data) != value_bytes(n, bits, block):
        raise SwarmError(f"low-bit values: {len(data)} bytes for {n} values of {bits} bits")
    if n == 0:
        return torch.zeros(0)
    n_blocks = math.ceil(n / block)
    upper = torch.from_numpy(np.frombuffer(data, dtype="<u2", count=n_blocks).astype(np.int32))
    step = _bf16_value(upper)
    if not bool(torch.isfinite(step).all()) or bool((step < 0).any()):
        raise SwarmError("low-bit values: a block scale is not a finite non-negative number")
    raw = np.frombuffer(data, dtype=np.uint8, offset=2 * n_blocks)
    per_byte = 8 // bits
    if per_byte > 1:
        shifts = np.arange(per_byte, dtype=np.uint8) * bits
        raw = ((raw[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)
    codes = torch.from_numpy(raw[:n].astype(np.float32))
    return (codes - ((1 << bits) - 1) / 2) * step.repeat_interleave(block)[:n]
