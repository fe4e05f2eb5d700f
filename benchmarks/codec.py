"""AdaTopK codec throughput: encode/decode MB/s (of raw fp32 input) and achieved ratio, by target
ratio and tensor size. Prints a table and writes JSON.

    python -m benchmarks.codec [--json-out benchmarks/results/codec.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from swarm.compression import decode, encode, encode_like


def best_time(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json-out", default="benchmarks/results/codec.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    print(f"{'elements':>10}{'target':>8}{'achieved':>10}{'enc MB/s':>10}{'dec MB/s':>10}{'bwd enc MB/s':>14}{'bwd ratio':>11}")
    for numel in (1 << 16, 1 << 20, 1 << 22):
        x = torch.randn(numel)
        raw = numel * 4
        for ratio in (4, 10, 32, 100):
            packet = encode(x, ratio)
            enc = best_time(lambda: encode(x, ratio))
            dec = best_time(lambda: decode(packet.data))
            bwd = best_time(lambda: encode_like(x, packet.indices))
            row = {"elements": numel, "target_ratio": ratio, "achieved_ratio": raw / len(packet.data),
                   "encode_mb_s": raw / enc / 1e6, "decode_mb_s": raw / dec / 1e6, "backward_encode_mb_s": raw / bwd / 1e6,
                   "backward_ratio": raw / len(encode_like(x, packet.indices))}
            rows.append(row)
            print(f"{numel:>10}{ratio:>8}{row['achieved_ratio']:>10.2f}{row['encode_mb_s']:>10.0f}{row['decode_mb_s']:>10.0f}"
                  f"{row['backward_encode_mb_s']:>14.0f}{row['backward_ratio']:>11.1f}")
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
