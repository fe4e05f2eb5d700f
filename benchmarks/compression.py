"""AdaTopK's cost in accuracy: gpt2-tiny trained through a 3-stage pipeline (the stage servers' real
path, in one process) uncompressed and at fixed wire ratios; final loss and achieved ratio.
Also: the same ratio without the channel scale (plain per-token magnitude), and with error feedback
(what compression dropped from one micro-batch's activations added to the next one's before
selection: the experiment behind docs/adatopk.md's "error feedback is not applied"). Prints a table
and writes JSON.

    python -m benchmarks.compression [--steps 80] [--device cpu|cuda] [--json-out benchmarks/results/compression.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import torch

from swarm.compression.adatopk import ChannelScale, Packet, decode
from swarm.compression.policy import LinkPolicy
from swarm.data import ByteCorpus, generated_corpus, lm_loss
from swarm.models import trace_model
from swarm.pipeline import train_step
from swarm.runtime.local import local_servers


class ErrorFeedback(ChannelScale):
    """Selection on ``x + residual``, the residual being what the previous tensor of that name lost."""

    def __init__(self):
        super().__init__()
        self.residual: dict[str, torch.Tensor] = {}

    def encode(self, name: str, x: torch.Tensor, ratio: float) -> Packet:
        r = self.residual.get(name)
        x = x + r if r is not None and r.shape == x.shape else x
        packet = super().encode(name, x, ratio)
        self.residual[name] = x - decode(packet.data, device=x.device)[0].to(x.dtype)
        return packet


def train(ratio: float, steps: int, channel_scale: bool = True, micro_batches: int = 4, size: int = 4,
          device: str = "cpu", error_feedback: bool = False) -> dict:
    traced = trace_model("gpt2-tiny", "coarse", size)
    mode = "fixed" if ratio > 1 else "off"
    servers = local_servers(traced, 3, lm_loss, lambda: LinkPolicy(mode, 1.0, 1.0, 1, 1e9, fixed_ratio=ratio),
                            device=device)
    for s in servers:
        s.link.channel_scale = ErrorFeedback() if error_feedback else s.link.channel_scale if channel_scale else None
    corpus = ByteCorpus(generated_corpus(), 128)

    async def run() -> list[float]:
        return [await train_step(servers[0], *corpus.batch(step, micro_batches * size), micro_batches, 3)
                for step in range(steps)]

    losses = asyncio.run(run())
    raw, wire = sum(s.counters.act_raw for s in servers), sum(s.counters.act_wire for s in servers)
    return {"device": device, "target_ratio": ratio, "channel_scale": channel_scale, "error_feedback": error_feedback,
            "achieved_ratio": raw / wire, "final_loss": sum(losses[-5:]) / 5, "losses": losses}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--json-out", default="benchmarks/results/compression.json")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    runs = [train(r, args.steps, device=args.device) for r in (1, 4, 10, 16, 32)] \
        + [train(10, args.steps, channel_scale=False, device=args.device)] \
        + [train(r, args.steps, error_feedback=True, device=args.device) for r in (10, 32)]
    base = runs[0]["final_loss"]
    print(f"gpt2-tiny on {args.device}, 3 stages, {args.steps} steps of 4 x 4 sequences; final loss = mean of the last 5 steps")
    print(f"{'target':>7}{'selection':>22}{'achieved':>10}{'final loss':>12}{'vs off':>9}")
    for r in runs:
        how = "-" if r["target_ratio"] == 1 else "+ error feedback" if r["error_feedback"] else \
            "per token / channel" if r["channel_scale"] else "per token, plain |x|"
        print(f"{r['target_ratio']:>7g}{how:>22}{r['achieved_ratio']:>10.2f}{r['final_loss']:>12.3f}"
              f"{(r['final_loss'] / base - 1) * 100:>+8.1f}%")
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps({"steps": args.steps, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
