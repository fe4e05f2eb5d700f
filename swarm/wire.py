"""The wire format between pipeline neighbours: versioned frames of tensors and metadata, no pickle.

    frame   = b"SWM1" | u32 header length | header (msgpack map) | payload
    header  = {"v": 1, "kind": str, "meta": {str: int | float | str | bool | None},
               "tensors": [{"name": str, "dtype": str, "shape": [int], "codec": "raw" | "adatopk" | "bf16",
                            "nbytes": int}]}
    payload = the tensors' bytes, in header order (raw: C-contiguous little-endian; adatopk: a packet
              of ``swarm.compression``)

Parsing is two steps, so that a receiver can check who sent a frame, what kind it is and whether its
tensors are the ones it expects before a single tensor is built: ``read_header`` checks the magic,
version, header size, names, dtypes, codecs, shapes, element counts, byte counts and the decoded size
(per tensor, per frame, and against the bytes the tensor takes on the wire: nothing is sized from a
peer's claim alone) against ``Limits`` and the frame's real length; ``decode`` then builds the
tensors. ``unpack`` is both. A malformed or oversized frame costs one ``SwarmError``. See docs/wire.md.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

import msgpack
import torch

from swarm.compression import adatopk
from swarm.errors import SwarmError

MAGIC = b"SWM1"
VERSION = 1
_PREFIX = struct.Struct("<4sI")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "int64": torch.int64, "int32": torch.int32, "int8": torch.int8, "bool": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}
META_TYPES = (int, float, str, bool, type(None))


CODECS = frozenset({"raw", "adatopk", "bf16"})   # bf16: a float32 tensor sent as its bfloat16 rounding
MAX_EXPAND = 1024.0   # decoded bytes per wire byte of an AdaTopK tensor (raw tensors: exactly 1)


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int = 64 << 10
    max_tensors: int = 64
    max_ndim: int = 8
    max_numel: int = 1 << 28          # per tensor
    max_frame_bytes: int = 1 << 30
    dtypes: frozenset = field(default_factory=lambda: frozenset(DTYPES))
    max_decoded_bytes: int = 1 << 30  # all tensors of one frame, decoded
    max_expand: float = MAX_EXPAND    # decoded bytes / wire bytes of one tensor
    codecs: frozenset = CODECS        # the codecs this receiver accepts (the state protocol: raw only)


@dataclass(frozen=True)
class Header:
    """A frame's checked header: nothing decoded yet. ``entries``: name, dtype, shape, codec, nbytes."""
    kind: str
    meta: dict
    entries: list[dict]
    offset: int                       # where the payload starts

    def shapes(self) -> dict[str, tuple[list[int], str, str]]:
        """name -> (shape, dtype name, codec), in frame order."""
        return {e["name"]: (e["shape"], e["dtype"], e["codec"]) for e in self.entries}

    @property
    def decoded_bytes(self) -> int:
        return sum(decoded_bytes(e) for e in self.entries)


def decoded_bytes(entry: dict) -> int:
    return math.prod(entry["shape"]) * DTYPES[entry["dtype"]].itemsize


@dataclass
class Message:
    kind: str
    meta: dict
    tensors: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)   # adatopk kept positions, by tensor
    sizes: dict[str, int] = field(default_factory=dict)            # bytes each tensor took on the wire


