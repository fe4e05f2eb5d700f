"""Codec throughput: encode/decode MB/s (of raw fp32 input) and achieved ratio, by codec, target
ratio and activation shape (micro-batch x tokens x features: per-token selection on a channel
scale, as on a pipeline link), and whether encode + decode of a tensor beats sending it raw over a
1 Gbit/s link (then the codec never costs more than it saves on a slower one). Prints a table and
writes JSON.

Codecs: ``atk1`` (AdaTopK's int8 packets; its ratio counts the forward packet), ``q8``, ``q4``,
``q2`` (ATK2: low-bit values, Rice-coded indices; the ratio counts the forward packet and the
gradient's on its mask together, as the link rule does). Forward: ``encode`` + ``decode``;
backward: ``encode_like`` (the gradient on the forward's mask) + its ``decode``.

    python -m benchmarks.codec [--device cpu|cuda] [--codecs atk1,q8,q4,q2] [--threads 0]
        [--json-out benchmarks/results/codec.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from swarm.compression import decode, encode, encode_like
from swarm.compression.adatopk import channel_rms

CODECS = {"atk1": None, "q8": 8, "q4": 4, "q2": 2}
SHAPES = ((2, 128, 256), (1, 1024, 768), (4, 256, 1024), (4, 1024, 1024))   # (1, 1024, 768): a GPT-2-small cut
RATIOS = (4, 10, 32, 64, 100)
LINK_BPS = 1e9


def best_time(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(x: torch.Tensor, codec: str, ratio: float, device: torch.device) -> dict:
    bits = CODECS[codec]
    scale, raw = channel_rms(x), x.numel() * 4
    packet = encode(x, ratio, scale, bits)
    back = encode_like(x, packet.indices, bits)
    enc = best_time(lambda: encode(x, ratio, scale, bits))
    dec = best_time(lambda: decode(packet.data, device=device))
    bwd_enc = best_time(lambda: encode_like(x, packet.indices, bits))
    bwd_dec = best_time(lambda: decode(back, packet.indices, device=device))
    raw_s = raw * 8 / LINK_BPS
    return {"device": str(device), "codec": codec, "shape": list(x.shape), "elements": x.numel(), "target_ratio": ratio,
            "achieved_ratio": raw / len(packet.data), "wire_ratio_both_ways": 2 * raw / (len(packet.data) + len(back)),
            "encode_mb_s": raw / enc / 1e6, "decode_mb_s": raw / dec / 1e6,
            "backward_encode_mb_s": raw / bwd_enc / 1e6, "backward_decode_mb_s": raw / bwd_dec / 1e6,
            "backward_ratio": raw / len(back), "forward_codec_ms": (enc + dec) * 1e3,
            "backward_codec_ms": (bwd_enc + bwd_dec) * 1e3, "raw_at_1gbit_ms": raw_s * 1e3,
            "beats_1gbit_raw": enc + dec < raw_s and bwd_enc + bwd_dec < raw_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json-out", default="benchmarks/results/codec.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--codecs", default=",".join(CODECS))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    codecs = args.codecs.split(",")
    if unknown := [c for c in codecs if c not in CODECS]:
        parser.error(f"unknown codecs {unknown} (known: {', '.join(CODECS)})")
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows = []
    print(f"{'codec':>5}{'shape':>14}{'target':>7}{'fwd x':>7}{'both x':>7}{'enc MB/s':>9}{'dec MB/s':>9}"
          f"{'fwd ms':>8}{'bwd ms':>8}{'1G raw ms':>10}{'beats 1G':>9}")
    for shape in SHAPES:
        x = torch.randn(shape, device=device)
        for codec in codecs:
            for ratio in RATIOS:
                r = measure(x, codec, ratio, device)
                rows.append(r)
                print(f"{codec:>5}{'x'.join(map(str, shape)):>14}{ratio:>7}{r['achieved_ratio']:>7.1f}"
                      f"{r['wire_ratio_both_ways']:>7.1f}{r['encode_mb_s']:>9.0f}{r['decode_mb_s']:>9.0f}"
                      f"{r['forward_codec_ms']:>8.1f}{r['backward_codec_ms']:>8.1f}{r['raw_at_1gbit_ms']:>10.1f}"
                      f"{'yes' if r['beats_1gbit_raw'] else 'no':>9}")
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps({"command": "python -m benchmarks.codec " + " ".join(argv or []),
                                               "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
