"""The codec family for home links (docs/wire.md): Rice-coded indices, low-bit values with bfloat16
block steps, ATK2 packets (round trip, ratio, the mask reused backwards), bfloat16 on the wire, and
hostile packets refused in one error before anything sized by their claims is allocated (fuzzed)."""
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.compression import lowbit, rice
from swarm.compression.adatopk import MAGIC2, ChannelScale, decode, encode, encode_like, top_k_positions
from swarm.errors import SwarmError
from swarm.messages import HALF_BITS, Forward, Grads
from swarm.wire import pack, read_header, unpack


@settings(max_examples=150, deadline=None)
@given(numel=st.integers(1, 5000), data=st.data())
def test_rice_coding_round_trips_any_set_of_positions(numel, data):
    k = data.draw(st.integers(0, min(numel, 600)))
    positions = np.sort(np.random.default_rng(numel + k).choice(numel, k, replace=False)).astype(np.int64)
    coded = rice.rice_encode(positions)
    assert len(coded) == rice.rice_bytes(positions)
    assert np.array_equal(rice.rice_decode(coded, k, numel), positions)


def test_rice_coding_takes_about_the_entropy_of_the_gaps():
    positions = np.sort(np.random.default_rng(0).choice(10**6, 120_000, replace=False))
    bits = 8 * len(rice.rice_encode(positions)) / len(positions)
    assert 4.3 < bits < 4.8            # entropy of geometric gaps at 12% kept: ~4.4 bits; a bitmap: 8.3
    assert abs(rice.estimate_bytes(120_000, 10**6) / rice.rice_bytes(positions) - 1) < 0.1


@pytest.mark.parametrize("bits", lowbit.BITS)
def test_low_bit_values_are_within_half_a_step_and_stochastic_rounding_is_unbiased(bits):
    torch.manual_seed(bits)
    v = torch.randn(4000) * torch.logspace(-9, 3, 4000)   # tiny and large blocks: bfloat16 steps keep both
    data = lowbit.quantise(v, bits)
    assert len(data) == lowbit.value_bytes(4000, bits)
    w = lowbit.dequantise(data, 4000, bits)
    steps = (v.view(-1, lowbit.BLOCK).abs().amax(1) * 2 / ((1 << bits) - 1)).repeat_interleave(lowbit.BLOCK)
    assert bool(((w - v).abs() <= steps * 0.51 + 1e-30).all())       # nearest level; no block clipped
    c = torch.full((lowbit.BLOCK * 400,), 0.3)
    c[:: lowbit.BLOCK] = 1.0                                         # every block: max 1.0, the rest between levels
    mean = lowbit.dequantise(lowbit.quantise(c, bits, generator=torch.Generator().manual_seed(0)), c.numel(), bits)
    assert abs(float(mean[c == 0.3].mean()) - 0.3) < 0.01


@pytest.mark.parametrize("bits", lowbit.BITS)
@pytest.mark.parametrize("ratio", [16, 32, 64, 100])
def test_an_atk2_packet_keeps_the_top_k_of_every_position_meets_the_ratio_both_ways_and_is_reused_backwards(bits, ratio):
    torch.manual_seed(ratio + bits)
    x = torch.randn(4, 128, 256)
    packet = encode(x, ratio, bits=bits)
    g = torch.randn_like(x)
    back = encode_like(g, packet.indices, bits)
    assert packet.data[:4] == MAGIC2
    assert 0.97 < 2 * x.numel() * 4 / (len(packet.data) + len(back)) / ratio < 1.06   # both directions, as the rule
    assert torch.equal(packet.indices, top_k_positions(x, len(packet.indices)))
    y, kept = decode(packet.data)
    assert torch.equal(kept, packet.indices) and bool((y.flatten()[kept] != 0).all())
    step = x.flatten()[kept].abs().max() * 2 / ((1 << bits) - 1)
    assert float((y.flatten()[kept] - x.flatten()[kept]).abs().max()) <= float(step) * 0.51
    assert len(back) < len(packet.data) * 0.75                   # values only: the mask is not sent again
    gy, _ = decode(back, packet.indices)
    assert bool((gy.flatten()[torch.ones(x.numel(), dtype=torch.bool).index_fill_(0, kept, False)] == 0).all())


