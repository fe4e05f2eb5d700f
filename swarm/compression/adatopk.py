"""AdaTopK codec: keep the k values of a tensor that matter most, quantised, with compact indices.

Selection (``top_k_positions``): in every position (a token, a pixel) the same number of values,
those largest relative to their channel's typical magnitude (``ChannelScale``: an average over
earlier tensors of the link). Plain global top-k spends the budget on a few outlier channels and,
in a causal model, lets later tokens decide what earlier ones keep (docs/adatopk.md).

Wire layout of one packet (little-endian; see docs/adatopk.md)::

    header   magic b"ATK1", dtype code u8, index kind u8 (0 varint gaps, 1 bitmap, 2 none: reuse
             the forward mask), ndim u8, pad u8, shape i64[ndim], k i64, block u32, index bytes u32
    indices  varint (LEB128) gaps between sorted kept positions, or a bitmap of numel bits
    scales   f32[ceil(k / block)]: max |value| / 127 of each block of kept values
    values   i8[k]

A second layout, ``ATK2`` (``encode(..., bits=4)``: low-bit values, Rice-coded indices)::

    header   magic b"ATK2", dtype code u8, index kind u8 (0 Rice, 1 bitmap, 2 none: reuse the
             forward mask, 3 none: every position kept), value bits u8 (8, 4, 2), ndim u8,
             shape i64[ndim], k i64, block u16, pad u16, index bytes u32
    indices  Rice-coded gaps (``swarm.compression.rice``) or a bitmap of numel bits
    values   k values of ``bits`` bits with a bfloat16 step per block (``swarm.compression.lowbit``)

``encode`` sizes ``k`` so that raw bytes / packet bytes is the requested ratio (within a few %);
``encode_like`` compresses a second tensor on the positions of a first one (the backward gradient of
an activation reuses the forward mask, so its packet carries no indices at all).
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
import torch

from swarm.compression import lowbit, rice
from swarm.errors import SwarmError

MAGIC = b"ATK1"
BLOCK = 64
_HEAD = struct.Struct("<4sBBBB")
_TAIL = struct.Struct("<qII")
DTYPES = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}
CODES = {v: k for k, v in DTYPES.items()}
VARINT, BITMAP, REUSE = 0, 1, 2
RICE, DENSE = 0, 3                 # ATK2's index kinds beside BITMAP and REUSE
MAX_NDIM = 8
MAGIC2 = b"ATK2"
_HEAD2 = struct.Struct("<4sBBBB")
_TAIL2 = struct.Struct("<qHHI")
BITS = lowbit.BITS


def varint_encode(values: np.ndarray) -> bytes:
    """LEB128 of non-negative integers, vectorised."""
    values = values.astype(np.uint64)
    if not len(values):
        return b""
    n_bytes = np.ones(len(values), dtype=np.int64)
    for shift in range(7, 64, 7):
        n_bytes += values >= np.uint64(1 << shift)
    owner = np.repeat(np.arange(len(values)), n_bytes)
    pos = np.arange(len(owner)) - np.repeat(np.cumsum(n_bytes) - n_bytes, n_bytes)
    out = ((values[owner] >> (7 * pos).astype(np.uint64)) & 0x7F).astype(np.uint8)
    out[pos < n_bytes[owner] - 1] |= 0x80
    return out.tobytes()


def varint_decode(data: bytes, count: int) -> np.ndarray:
    """Inverse of ``varint_encode`` for exactly ``count`` values; SwarmError on anything else."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if count == 0:
        if len(raw):
            raise SwarmError("AdaTopK packet: index bytes but no indices")
        return np.zeros(0, dtype=np.uint64)
    ends = np.flatnonzero(raw < 0x80)
    if len(ends) != count or ends[-1] != len(raw) - 1:
        raise SwarmError(f"AdaTopK packet: {len(ends)} indices where {count} were announced")
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > 9:
        raise SwarmError("AdaTopK packet: index too long")
    pos = np.arange(len(raw)) - np.repeat(starts, lengths)
    return np.add.reduceat((raw & 0x7F).astype(np.uint64) << (7 * pos).astype(np.uint64), starts)


