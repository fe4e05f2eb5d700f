"""Models a user might bring, referenced by import path (tests.user_models:factory)."""
import os

import torch
from torch import nn


class Branchy(nn.Module):
    """Inception-style branches, a skip over several ops, two inputs, and a tuple output."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.a = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        self.b = nn.Linear(width, width)
        self.c = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))
        self.norm = nn.BatchNorm1d(3 * width)
        self.mix = nn.Linear(3 * width, width)
        self.head = nn.Linear(width, 4)
        self.aux = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        h = torch.relu(self.inp(x))
        skip = h * y
        branches = torch.cat([self.a(h), torch.sigmoid(self.b(h)), self.c(h)], dim=1)
        z = self.mix(self.norm(branches)) + skip  # skip crosses every op in between
        return self.head(z), self.aux(h).sum(dim=1)

    def example_inputs(self, batch_size: int):
        return torch.randn(batch_size, 8), torch.randn(batch_size, 1)


class Untraceable(nn.Module):
    """A chain with a data-dependent check: torch.fx cannot trace it; sequential_modules can."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 8)
        self.second = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(x).all():
            raise ValueError("non-finite input")
        return self.second(self.first(x))

    def example_inputs(self, batch_size: int):
        return (torch.randn(batch_size, 4),)


def branchy(width: int = 16) -> Branchy:
    return Branchy(width)


def untraceable() -> Untraceable:
    return Untraceable()


def bare() -> nn.Module:
    """A module without example_inputs()."""
    return nn.Linear(4, 4)


def not_a_module():
    return 42


# --- a broken member (tests/test_hostile_swarm.py) -------------------------------------------------
# Every node of that test runs this same model (same OP-DAG, same plan hashes); one node runs it with
# SWARM_TEST_POISON set, read when a block runs, so that node's stage sends NaN activations ("act") and
# NaN gradients ("grad") to its pipeline neighbours, as a member with broken memory or a hostile one would.

POISON_ENV = "SWARM_TEST_POISON"


class _NaNGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


class PoisonableBlock(nn.Module):
    """A transformer block that, in a poisoning process, outputs NaN and passes NaN gradients back."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        mode = os.environ.get(POISON_ENV, "")
        if "act" in mode:
            y = y * float("nan")
        if "grad" in mode and torch.is_grad_enabled():
            y = _NaNGradient.apply(y)
        return y


def poisonable_gpt() -> nn.Module:
    """gpt2-tiny with its blocks wrapped in ``PoisonableBlock`` (one op each at coarse granularity)."""
    from swarm.models import load_model

    model = load_model("gpt2-tiny").module
    model.blocks = nn.ModuleList(PoisonableBlock(b) for b in model.blocks)
    return model