def pack(kind: str, meta: dict, tensors: dict[str, torch.Tensor], ratios: dict[str, float] | None = None,
         reuse: dict[str, torch.Tensor] | None = None, scales: adatopk.ChannelScale | None = None,
         reuse_bits: int | None = None, half: frozenset[str] = frozenset()) -> tuple[bytes, dict[str, torch.Tensor]]:
    """One frame; ``ratios[name] > 1`` sends that tensor AdaTopK-compressed (selection normalised by
    the link's ``scales``, packets of its ``bits``), ``reuse[name]`` sends it on an earlier mask (values
    of ``reuse_bits``: ATK2; None: ATK1); a float32 tensor named in ``half`` and not compressed goes as
    bfloat16 (codec ``bf16``, half the bytes). Returns (frame, masks used) so the caller can reuse them
    backwards."""
    ratios, reuse = ratios or {}, reuse or {}
    entries, chunks, masks = [], [], {}
    for name, t in tensors.items():
        t = t.detach()
        if t.dtype not in NAMES:
            raise SwarmError(f"wire: tensor '{name}' has unsupported dtype {t.dtype}")
        if name in reuse:
            data, codec = adatopk.encode_like(t, reuse[name], reuse_bits), "adatopk"
            masks[name] = reuse[name]
        elif ratios.get(name, 1.0) > 1.0 and t.is_floating_point():
            packet = scales.encode(name, t, ratios[name]) if scales else adatopk.encode(t, ratios[name])
            data, codec, masks[name] = packet.data, "adatopk", packet.indices
        elif name in half and t.dtype == torch.float32:
            data, codec = t.contiguous().cpu().to(torch.bfloat16).view(-1).view(torch.uint8).numpy().tobytes(), "bf16"
        else:
            data, codec = t.contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes(), "raw"
        entries.append({"name": name, "dtype": NAMES[t.dtype], "shape": list(t.shape), "codec": codec, "nbytes": len(data)})
        chunks.append(data)
    header = msgpack.packb({"v": VERSION, "kind": kind, "meta": meta, "tensors": entries}, use_bin_type=True)
    return b"".join([_PREFIX.pack(MAGIC, len(header)), header, *chunks]), masks   # one copy of the payload


def unpack(frame: bytes, limits: Limits = Limits(), masks: dict[str, torch.Tensor] | None = None) -> Message:
    """Parse a frame (every bound checked first); ``masks`` for tensors sent on a reused mask."""
    return decode(frame, read_header(frame, limits), limits, masks)


def read_header(frame: bytes, limits: Limits = Limits()) -> Header:
    """The frame's header, every bound checked against ``limits`` and the frame's length; no tensor is
    built (the receiver checks the sender, the kind and the shapes it expects before ``decode``)."""
    if len(frame) > limits.max_frame_bytes:
        raise SwarmError(f"wire: frame of {len(frame)} bytes exceeds {limits.max_frame_bytes}")
    try:
        magic, header_len = _PREFIX.unpack_from(frame, 0)
    except struct.error:
        raise SwarmError("wire: truncated frame") from None
    if magic != MAGIC:
        raise SwarmError("wire: not a swarm frame (bad magic)")
    if header_len > limits.max_header_bytes or _PREFIX.size + header_len > len(frame):
        raise SwarmError(f"wire: header of {header_len} bytes is too large or truncated")
    try:
        header = msgpack.unpackb(frame[_PREFIX.size:_PREFIX.size + header_len], raw=False, strict_map_key=True)
    except Exception as e:
        raise SwarmError(f"wire: unreadable header ({type(e).__name__})") from None
    entries = _check_header(header, limits)
    offset = _PREFIX.size + header_len
    if offset + sum(e["nbytes"] for e in entries) != len(frame):
        raise SwarmError("wire: payload length does not match the header")
    total = sum(decoded_bytes(e) for e in entries)
    if total > limits.max_decoded_bytes:
        raise SwarmError(f"wire: tensors of {total} bytes decoded (limit {limits.max_decoded_bytes} per frame)")
    return Header(header["kind"], header["meta"], entries, offset)