def _index_bytes_estimate(k: int, numel: int) -> float:
    if k == 0:
        return 0.0
    gap_bytes = max(1.0, math.ceil(math.log2(max(numel / k, 1.0) + 1) / 7))
    return min(k * gap_bytes, numel / 8)


def _packet_bytes(k: int, numel: int, ndim: int, with_indices: bool = True) -> float:
    head = _HEAD.size + 8 * ndim + _TAIL.size
    return head + (_index_bytes_estimate(k, numel) if with_indices else 0) + 4 * math.ceil(k / BLOCK) + k


def _packet2_bytes(k: int, numel: int, ndim: int, bits: int, with_indices: bool = True) -> float:
    head = _HEAD2.size + 8 * ndim + _TAIL2.size
    index = 0.0 if not with_indices or k == numel else min(rice.estimate_bytes(k, numel), numel / 8)
    return head + index + lowbit.value_bytes(k, bits)


def keep_for_ratio(numel: int, element_bytes: int, ratio: float, ndim: int = 1, bits: int | None = None) -> int:
    """The largest k (at least 1) whose packet is at most raw / ratio bytes (ATK1, ``bits`` None), or,
    for ATK2 packets of ``bits``-wide values, whose packet and the gradient's packet on its mask are
    together at most 2 raw / ratio: an ATK2 ratio counts both directions, as the link rule does."""
    if bits is None:
        budget, size = numel * element_bytes / ratio, lambda k: _packet_bytes(k, numel, ndim)
    else:
        budget = 2 * numel * element_bytes / ratio
        size = lambda k: _packet2_bytes(k, numel, ndim, bits) + _packet2_bytes(k, numel, ndim, bits, with_indices=False)
    lo, hi = 1, numel
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if size(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True)
class Packet:
    data: bytes
    indices: torch.Tensor     # sorted kept positions (the mask, kept for the backward pass)


def _quantise(values: torch.Tensor) -> tuple[bytes, bytes]:
    v = values.float()
    pad = (-len(v)) % BLOCK
    blocks = torch.nn.functional.pad(v, (0, pad)).view(-1, BLOCK)
    scales = blocks.abs().amax(dim=1) / 127.0
    q = torch.round(blocks / scales.clamp_min(1e-30)[:, None]).clamp(-127, 127).to(torch.int8).flatten()[: len(v)]
    return scales.cpu().numpy().astype("<f4").tobytes(), q.cpu().numpy().tobytes()


def _pack(x: torch.Tensor, indices: torch.Tensor, kind: int) -> bytes:
    if x.dtype not in CODES:
        raise SwarmError(f"AdaTopK: unsupported dtype {x.dtype}")
    flat = x.detach().flatten()
    values = flat[indices.to(flat.device)]
    if kind == VARINT:
        idx = indices.cpu().numpy().astype(np.int64)
        index_data = varint_encode(np.diff(idx, prepend=0))
    elif kind == BITMAP:
        index_data = _bitmap(indices.cpu().numpy(), flat.numel())
    else:
        index_data = b""
    scales, q = _quantise(values)
    head = _HEAD.pack(MAGIC, CODES[x.dtype], kind, x.dim(), 0) + struct.pack(f"<{x.dim()}q", *x.shape)
    return head + _TAIL.pack(len(indices), BLOCK, len(index_data)) + index_data + scales + q


def channel_dim(x: torch.Tensor) -> int:
    """The feature dimension: 1 for NCHW images, else the last (tokens x features)."""
    return 1 if x.dim() == 4 else max(x.dim() - 1, 0)


def channel_rms(x: torch.Tensor) -> torch.Tensor:
    """Root-mean-square of each channel over every position of a tensor of 2+ dims."""
    cd = channel_dim(x)
    return x.detach().float().pow(2).mean(dim=[d for d in range(x.dim()) if d != cd]).sqrt()