def test_more_bits_or_fewer_kept_at_the_same_ratio_and_a_dense_packet_when_everything_fits():
    x = torch.randn(4, 128, 256)
    kept = {bits: len(encode(x, 32, bits=bits).indices) for bits in lowbit.BITS}
    assert kept[2] > kept[4] > kept[8] > len(encode(x, 32).indices) * 0.9   # ATK1 (int8, varint) keeps the least
    dense = encode(x, 4, bits=2)   # 2-bit values of every position already fit 4x
    assert len(dense.indices) == x.numel()
    y, _ = decode(dense.data)
    assert y.shape == x.shape and float(((y - x) ** 2).mean()) < 0.25


def _values_at(data: bytes) -> int:
    """Where an ATK2 packet's values (block steps, then codes) start."""
    _, _, _, bits, ndim = struct.unpack_from("<4sBBBB", data, 0)
    k = struct.unpack_from("<q", data, 8 + 8 * ndim)[0]
    return len(data) - lowbit.value_bytes(k, bits)


def _hostile(data: bytes, field: str) -> bytes:
    """``data`` with one field broken (layout: magic, dtype, index kind, bits, ndim, shape, k, block,
    pad, index bytes; docs/wire.md)."""
    tail = 8 + 8 * data[7]
    return {
        "bits": lambda: data[:6] + bytes([3]) + data[7:],
        "kind": lambda: data[:5] + bytes([9]) + data[6:],
        "truncated": lambda: data[: len(data) // 2],
        "k": lambda: data[:tail] + struct.pack("<q", 1 << 40) + data[tail + 8:],
        "shape": lambda: data[:8] + struct.pack("<q", 1 << 12) + data[16:],      # the decompression bomb
        "scale": lambda: data[:_values_at(data)] + b"\x80\x7f" + data[_values_at(data) + 2:],   # a step of +inf
        "index": lambda: data[:tail + 12] + struct.pack("<I", 7) + data[tail + 16:],
    }[field]()


@pytest.mark.parametrize("field,message", [
    ("bits", "3 bits"), ("kind", "index kind 9"), ("truncated", "bytes"), ("k", "out of bounds"),
    ("shape", "claim"), ("scale", "finite"), ("index", "header announces")])
def test_each_hostile_atk2_field_is_refused_in_one_line(field, message):
    data = encode(torch.randn(16, 256), 32, bits=4).data
    with pytest.raises(SwarmError, match=message) as e:
        decode(_hostile(data, field), max_numel=1 << 22)
    assert "\n" not in str(e.value)


@settings(max_examples=300, deadline=None)
@given(bits=st.sampled_from(lowbit.BITS), ratio=st.sampled_from([1, 8, 32, 100]), data=st.data())
def test_fuzzed_atk2_packets_decode_to_their_claimed_size_or_are_refused(bits, ratio, data):
    torch.manual_seed(ratio)
    packet = bytearray(encode(torch.randn(8, 96), ratio, bits=bits).data)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "grow"]))
        if op == "flip" and packet:
            i = data.draw(st.integers(0, len(packet) - 1))
            packet[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del packet[data.draw(st.integers(0, len(packet))):]
        else:
            packet += bytes(data.draw(st.binary(max_size=16)))
    try:
        y, kept = decode(bytes(packet), max_numel=1 << 16)
    except SwarmError as e:
        assert "\n" not in str(e)
        return
    assert y.numel() * 4 <= 1024 * max(len(packet), 1) and y.numel() <= 1 << 16 and len(kept) <= y.numel()


def test_bfloat16_on_the_wire_halves_uncompressed_frames_and_gradients_follow():
    x = torch.randn(2, 16, 32)
    fwd = Forward(0, 0, 1.0, [x], torch.zeros(2, 16, dtype=torch.int64))
    full, _ = fwd.to_frame()
    half, masks = fwd.to_frame(half=True)
    assert masks == {} and 0 <= x.numel() * 2 - (len(full) - len(half)) <= 16   # the header says gbits, bf16
    msg = unpack(half)
    assert msg.meta["gbits"] == HALF_BITS and torch.equal(msg.tensors["x0"], x.to(torch.bfloat16).float())
    assert msg.tensors["targets"].dtype == torch.int64
    received = Forward.from_message(msg)
    reply = Grads(0, 0, 1.0, [x]).to_frame(received.masks, received.grad_bits)
    assert read_header(reply).shapes()["g0"] == ([2, 16, 32], "float32", "bf16")
    compressed, _ = fwd.to_frame(16, ChannelScale(bits=4))
    assert unpack(compressed).meta["gbits"] == 4


@pytest.mark.parametrize("entry,message", [
    ({"dtype": "float16"}, "2 bytes per float32 element"), ({"nbytes": 6}, "2 bytes per float32 element")])
def test_a_bf16_entry_that_is_not_half_of_a_float32_tensor_is_refused_from_its_header(entry, message):
    frame, _ = pack("forward", {}, {"h": torch.randn(4)}, half=frozenset({"h"}))
    header = read_header(frame)
    import msgpack
    bad = dict(header.entries[0], **entry)
    body = msgpack.packb({"v": 1, "kind": "forward", "meta": {}, "tensors": [bad]}, use_bin_type=True)
    payload = frame[header.offset:][: bad["nbytes"]].ljust(bad["nbytes"], b"\0")
    with pytest.raises(SwarmError, match=message):
        read_header(struct.pack("<4sI", b"SWM1", len(body)) + body + payload)


def test_a_forward_asking_for_gradients_in_unknown_bits_is_refused():
    from swarm.errors import RemoteProtocolError
    frame, _ = pack("forward", {"step": 0, "mb": 0, "scale": 1.0, "gbits": 3}, {"x0": torch.randn(2, 4)})
    with pytest.raises(RemoteProtocolError, match="bad gradient bits 3"):
        Forward.from_message(unpack(frame))


def test_the_measured_table_gives_each_codec_its_safe_ratio_and_the_cheapest_codec_per_ratio():
    from swarm.compression.measured import Cost, choose, gap_at, safe_ratio
    costs = {"q4": (Cost(16, 16.3, -2.5, 0.5), Cost(32, 32.8, 0.0, 1.0), Cost(64, 65.7, 3.0, 1.0)),   # worst: mean + std
             "q2": (Cost(16, 16.0, 0.0, 0.5), Cost(32, 32.8, 1.5, 1.0), Cost(64, 66.0, 2.5, 1.0), Cost(100, 103, 1.0, 1))}
    assert safe_ratio("q4", 3.0, costs) == pytest.approx(32 * 2 ** (2 / 3))     # 1% at 32x, 4% at 64x: 3% at 50.8x
    assert safe_ratio("q2", 3.0, costs) == pytest.approx(32 * 2 ** 0.5)         # q2's 100x row lies past a gap
    assert safe_ratio(("q4", "q2"), 3.0, costs) == pytest.approx(32 * 2 ** (2 / 3))
    assert safe_ratio("q4", 0.5, costs) == pytest.approx(16 * 2 ** (2.5 / 3))
    assert safe_ratio("q8", 3.0, costs) == 1.0                                  # nothing measured: nothing trusted
    assert gap_at("q4", 1.0, costs) == 0 and gap_at("q4", 32, costs) == 1.0 and gap_at("q4", 65, costs) == float("inf")
    assert gap_at("q4", 32 * 2 ** 0.5, costs) == pytest.approx(2.5)
    assert choose(24, 3.0, ("q4", "q2"), costs) == ("q4", 24)                  # both hold 24x; q4 costs less there
    q2_only = {"q4": costs["q4"][:1], "q2": costs["q2"]}
    assert choose(40, 3.0, ("q4", "q2"), q2_only) == ("q2", 40)                # past q4's last row, q2 still holds
    codec, capped = choose(80, 3.0, ("q4", "q2"), costs)
    assert codec == "q4" and capped == pytest.approx(32 * 2 ** (2 / 3))        # beyond the safe ratio: at it
    assert choose(50, 3.0, ("q8",), costs) == (None, 50)
    spread = {"q4": (Cost(32, 32, 2.0, 2.0),)}     # 2% on average, 4% one seed in three: not trusted at 32x
    assert safe_ratio("q4", 3.0, spread) < 32


def test_the_config_caps_at_the_shipped_table_and_auto_picks_the_codec_per_ratio():
    from swarm.compression.measured import safe_ratio, table
    from swarm.compression.policy import LinkPolicy
    from swarm.config import AUTO_CODECS, CODEC_BITS, CompressionConfig
    from swarm.scheduler.costs import PlanSettings
    shipped = table()
    assert set(AUTO_CODECS) <= set(shipped) and "adatopk" in shipped   # benchmarks/compression.py --table-out
    for codec in ("adatopk", *AUTO_CODECS):
        assert CompressionConfig(codec=codec).cap() == safe_ratio(codec) > 1
    assert CompressionConfig(codec="auto").cap() == safe_ratio(AUTO_CODECS) >= max(safe_ratio(c) for c in AUTO_CODECS)
    assert CompressionConfig().codec == "auto" and CompressionConfig().cap() >= 32   # q4 holds 32x (docs/benchmarks.md)
    assert CompressionConfig(codec="q4", max_ratio=7).cap() == 7 and PlanSettings.max_ratio == 16
    assert CompressionConfig(codec="q4", max_loss_pct=1e-6).cap() <= safe_ratio("q4")
    policy = LinkPolicy("fixed", 1.0, 1.0, 1, 1e9, codec="auto")
    assert all(policy.bits_for(r) in [CODEC_BITS[c] for c in AUTO_CODECS] for r in (2, 16, 32, 100))
    assert LinkPolicy("fixed", 1.0, 1.0, 1, 1e9, codec="q2").bits_for(32) == 2
    assert LinkPolicy("fixed", 1.0, 1.0, 1, 1e9, codec="adatopk").bits_for(32) is None   # ATK1 packets
    assert LinkPolicy("fixed", 1.0, 1.0, 1, 1e9).bits_for(32) == 4   # auto, by default: q4 at 32x (the table)


def test_a_bfloat16_wire_halves_what_the_planner_and_the_policy_price_for_an_uncompressed_link():
    from swarm.scheduler.costs import PlanSettings, link_time, ratio_for
    full, half = PlanSettings(), PlanSettings(wire_fraction=0.5)
    assert link_time(1e6, 1e8, 1, 1.0, half) == link_time(1e6, 1e8, 1, 1.0, full) / 2
    assert link_time(1e6, 1e8, 1, 8.0, half) == link_time(1e6, 1e8, 1, 8.0, full)   # a ratio counts from fp32 bytes
    budget = link_time(1e6, 1e8, 1, 1.0, full) * 0.6   # too slow raw in fp32, fast enough in bf16
    assert ratio_for(1e6, 1e8, 1, budget, full) > 1 and ratio_for(1e6, 1e8, 1, budget, half) == 1.0
    tight = link_time(1e6, 1e8, 1, 1.0, full) / 4
    assert ratio_for(1e6, 1e8, 1, tight, half) == ratio_for(1e6, 1e8, 1, tight, full)


@pytest.mark.parametrize("codec,half", [("q4", False), ("auto", False), ("adatopk", True)])
def test_a_pipeline_sends_the_configured_packets_both_ways_and_bf16_when_uncompressed(codec, half):
    """Three stages of gpt2-tiny in one process (frames, masks, the link policy): at a fixed 32x the
    ATK2 codecs put 1/32 of the activation and gradient bytes on the wire, their gradients come back
    in ATK2 packets on the forward masks; a bf16 wire halves an uncompressed pipeline."""
    import asyncio

    from swarm.compression.policy import LinkPolicy
    from swarm.data import lm_loss
    from swarm.models import trace_model
    from swarm.pipeline import train_step
    from swarm.runtime.local import local_servers

    torch.manual_seed(0)
    traced = trace_model("gpt2-tiny", "coarse", 4)
    ratio, mode = (1.0, "off") if half else (32.0, "fixed")
    servers = local_servers(traced, 3, lm_loss, lambda: LinkPolicy(mode, 1.0, 1.0, 1, 1e9, fixed_ratio=ratio, codec=codec,
                                                                   half=half))
    sent = []
    for s in servers[1:]:   # what the next stages get and answer
        answer = s.answer

        async def spy(frame, sender, answer=answer):
            reply = await answer(frame, sender)
            if read_header(frame).kind == "forward":
                sent.append((read_header(frame).shapes(), read_header(reply).shapes(), reply))
            return reply
        s.answer = spy
    data = torch.randint(0, 256, (8, 129), generator=torch.Generator().manual_seed(0))
    loss = asyncio.run(train_step(servers[0], data[:, :-1], data[:, 1:], micro_batches=2, in_flight=2))
    assert loss == loss and sent
    raw, wire = sum(s.counters.act_raw for s in servers), sum(s.counters.act_wire for s in servers)
    assert 0.9 < raw / wire / (2.0 if half else 32.0) < 1.1
    for forward, reply_shapes, reply in sent:
        assert forward["x0"][2] == ("bf16" if half else "adatopk")
        assert reply_shapes["g0"][2] == ("bf16" if half else "adatopk")
        if not half:   # ATK2 on the forward's mask: the magic, and index kind 2 (reuse: no indices)
            header = read_header(reply)
            offset = header.offset + sum(e["nbytes"] for e in header.entries[:[e["name"] for e in header.entries].index("g0")])
            assert reply[offset:offset + 4] == MAGIC2 and reply[offset + 5] == 2