def decode(frame: bytes, header: Header, limits: Limits = Limits(), masks: dict[str, torch.Tensor] | None = None) -> Message:
    """The tensors of a frame whose ``header`` came from ``read_header(frame, limits)``."""
    tensors, kept, offset = {}, {}, header.offset
    for e in header.entries:
        data = frame[offset: offset + e["nbytes"]]
        offset += e["nbytes"]
        dtype = DTYPES[e["dtype"]]
        if e["codec"] == "raw":
            numel = math.prod(e["shape"])
            if e["nbytes"] != numel * dtype.itemsize:
                raise SwarmError(f"wire: tensor '{e['name']}' has {e['nbytes']} bytes for shape {e['shape']}")
            tensors[e["name"]] = torch.frombuffer(bytearray(data), dtype=dtype).view(e["shape"]) if numel else \
                torch.empty(e["shape"], dtype=dtype)
        elif e["codec"] == "bf16":   # float32 and 2 bytes an element: ``read_header`` checked it
            tensors[e["name"]] = torch.frombuffer(bytearray(data), dtype=torch.bfloat16).view(e["shape"]).float() \
                if e["nbytes"] else torch.empty(e["shape"], dtype=dtype)
        else:
            t, kept[e["name"]] = adatopk.decode(data, (masks or {}).get(e["name"]), max_numel=limits.max_numel,
                                                max_expand=limits.max_expand)
            if list(t.shape) != e["shape"] or t.dtype != dtype:
                raise SwarmError(f"wire: tensor '{e['name']}' packet does not match its header")
            tensors[e["name"]] = t
    return Message(header.kind, header.meta, tensors, kept, {e["name"]: e["nbytes"] for e in header.entries})


def non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The first floating tensor with a NaN or an infinity, described (None: all finite)."""
    for name, t in tensors.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            what = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            return f"tensor '{name}' has {what}"
    return None


def sizes(frame: bytes) -> dict[str, int]:
    """Bytes each tensor takes in a frame this node packed (read from its header)."""
    _, header_len = _PREFIX.unpack_from(frame, 0)
    header = msgpack.unpackb(frame[_PREFIX.size:_PREFIX.size + header_len], raw=False)
    return {e["name"]: e["nbytes"] for e in header["tensors"]}


def _check_header(header, limits: Limits) -> list[dict]:
    if not isinstance(header, dict) or header.get("v") != VERSION:
        raise SwarmError(f"wire: unsupported header version {header.get('v') if isinstance(header, dict) else None!r}")
    kind, meta, entries = header.get("kind"), header.get("meta"), header.get("tensors")
    if not isinstance(kind, str) or not isinstance(meta, dict) or not isinstance(entries, list):
        raise SwarmError("wire: header needs kind (str), meta (map) and tensors (list)")
    if not all(isinstance(k, str) and isinstance(v, META_TYPES) for k, v in meta.items()):
        raise SwarmError("wire: meta values must be scalars")
    if len(entries) > limits.max_tensors:
        raise SwarmError(f"wire: {len(entries)} tensors (limit {limits.max_tensors})")
    names = set()
    for e in entries:
        if not (isinstance(e, dict) and isinstance(e.get("name"), str) and e.get("dtype") in limits.dtypes
                and e.get("codec") in CODECS and isinstance(e.get("shape"), list)
                and isinstance(e.get("nbytes"), int) and e["nbytes"] >= 0):
            raise SwarmError(f"wire: malformed tensor entry {str(e)[:80]}")
        if e["codec"] not in limits.codecs:
            raise SwarmError(f"wire: tensor '{e['name']}' uses codec '{e['codec']}' (accepted: {', '.join(sorted(limits.codecs))})")
        shape = e["shape"]
        if len(shape) > limits.max_ndim or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise SwarmError(f"wire: tensor '{e['name']}' has a bad shape {shape[:10]}")
        if math.prod(shape) > limits.max_numel:
            raise SwarmError(f"wire: tensor '{e['name']}' has {math.prod(shape)} elements (limit {limits.max_numel})")
        if e["codec"] == "adatopk" and decoded_bytes(e) > limits.max_expand * e["nbytes"]:
            raise SwarmError(f"wire: tensor '{e['name']}' would decode {e['nbytes']} bytes to {decoded_bytes(e)} "
                             f"(more than {limits.max_expand:g}x)")
        if e["codec"] == "bf16" and (e["dtype"] != "float32" or e["nbytes"] != 2 * math.prod(shape)):
            raise SwarmError(f"wire: bf16 tensor '{e['name']}' takes 2 bytes per float32 element, not "
                             f"{e['nbytes']} bytes for {e['dtype']} {shape[:10]}")
        if e["name"] in names:
            raise SwarmError(f"wire: tensor '{e['name']}' appears twice")
        names.add(e["name"])
    return entries