def top_k_positions(x: torch.Tensor, k: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted flat positions of the kept values: in every *position* (all dims but the channel dim)
    the ``k / positions`` largest ``|x| / scale`` (exactly k in all); one global top-k when the tensor has a single
    position, fewer than 16 channels or k below one per position. A position's choice depends on
    nothing else in the tensor: in a causal model no later token influences what an earlier one keeps."""
    cd = channel_dim(x)
    channels = x.shape[cd] if x.dim() else 1
    rows = x.numel() // max(channels, 1)
    z = x.detach().float().abs()
    if scale is not None and scale.numel() == channels and x.dim() > 1:
        shape = [1] * x.dim()
        shape[cd] = channels
        z = z / scale.to(z.device).clamp_min(1e-12).view(shape)
    if rows <= 1 or channels < 16 or k < rows:
        return torch.topk(z.flatten(), k, sorted=False).indices.sort().values
    z = z.movedim(cd, -1)
    per_row, extra = divmod(k, rows)   # the first ``extra`` positions keep one more: exactly k in all
    take = min(per_row + (1 if extra else 0), channels)
    values, top = z.reshape(rows, channels).topk(take, dim=1, sorted=False)   # unsorted: 2-3x faster at large k
    chosen = torch.ones(rows, take, dtype=torch.bool, device=x.device)
    if take > per_row:   # positions from ``extra`` on keep ``per_row``: their smallest chosen value goes
        chosen[torch.arange(extra, rows, device=x.device), values[extra:].argmin(dim=1)] = False
    keep = torch.zeros(rows, channels, dtype=torch.bool, device=x.device)
    keep.scatter_(1, top, chosen)
    return keep.view(z.shape).movedim(-1, cd).flatten().nonzero().flatten()


def encode(x: torch.Tensor, ratio: float, scale: torch.Tensor | None = None, bits: int | None = None) -> Packet:
    """Compress ``x`` to about ``raw bytes / ratio`` (ratio <= 1: keep everything, still quantised);
    ``scale``: per-channel magnitudes that selection divides by (see ``ChannelScale``); ``bits``: an
    ATK2 packet of values that wide (None: ATK1, int8)."""
    numel = x.numel()
    k = numel if ratio <= 1 else keep_for_ratio(numel, x.element_size(), ratio, x.dim(), bits)
    indices = top_k_positions(x, k, scale) if k < numel else torch.arange(numel, device=x.device)
    if bits is not None:
        return Packet(_pack2(x, indices, bits), indices)
    kind = BITMAP if _index_bytes_estimate(len(indices), numel) >= numel / 8 else VARINT
    return Packet(_pack(x, indices, kind), indices)


def _pack2(x: torch.Tensor, indices: torch.Tensor, bits: int, reuse: bool = False) -> bytes:
    if x.dtype not in CODES:
        raise SwarmError(f"AdaTopK: unsupported dtype {x.dtype}")
    flat = x.detach().flatten()
    numel, k = flat.numel(), len(indices)
    if reuse:
        kind, index_data = REUSE, b""
    elif k == numel:
        kind, index_data = DENSE, b""
    else:
        positions = indices.cpu().numpy().astype(np.int64)
        if rice.rice_bytes(positions) < (numel + 7) // 8:
            kind, index_data = RICE, rice.rice_encode(positions)
        else:
            kind, index_data = BITMAP, _bitmap(positions, numel)
    values = flat if kind == DENSE else flat[indices.to(flat.device)]
    head = _HEAD2.pack(MAGIC2, CODES[x.dtype], kind, bits, x.dim()) + struct.pack(f"<{x.dim()}q", *x.shape)
    return head + _TAIL2.pack(k, lowbit.BLOCK, 0, len(index_data)) + index_data + lowbit.quantise(values, bits)


class ChannelScale:
    """Per-channel RMS of the tensors sent on one link, averaged (EMA) over *earlier* tensors. Selection
    divides by it so that a few large-magnitude channels (common in residual streams) do not take the
    whole budget, and no position of a tensor sees statistics of the tensor's other positions.
    ``bits``: the link's packets are ATK2 with values that wide (None: ATK1)."""

    def __init__(self, decay: float = 0.9, bits: int | None = None):
        self.decay = decay
        self.bits = bits
        self.scales: dict[tuple[str, int], torch.Tensor] = {}

    def encode(self, name: str, x: torch.Tensor, ratio: float) -> Packet:
        if x.dim() < 2:
            return encode(x, ratio, bits=self.bits)
        current = channel_rms(x)
        key = (name, current.numel())
        old = self.scales.get(key)
        packet = encode(x, ratio, old, self.bits)
        self.scales[key] = current if old is None else self.decay * old + (1 - self.decay) * current
        return packet


def encode_like(x: torch.Tensor, indices: torch.Tensor, bits: int | None = None) -> bytes:
    """Compress ``x`` on the positions of an earlier packet (no indices on the wire); ``bits``: an
    ATK2 packet of values that wide (None: ATK1)."""
    return _pack(x, indices, REUSE) if bits is None else _pack2(x, indices, bits, reuse=True)


MAX_EXPAND = 1024.0   # dense bytes per packet byte a receiver accepts (legitimate packets: about the ratio)


def max_expansion(ratio: float) -> float:
    """The most dense bytes per packet byte a packet sent at ``ratio`` can decode to: a gradient sent on
    its activation's mask carries no indices, so it expands more than its ratio (up to ~10x more, with
    9-byte varint gaps); ``decode`` accepts ``MAX_EXPAND`` or this, whichever is larger."""
    return max(MAX_EXPAND, 16.0 * ratio)


def decode(data: bytes, indices: torch.Tensor | None = None, max_numel: int = 1 << 28,
           device: str | torch.device = "cpu", max_expand: float = MAX_EXPAND) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense tensor, kept positions); ``indices`` must be given for a packet made by ``encode_like``.
    Every size is checked against the packet length, ``max_numel`` and ``max_expand`` (dense bytes per
    packet byte: a packet cannot claim a huge tensor of zeros) before anything is allocated."""
    if data[:4] == MAGIC2:
        return _decode2(data, indices, max_numel, device, max_expand)
    try:
        magic, code, kind, ndim, _ = _HEAD.unpack_from(data, 0)
        if magic != MAGIC or code not in DTYPES or kind not in (VARINT, BITMAP, REUSE) or ndim > MAX_NDIM:
            raise SwarmError("AdaTopK packet: bad header")
        shape = struct.unpack_from(f"<{ndim}q", data, _HEAD.size)
        k, block, n_index = _TAIL.unpack_from(data, _HEAD.size + 8 * ndim)
    except struct.error:
        raise SwarmError("AdaTopK packet: truncated header") from None
    numel = _bounded(shape, k, block, BLOCK, DTYPES[code], len(data), max_numel, max_expand)
    offset = _HEAD.size + 8 * ndim + _TAIL.size
    n_scales = math.ceil(k / BLOCK)
    if len(data) != offset + n_index + 4 * n_scales + k:
        raise SwarmError(f"AdaTopK packet: {len(data)} bytes, header announces {offset + n_index + 4 * n_scales + k}")
    index_data = data[offset: offset + n_index]
    if kind == VARINT:
        positions = np.cumsum(varint_decode(index_data, k).astype(np.int64))
    elif kind == BITMAP:
        positions = _bitmap_positions(index_data, numel)
    else:
        if indices is None or len(indices) != k:
            raise SwarmError("AdaTopK packet reuses a mask this node does not have")
        positions = None
    if positions is not None:
        if len(positions) != k or (k and (positions[-1] >= numel or positions[0] < 0)):
            raise SwarmError("AdaTopK packet: indices out of range")
        indices = torch.from_numpy(positions.astype(np.int64))
    start = offset + n_index
    scales = torch.from_numpy(np.frombuffer(data, dtype="<f4", count=n_scales, offset=start).copy())
    q = torch.from_numpy(np.frombuffer(data, dtype=np.int8, count=k, offset=start + 4 * n_scales).copy())
    return _scatter(q.float() * scales.repeat_interleave(BLOCK)[:k], indices, shape, DTYPES[code], device), indices


def _decode2(data: bytes, indices: torch.Tensor | None, max_numel: int, device: str | torch.device,
             max_expand: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``decode`` of an ATK2 packet: every size checked before anything is allocated."""
    try:
        _, code, kind, bits, ndim = _HEAD2.unpack_from(data, 0)
        if code not in DTYPES or kind not in (RICE, BITMAP, REUSE, DENSE) or bits not in BITS or ndim > MAX_NDIM:
            raise SwarmError(f"AdaTopK packet: bad header (dtype {code}, index kind {kind}, {bits} bits, {ndim} dims)")
        shape = struct.unpack_from(f"<{ndim}q", data, _HEAD2.size)
        k, block, _, n_index = _TAIL2.unpack_from(data, _HEAD2.size + 8 * ndim)
    except struct.error:
        raise SwarmError("AdaTopK packet: truncated header") from None
    numel = _bounded(shape, k, block, lowbit.BLOCK, DTYPES[code], len(data), max_numel, max_expand)
    offset = _HEAD2.size + 8 * ndim + _TAIL2.size
    expected = offset + n_index + lowbit.value_bytes(k, bits)
    if len(data) != expected:
        raise SwarmError(f"AdaTopK packet: {len(data)} bytes, header announces {expected}")
    index_data = memoryview(data)[offset: offset + n_index]
    if kind == RICE:
        positions = rice.rice_decode(index_data, k, numel)
    elif kind == BITMAP:
        positions = _bitmap_positions(index_data, numel)
        if len(positions) != k:
            raise SwarmError(f"AdaTopK packet: the bitmap holds {len(positions)} positions, the header {k}")
    elif kind == DENSE:
        if k != numel or n_index:
            raise SwarmError("AdaTopK packet: a dense packet keeps every position and carries no indices")
        positions = None
    else:
        if n_index or indices is None or len(indices) != k:
            raise SwarmError("AdaTopK packet reuses a mask this node does not have")
        positions = None
    values = lowbit.dequantise(memoryview(data)[offset + n_index:], k, bits)
    if kind == DENSE:
        return values.to(device, DTYPES[code]).view(shape), torch.arange(numel)
    if positions is not None:
        indices = torch.from_numpy(positions.astype(np.int64))
    return _scatter(values, indices, shape, DTYPES[code], device), indices


