"""Rare synchronisation of a stage's replicas: inner steps, then an outer step (docs/sync.md).

With ``sync_every = H > 1`` the replicas of a stage stop summing their gradients every step. Each
applies its own micro-batches' gradient with its own (inner) optimizer; every ``H`` steps (after the
inner step of every step ``t`` with ``(t + 1) % H == 0``) they exchange the *pseudo-gradient*
``anchor - params`` (``anchor``: the parameters at the last sync), compressed with error feedback,
average it, and apply it to the anchor with the outer optimizer (SGD with Nesterov momentum); every
replica then continues from the new anchor, bit-identical again. ``H = 1`` is not this: it is
today's synchronous data parallelism (the gradients summed every step), untouched.

With ``overlap`` (the default) the exchange does not stop training: it runs while the replicas take
their next ``H`` inner steps, and its outer step is applied at the next sync, one sync late. Then the
pseudo-gradient is the progress since the last sync (``base - params``; ``base``: the parameters
right after it), and a sync sets the parameters to the anchor (stepped with the *previous* exchange's
average) plus this period's own progress, which the next sync replaces by the replicas' average.
Replicas then differ by their own newest period only; their anchors stay identical.

Pure tensor arithmetic, no I/O: ``OuterCodec`` (what one part of the exchange carries on the wire),
``ErrorFeedback`` (what compression dropped is added to the next exchange) and ``OuterState`` (the
anchor, the outer momentum and both residuals of one replica). The transport is the stage service's
butterfly (``swarm.pipeline.sync``); ``benchmarks.sync`` runs the same arithmetic in one process.
"""
from __future__ import annotations

import hashlib
import math

import torch

from swarm.errors import RemoteProtocolError
from swarm.runtime.allreduce import flatten, split
from swarm.runtime.state import OpState
from swarm.sync import BLOCK, COMPRESSIONS, ExchangeFormat, OuterSettings

__all__ = ["BLOCK", "COMPRESSIONS", "ErrorFeedback", "OuterCodec", "OuterSettings", "OuterState", "outer_tensors",
           "resume_outer", "tensor_digest"]

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
    last sync), the outer optimizer's momentum, the parameters right after the last sync (``base``:
    the anchor, unless the sync overlapped), and the residuals of its own sends (``own``) and of the
    averaged part it returns to the others (``owned``, for the part it owns)."""

    def __init__(self, settings: OuterSettings, anchor: torch.Tensor, momentum: torch.Tensor | None = None):
        self.settings = settings
        self.anchor = anchor.detach().float().clone()
        self.base = self.anchor.clone()
        self.momentum = torch.zeros_like(self.anchor) if momentum is None else momentum.detach().float().clone()
        self.version, self._digest = 0, None   # the anchor's changes (``digest``'s cache)
        codec = settings.codec()
        self.own = ErrorFeedback(codec, self.anchor.numel())
        self.owned = ErrorFeedback(codec, self.anchor.numel())

    def pseudo_gradient(self, params: torch.Tensor) -> torch.Tensor:
        """``base - params``: where the inner steps since the last sync went, reversed."""
        return self.base - params.detach().float()

    def digest(self) -> str:
        """A short hash of the anchor (replicas that agree on it print the same; cached until it moves)."""
        if self._digest is None or self._digest[0] != self.version:
            self._digest = (self.version, tensor_digest(self.anchor))
        return self._digest[1]

    def _nesterov(self, average: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(anchor, momentum) after an outer step on ``average`` (SGD, Nesterov); nothing changes."""
        s = self.settings
        momentum = s.momentum * self.momentum + average
        return self.anchor - s.lr * (average + s.momentum * momentum), momentum

    def _outer(self, average: torch.Tensor) -> None:
        self.version += 1
        self.anchor, self.momentum = self._nesterov(average)

    def apply(self, average: torch.Tensor) -> torch.Tensor:
        """The outer step on the replicas' averaged pseudo-gradient: the new anchor (and parameters)."""
        self._outer(average)
        self.base = self.anchor.clone()
        return self.anchor.clone()

    def landed(self, pending: torch.Tensor | None) -> torch.Tensor:
        """The anchor once the exchange in flight (its average ``pending``) has landed; nothing changes."""
        return self.anchor.clone() if pending is None else self._nesterov(pending)[0]

    def apply_late(self, previous: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
        """An overlapped sync: the previous exchange's average (None: none yet) steps the anchor; the
        parameters continue from it plus this period's own progress (``-delta``, now on its way)."""
        if previous is not None:
            self._outer(previous)
        self.base = self.anchor - delta
        return self.base.clone()


def tensor_digest(t: torch.Tensor) -> str:
    """12 hex digits of sha-256 over a tensor's float32 bytes."""
    return hashlib.sha256(t.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()[:12]


def _names(module: torch.nn.Module, params: list[torch.nn.Parameter]) -> list[str]:
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for p in params]


def outer_tensors(state: OuterState | None, module: torch.nn.Module,
                  params: list[torch.nn.Parameter]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Parameter name -> (anchor, outer momentum) of ``state`` over ``params`` (the flat layout of
    ``StageWorker.flat_params``; {} without a state): what op states carry as ``a:`` and ``m:``."""
    if state is None:
        return {}
    names = _names(module, params)
    return {name: (anchor.clone(), momentum.clone()) for name, (_, anchor), (_, momentum)
            in zip(names, split(state.anchor, params), split(state.momentum, params))}


def resume_outer(states: dict[str, OpState], module: torch.nn.Module, params: list[torch.nn.Parameter],
                 own: set[str] | None = None, settings: OuterSettings = OuterSettings()) -> OuterState | None:
    """The outer state op ``states`` carry (None: they carry none), its anchor (``a:``) and momentum
    (``m:``) laid out over ``params``. Ops not in ``own`` (taken over from another peer; None: all are
    this node's own) start from the anchor, the last synced parameters, not from the other's: their
    parameters are overwritten with it. A parameter no state anchors is anchored where it is."""
    anchors, moments, taken = {}, {}, set()
    for op, st in states.items():
        for key, t in st.tensors.items():
            kind, _, name = key.partition(":")
            if kind == "a":
                anchors[name] = t
                if own is not None and op not in own:
                    taken.add(name)
            elif kind == "m":
                moments[name] = t
    if not anchors:
        return None
    named = dict(module.named_parameters())
    with torch.no_grad():
        for name in taken:
            named[name].copy_(anchors[name])
    order = list(zip(params, _names(module, params)))
    return OuterState(settings, flatten(anchors.get(n, p) for p, n in order),
                      flatten(moments[n] if n in moments else torch.zeros_like(p) for p, n in order))
