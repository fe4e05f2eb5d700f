"""AdaTopK codec: exact top-k kept, ratio met, mask reused backwards, round trip, hostile packets."""
import numpy as np
import pytest
import torch

from swarm.compression import decode, encode, encode_like
from swarm.compression.adatopk import ChannelScale, channel_dim, varint_decode, varint_encode
from swarm.errors import SwarmError


def kept_mask(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[idx] = True
    return mask.view(x.shape)


@pytest.mark.parametrize("shape", [(8, 64, 256), (4096,), (3, 5, 7), (2, 32, 6, 6)])
@pytest.mark.parametrize("ratio", [4, 10, 16, 32])
def test_keeps_the_exact_top_k_of_every_position_and_meets_the_ratio(shape, ratio):
    torch.manual_seed(sum(shape) + ratio)
    x = torch.randn(shape)
    packet = encode(x, ratio)
    k = len(packet.indices)
    if len(shape) == 1 or shape[channel_dim(x)] < 16:   # one position or few channels: one global top-k
        assert torch.equal(packet.indices, torch.topk(x.abs().flatten(), k).indices.sort().values)
    else:   # every position (all dims but the channel dim) keeps the same count: its largest values
        rows = x.movedim(channel_dim(x), -1).reshape(-1, x.shape[channel_dim(x)]).abs()
        keep = kept_mask(x, packet.indices).movedim(channel_dim(x), -1).reshape(rows.shape)
        assert set((keep.sum(1) - k // len(rows)).tolist()) <= {0, 1} and keep.sum() == k
        assert (rows.masked_fill(~keep, float("inf")).min(1).values >= rows.masked_fill(keep, 0).max(1).values).all()
    achieved = x.numel() * 4 / len(packet.data)
    if x.numel() >= 4096:
        assert abs(achieved / ratio - 1) <= 0.10, achieved
    else:
        assert achieved <= ratio * 1.10   # tiny tensors: the header caps the ratio
    y, idx = decode(packet.data)
    assert torch.equal(idx, packet.indices) and y.shape == x.shape
    kept = x.flatten()[idx]
    assert torch.allclose(y.flatten()[idx], kept, atol=kept.abs().max().item() / 127 + 1e-6)
    assert (y.flatten()[~kept_mask(x, idx).flatten()] == 0).all()


def test_channel_scale_spreads_the_budget_over_channels_and_looks_only_backwards():
    torch.manual_seed(0)
    loud = torch.randn(4, 32, 64)
    loud[..., :4] *= 100          # four outlier channels, as in a transformer's residual stream
    plain = kept_mask(loud, encode(loud, 10).indices)
    assert plain[..., :4].float().mean() > 0.9   # plain top-k: outliers first
    scales = ChannelScale()
    first = scales.encode("x0", loud, 10)              # no history yet: plain selection
    assert torch.equal(first.indices, encode(loud, 10).indices)
    spread = kept_mask(loud, scales.encode("x0", loud.clone(), 10).indices)
    assert spread[..., :4].float().mean() < 0.5 and spread[..., 4:].float().mean() > plain[..., 4:].float().mean()
    later = loud.clone()
    later[:, 20:] = torch.randn(4, 12, 64) * 1000    # later tokens change: earlier ones keep the same values
    scales2 = ChannelScale()
    scales2.encode("x0", loud, 10)
    again = kept_mask(loud, scales2.encode("x0", later, 10).indices)
    assert torch.equal(again[:, :20], spread[:, :20])


def test_backward_reuses_the_forward_mask():
    torch.manual_seed(0)
    act, grad = torch.randn(16, 128), torch.randn(16, 128)
    packet = encode(act, 10)
    data = encode_like(grad, packet.indices)
    assert len(data) < len(packet.data)   # no indices on the wire
    g, idx = decode(data, packet.indices)
    assert torch.equal(idx, packet.indices)
    assert torch.allclose(g.flatten()[idx], grad.flatten()[idx], atol=grad.abs().max().item() / 127 + 1e-6)
    with pytest.raises(SwarmError, match="reuses a mask"):
        decode(data)


def test_ratio_one_is_lossless_up_to_int8_and_dtypes_round_trip():
    x = torch.randn(300).to(torch.float16)
    y, _ = decode(encode(x, 1).data)
    assert y.dtype == torch.float16 and torch.allclose(y.float(), x.float(), atol=x.abs().max().item() / 127 + 1e-3)


def test_varint_round_trip():
    values = np.array([0, 1, 127, 128, 16383, 16384, 2**35, 5], dtype=np.uint64)
    assert np.array_equal(varint_decode(varint_encode(values), len(values)), values)


@pytest.mark.parametrize("mutate", [
    lambda d: d[:10],                                   # truncated
    lambda d: b"XXXX" + d[4:],                          # wrong magic
    lambda d: d + b"\x00",                              # trailing byte
    lambda d: d[:8] + (2**40).to_bytes(8, "little") + d[16:],   # huge shape
])
def test_hostile_packets_are_refused_in_one_error(mutate):
    data = encode(torch.randn(64, 64), 10).data
    with pytest.raises(SwarmError):
        decode(mutate(data), max_numel=1 << 20)


def test_ties_at_the_threshold_still_keep_exactly_k():
    x = torch.cat([torch.full((3000,), 2.0), torch.ones(5000)])[torch.randperm(8000, generator=torch.Generator().manual_seed(1))]
    packet = encode(x, 8)
    k = len(packet.indices)
    dropped = torch.ones(8000, dtype=torch.bool)
    dropped[packet.indices] = False
    assert len(set(packet.indices.tolist())) == k and x[packet.indices].abs().min() >= x[dropped].abs().max()