def _bitmap(positions: np.ndarray, numel: int) -> bytes:
    """Kept ``positions`` as a bitmap of ``numel`` bits (both layouts' index kind 1)."""
    bits = np.zeros(numel, dtype=bool)
    bits[positions] = True
    return np.packbits(bits).tobytes()


def _bitmap_positions(index_data, numel: int) -> np.ndarray:
    """The positions of a bitmap of ``numel`` bits (refused unless it is exactly that size)."""
    if len(index_data) != (numel + 7) // 8:
        raise SwarmError("AdaTopK packet: bitmap size does not match the shape")
    return np.flatnonzero(np.unpackbits(np.frombuffer(index_data, dtype=np.uint8))[:numel])


def _bounded(shape: tuple[int, ...], k: int, block: int, expected_block: int, dtype: torch.dtype, n_data: int,
             max_numel: int, max_expand: float) -> int:
    """The element count a packet's header claims, refused when out of bounds or out of proportion to
    the packet's ``n_data`` bytes (a decompression bomb): checked before anything is allocated."""
    numel = math.prod(shape)
    if any(d < 0 for d in shape) or numel > max_numel or not 0 <= k <= numel or block != expected_block:
        raise SwarmError(f"AdaTopK packet: shape {shape} / k {k} / block {block} out of bounds")
    if numel * dtype.itemsize > max_expand * n_data:
        raise SwarmError(f"AdaTopK packet: {n_data} bytes claim {numel * dtype.itemsize} dense bytes "
                         f"(more than {max_expand:g}x)")
    return numel


def _scatter(values: torch.Tensor, indices: torch.Tensor, shape, dtype: torch.dtype, device) -> torch.Tensor:
    """The dense tensor of ``shape`` holding ``values`` at the flat ``indices``, zeros elsewhere."""
    out = torch.zeros(math.prod(shape), dtype=dtype, device=device)
    out[indices.to(device)] = values.to(device, dtype)
    return out.view(shape)
