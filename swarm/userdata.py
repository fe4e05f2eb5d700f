"""Training data and losses from a user's own code (``training.data`` / ``training.loss`` as
``package.module:callable``, docs/data.md).

A data factory, called without arguments, returns a sampler with the built-in sources' contract:
``batch(step, size, rank=0, world=1) -> (inputs, targets)``, deterministic in ``step`` (every
first-stage replica draws the same global batch and keeps its rows ``rank::world``, as the built-in
corpora do), and, for validation, ``validation(batches, batch_size) -> [(inputs, targets), ...]`` on
held-out samples. Its batches are checked against the model: the inputs' dtype and per-sample shape
must be the traced model's, else one line naming both. Without a ``training.loss`` the loss follows the
targets: token ids against ``[batch, time, vocab]`` logits (the LM loss), class ids against
``[batch, classes]`` (cross-entropy), floats shaped like the output (mean squared error). A model
with neither ``example_inputs`` nor an ``input_shape`` takes its example inputs from the sampler.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from swarm.errors import SwarmError
from swarm.imports import IMPORT_PATH, describe, import_callable

Batch = tuple[torch.Tensor, torch.Tensor]


def is_factory(source) -> bool:
    """``training.data`` names a user's data factory (``package.module:factory``)."""
    return isinstance(source, str) and bool(IMPORT_PATH.match(source))


def _call(what: str, fn: Callable, *args):
    try:
        return fn(*args)
    except SwarmError:
        raise
    except BaseException as e:   # the user's code: whatever it raised is one line
        raise SwarmError(f"{what} failed: {describe(e)}") from None


class UserData:
    """A user's sampler, its batches checked (``batch``, ``validation``) as they come."""

    def __init__(self, path: str):
        self.path = path
        self.sampler = _call(f"data factory '{path}'", import_callable(path, "data factory"))
        if not callable(getattr(self.sampler, "batch", None)):
            raise SwarmError(f"data factory '{path}' returned {type(self.sampler).__name__}, which has no "
                             "batch(step, size, rank, world) method")

    def _checked(self, got, what: str, size: int | None = None) -> Batch:
        if not (isinstance(got, (tuple, list)) and len(got) == 2 and all(isinstance(t, torch.Tensor) for t in got)):
            raise SwarmError(f"data factory '{self.path}': {what} returned {type(got).__name__}, not (inputs, targets) tensors")
        x, y = got
        if x.dim() == 0 or y.dim() == 0 or len(x) != len(y) or (size is not None and len(x) != size):
            raise SwarmError(f"data factory '{self.path}': {what} returned inputs {list(x.shape)} and targets "
                             f"{list(y.shape)}{f', not {size} samples each' if size is not None else ''}")
        return x, y

    def batch(self, step: int, size: int, rank: int = 0, world: int = 1) -> Batch:
        got = _call(f"data factory '{self.path}': batch({step}, {size}, {rank}, {world})", self.sampler.batch,
                    step, size, rank, world)
        return self._checked(got, f"batch({step}, {size}, {rank}, {world})", len(range(rank, size, world)))

    def validation(self, batches: int, batch_size: int) -> list[Batch]:
        if not callable(getattr(self.sampler, "validation", None)):
            raise SwarmError(f"data factory '{self.path}' has no validation(batches, batch_size) method for held-out "
                             "samples: add one, or set training.eval_every_steps: 0")
        got = _call(f"data factory '{self.path}': validation", self.sampler.validation, batches, batch_size)
        if not isinstance(got, (list, tuple)) or len(got) != batches:
            raise SwarmError(f"data factory '{self.path}': validation({batches}, {batch_size}) must return {batches} batches")
        return [self._checked(b, "validation", batch_size) for b in got]

    def check(self, input_shape: list[int], input_dtype: str) -> Batch:
        """A first batch, once its inputs are the model's (dtype and per-sample shape)."""
        x, y = self.batch(0, 2)
        dtype = str(x.dtype).removeprefix("torch.")
        if dtype != input_dtype or list(x.shape[1:]) != list(input_shape[1:]):
            raise SwarmError(f"data factory '{self.path}' returns inputs {dtype} {list(x.shape[1:])} per sample; the model "
                             f"takes {input_dtype} {list(input_shape[1:])}")
        return x, y


def default_loss(path: str, targets: torch.Tensor, output_shape: list[int]):
    """The loss for ``targets`` against outputs of ``output_shape`` (see the module docstring)."""
    from swarm.data import lm_loss

    out = list(output_shape)
    if not targets.is_floating_point() and list(targets.shape[1:]) == out[1:-1]:
        return lm_loss if len(out) == 3 else F.cross_entropy
    if targets.is_floating_point() and list(targets.shape[1:]) == out[1:]:
        return F.mse_loss
    raise SwarmError(f"data factory '{path}': targets {str(targets.dtype).removeprefix('torch.')} "
                     f"{list(targets.shape[1:])} per sample fit no loss for outputs {out[1:]}; set training.loss")


@functools.lru_cache(maxsize=8)
def user_data(path: str) -> UserData:
    """The sampler of the data factory ``path``: its factory called once per process (the model's
    example inputs, training and validation all draw from it)."""
    return UserData(path)


def user_loss(path: str):
    """``training.loss``: ``fn(outputs, targets) -> scalar loss``."""
    return import_callable(path, "loss function")


def example_inputs(path: str) -> Callable[[int], tuple[torch.Tensor, ...]]:
    """A model's example inputs drawn from the data factory ``path`` (its first batch)."""
    return lambda batch_size: (user_data(path).batch(0, batch_size)[0],)
