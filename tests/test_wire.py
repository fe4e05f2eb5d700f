"""Wire frames: round trip of raw and compressed tensors; every malformed frame is one SwarmError."""
import msgpack
import pytest
import torch

from swarm.errors import SwarmError
from swarm.wire import Limits, pack, unpack


def test_round_trip_raw_and_compressed():
    torch.manual_seed(0)
    tensors = {"h": torch.randn(4, 32, 64), "ids": torch.arange(12).view(3, 4), "half": torch.randn(5).half(),
               "bf": torch.randn(7).bfloat16(), "empty": torch.zeros(0, 3)}
    frame, masks = pack("forward", {"step": 3, "mb": 1, "note": "x"}, tensors, ratios={"h": 10})
    msg = unpack(frame)
    assert msg.kind == "forward" and msg.meta == {"step": 3, "mb": 1, "note": "x"}
    for name in ("ids", "half", "bf", "empty"):
        assert torch.equal(msg.tensors[name], tensors[name]) and msg.tensors[name].dtype == tensors[name].dtype
    assert torch.equal(msg.masks["h"], masks["h"]) and msg.tensors["h"].shape == tensors["h"].shape
    back, _ = pack("backward", {"step": 3}, {"h": torch.randn(4, 32, 64)}, reuse={"h": masks["h"]})
    assert len(back) < len(frame) and unpack(back, masks={"h": msg.masks["h"]}).tensors["h"].shape == (4, 32, 64)


def frame_with(header: dict, payload: bytes = b"") -> bytes:
    raw = msgpack.packb(header)
    return b"SWM1" + len(raw).to_bytes(4, "little") + raw + payload


GOOD = {"v": 1, "kind": "forward", "meta": {}, "tensors": [{"name": "h", "dtype": "float32", "shape": [2], "codec": "raw", "nbytes": 8}]}


@pytest.mark.parametrize("frame, message", [
    (b"garbage", "truncated|magic"),
    (b"SWM1" + (10**9).to_bytes(4, "little"), "header"),
    (frame_with({**GOOD, "v": 2}, bytes(8)), "version"),
    (frame_with(GOOD, bytes(7)), "payload length"),
    (frame_with({**GOOD, "tensors": [{**GOOD["tensors"][0], "shape": [10**6, 10**6]}]}, bytes(8)), "elements"),
    (frame_with({**GOOD, "tensors": [{**GOOD["tensors"][0], "dtype": "object"}]}, bytes(8)), "malformed"),
    (frame_with({**GOOD, "tensors": [{**GOOD["tensors"][0], "shape": [3]}]}, bytes(8)), "bytes for shape"),
    (frame_with({**GOOD, "meta": {"x": [1, 2]}}, bytes(8)), "scalars"),
    (frame_with({**GOOD, "tensors": GOOD["tensors"] * 2}, bytes(16)), "twice"),
    (frame_with({**GOOD, "tensors": [{**GOOD["tensors"][0], "codec": "adatopk"}]}, bytes(8)), "AdaTopK"),
])
def test_malformed_frames_are_refused(frame, message):
    with pytest.raises(SwarmError, match=message):
        unpack(frame, Limits(max_numel=1 << 20))


def test_oversized_frame_is_refused_before_parsing():
    frame, _ = pack("forward", {}, {"h": torch.zeros(1000)})
    with pytest.raises(SwarmError, match="exceeds"):
        unpack(frame, Limits(max_frame_bytes=1000))
