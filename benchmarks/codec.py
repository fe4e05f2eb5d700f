"""AdaTopK codec throughput: encode/decode MB/s (of raw fp32 input) and achieved ratio, by target
ratio and activation shape (micro-batch x tokens x features: per-token selection on a channel
scale, as on a pipeline link). Prints a table and writes JSON.

    python -m benchmarks.codec [--device cpu|cuda] [--json-out benchmarks/results/codec.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from swarm.compression import decode, encode, encode_like
from swarm.compression.adatopk import channel_rms


def best_time(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json-out", default="benchmarks/results/codec.json")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows = []
    print(f"{'shape':>16}{'target':>8}{'achieved':>10}{'enc MB/s':>10}{'dec MB/s':>10}{'bwd enc MB/s':>14}{'bwd ratio':>11}")
    for shape in ((2, 128, 256), (4, 256, 1024), (4, 1024, 1024)):
        x = torch.randn(shape, device=device)
        scale, numel = channel_rms(x), x.numel()
        raw = numel * 4
        for ratio in (4, 10, 32, 100):
            packet = encode(x, ratio, scale)
            enc = best_time(lambda x=x, ratio=ratio, scale=scale: encode(x, ratio, scale))
            dec = best_time(lambda packet=packet: decode(packet.data, device=device))
            bwd = best_time(lambda x=x, packet=packet: encode_like(x, packet.indices))
            row = {"device": str(device), "shape": list(shape), "elements": numel, "target_ratio": ratio,
                   "achieved_ratio": raw / len(packet.data),
                   "encode_mb_s": raw / enc / 1e6, "decode_mb_s": raw / dec / 1e6, "backward_encode_mb_s": raw / bwd / 1e6,
                   "backward_ratio": raw / len(encode_like(x, packet.indices))}
            rows.append(row)
            print(f"{'x'.join(map(str, shape)):>16}{ratio:>8}{row['achieved_ratio']:>10.2f}{row['encode_mb_s']:>10.0f}"
                  f"{row['decode_mb_s']:>10.0f}"
                  f"{row['backward_encode_mb_s']:>14.0f}{row['backward_ratio']:>11.1f}")
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
