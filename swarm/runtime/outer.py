"""Rare synchronisation of a stage's replicas: inner steps, then an outer step (docs/sync.md).

With ``sync_every = H > 1`` the replicas of a stage stop summing their gradients every step. Each
applies its own micro-batches' gradient with its own (inner) optimizer; every ``H`` steps (after the
inner step of every step ``t`` with ``(t + 1) % H == 0``) they exchange the *pseudo-gradient*
``anchor - params`` (``anchor``: the parameters at the last sync), compressed with error feedback,
average it, and apply it to the anchor with the outer optimizer (SGD with Nesterov momentum); every
replica then continues from the new anchor, bit-identical again. ``H = 1`` is not this: it is
today's synchronous data parallelism (the gradients summed every step), untouched.

Pure tensor arithmetic, no I/O: ``OuterCodec`` (what one part of the exchange carries on the wire),
``ErrorFeedback`` (what compression dropped is added to the next exchange) and ``OuterState`` (the
anchor, the outer momentum and both residuals of one replica). The transport is the stage service's
butterfly (``swarm.pipeline.service``); ``benchmarks.sync`` runs the same arithmetic in one process.
"""
from __future__ import annotations

import math

import torch

from swarm.errors import RemoteProtocolError
from swarm.sync import BLOCK, COMPRESSIONS, ExchangeFormat, OuterSettings

__all__ = ["BLOCK", "COMPRESSIONS", "ErrorFeedback", "OuterCodec", "OuterSettings", "OuterState"]

def _quantize(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax int8: (values int8 [n], scales float32 [ceil(n / BLOCK)])."""
    n = v.numel()
    blocks = math.ceil(n / BLOCK)
    padded = torch.zeros(blocks * BLOCK)
    padded[:n] = v
    padded = padded.view(blocks, BLOCK)
    scale = padded.abs().amax(dim=1) / 127.0
    q = torch.round(padded / scale.clamp_min(1e-30)[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.view(-1)[:n].clone(), scale


def _dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n = q.numel()
    blocks = scale.numel()
    padded = torch.zeros(blocks * BLOCK)
    padded[:n] = q.float()
    return (padded.view(blocks, BLOCK) * scale[:, None]).view(-1)[:n]


class OuterCodec(ExchangeFormat):
    """``ExchangeFormat`` with the tensors: encode a part, decode (and check) a peer's."""

    def encode(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        v = v.detach().float().flatten()
        if self.compression == "off":
            return {"g": v.clone()}
        if self.compression == "int8":
            q, s = _quantize(v)
            return {"q": q, "s": s}
        idx = torch.topk(v.abs(), self.kept(v.numel()), sorted=False).indices.sort().values
        q, s = _quantize(v[idx])
        return {"i": idx.to(torch.int32), "q": q, "s": s}

    def decode(self, tensors: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
        """The dense float32 part; ``RemoteProtocolError`` if a peer's tensors are malformed."""
        want = self.shapes(numel)
        got = {k: (list(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in tensors.items()}
        if got != want:
            raise RemoteProtocolError(f"outer exchange: expected {want}, got {str(got)[:160]}")
        if self.compression == "off":
            return tensors["g"].float()
        if not bool(torch.isfinite(tensors["s"]).all()) or bool((tensors["s"] < 0).any()):
            raise RemoteProtocolError("outer exchange: scales must be finite and >= 0")
        values = _dequantize(tensors["q"], tensors["s"])
        if self.compression == "int8":
            return values
        idx = tensors["i"].long()
        if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= numel or bool((idx[1:] <= idx[:-1]).any())):
            raise RemoteProtocolError(f"outer exchange: indices must be increasing and within [0, {numel})")
        out = torch.zeros(numel)
        out[idx] = values
        return out


class ErrorFeedback:
    """Compression with memory: what a send dropped is added to the next one (per part bounds)."""

    def __init__(self, codec: OuterCodec, numel: int):
        self.codec, self.residual = codec, torch.zeros(numel)

    def encode(self, v: torch.Tensor, lo: int = 0, hi: int | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(payload, what it decodes to) for ``v`` (the values ``[lo, hi)`` of the vector)."""
        hi = self.residual.numel() if hi is None else hi
        x = v + self.residual[lo:hi]
        payload = self.codec.encode(x)
        sent = self.codec.decode(payload, hi - lo)
        self.residual[lo:hi] = x - sent
        return payload, sent


class OuterState:
    """One replica's outer state over the flat parameter vector: the anchor (the parameters at the
    last sync), the outer optimizer's momentum, and the residuals of its own sends (``own``) and of
    the averaged part it returns to the others (``owned``, for the part it owns)."""

    def __init__(self, settings: OuterSettings, anchor: torch.Tensor, momentum: torch.Tensor | None = None):
        self.settings = settings
        self.anchor = anchor.detach().float().clone()
        self.momentum = torch.zeros_like(self.anchor) if momentum is None else momentum.detach().float().clone()
        codec = settings.codec()
        self.own = ErrorFeedback(codec, self.anchor.numel())
        self.owned = ErrorFeedback(codec, self.anchor.numel())

    def pseudo_gradient(self, params: torch.Tensor) -> torch.Tensor:
        """``anchor - params``: where the inner steps since the last sync went, reversed."""
        return self.anchor - params.detach().float()

    def apply(self, average: torch.Tensor) -> torch.Tensor:
        """The outer step on the replicas' averaged pseudo-gradient: the new anchor (and parameters)."""
        s = self.settings
        self.momentum.mul_(s.momentum).add_(average)
        update = average + s.momentum * self.momentum   # Nesterov
        self.anchor.sub_(s.lr * update)
        return self.anchor.clone()
