"""Training and validation data that needs no download at run time, sampled deterministically by step so that
every first-stage replica can take its own shard: byte-level text (a generated corpus, Shakespeare's works
from ``swarm.corpus``, or local files) and labelled images (generated on the fly or a local folder of one
subfolder per class).

Every source has a held-out validation part that training never samples (docs/data.md): the validation plays
of ``shakespeare``, the last 1/10 of local text's bytes, every 10th image of each class of an image folder,
and, for the generated sources, another seed's stream. ``validation_data`` turns it into a fixed list of
global batches, the same in every process, which ``shard`` divides among first-stage replicas."""
from __future__ import annotations

import glob
import math
import random
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from swarm import corpus
from swarm.corpus import HELD_OUT_ONE_IN
from swarm.errors import SwarmError
from swarm.userdata import default_loss, is_factory, user_data, user_loss

Batch = tuple[torch.Tensor, torch.Tensor]

_SUBJECTS = ["the node", "a peer", "the swarm", "each stage", "the scheduler", "a replica", "the network", "every link"]
_VERBS = ["sends", "measures", "elects", "compresses", "averages", "trains", "forwards", "receives"]
_OBJECTS = ["the activations", "its gradients", "a new plan", "the bandwidth", "the next batch", "small tensors",
            "the loss", "a checkpoint"]
_TAILS = ["quickly", "over a slow link", "without a coordinator", "every step", "to its neighbour", "in order", "again"]
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
_GLOB = re.compile(r"[*?[]")
_HELD_OUT_SEED = 1           # the generated corpus of validation (training's is generated_corpus's default)
_HELD_OUT_STREAMS = 3 << 30  # validation seeds count down from here; torch's generator reads a seed's low 32 bits only
_TEXT_SOURCES = ("generated", "shakespeare")


def generated_corpus(n_bytes: int = 1 << 20, seed: int = 0) -> bytes:
    """Deterministic English-like sentences from a small grammar: structure a byte-level model can learn."""
    rng, out, size = random.Random(seed), [], 0
    while size < n_bytes:
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}. "
        out.append(s)
        size += len(s)
    return "".join(out).encode()[:n_bytes]


def _step_generator(seed: int, step: int) -> torch.Generator:
    """The random stream of step ``step``: the same in every process, so each replica can cut out its shard."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _held_out_generator(seed: int, index: int) -> torch.Generator:
    """The random stream of validation batch ``index``: above every training step's (``MAX_STEPS`` < 2**30 of
    them, for seeds below 1000) and below the templates' (``2**32 - 1 - seed``)."""
    return torch.Generator().manual_seed(_HELD_OUT_STREAMS - seed * 1_000_003 - index)


class ByteCorpus:
    """Sequences of ``seq_len + 1`` bytes; ``batch(step, size, rank, world)`` is the same in every process."""

    def __init__(self, data: bytes, seq_len: int, seed: int = 0):
        if len(data) < seq_len + 2:
            raise SwarmError(f"corpus of {len(data)} bytes is shorter than one sequence of {seq_len + 1}")
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8)   # bytes, widened per batch
        self.seq_len, self.seed = seq_len, seed

    @classmethod
    def from_files(cls, paths: list[str], seq_len: int) -> ByteCorpus:
        """The files' bytes, in order, separated by newlines."""
        return cls(_read_text(paths), seq_len)

    def batch(self, step: int, size: int, rank: int = 0, world: int = 1) -> Batch:
        """Inputs and next-byte targets of shard ``rank`` of ``world`` of step ``step``'s global batch."""
        gen = _step_generator(self.seed, step)
        starts = torch.randint(0, len(self.data) - self.seq_len - 1, (size * world,), generator=gen)[rank::world]
        return self._windows(starts.tolist())

    def spread(self, count: int) -> Batch:
        """``count`` windows at evenly spaced starts from the first byte to the last window: a fixed sample
        of the whole text (for validation)."""
        span = len(self.data) - self.seq_len - 1
        return self._windows([i * span // max(1, count - 1) for i in range(count)])

    def _windows(self, starts: list[int]) -> Batch:
        rows = torch.stack([self.data[s: s + self.seq_len + 1] for s in starts]).long()
        return rows[:, :-1], rows[:, 1:]


class SyntheticImages:
    """Classes of smooth random templates seen through smooth and per-pixel noise: learnable, but not trivially."""

    def __init__(self, num_classes: int, image_size: int, in_channels: int = 3, seed: int = 0):
        gen = torch.Generator().manual_seed(-1 - seed)  # a stream apart from every step's
        coarse = torch.randn(num_classes, in_channels, 4, 4, generator=gen)
        self.templates = (coarse - coarse.mean(dim=(1, 2, 3), keepdim=True)) / coarse.std(dim=(1, 2, 3), keepdim=True)
        self.num_classes, self.image_size, self.seed = num_classes, image_size, seed

    def batch(self, step: int, size: int, rank: int = 0, world: int = 1) -> Batch:
        """Images (standardised per sample) and int64 labels of shard ``rank`` of ``world`` of step ``step``'s batch."""
        x, labels = self._draw(_step_generator(self.seed, step), size * world)
        return x[rank::world], labels[rank::world]

    def held_out(self, index: int, size: int) -> Batch:
        """Validation batch ``index`` of ``size`` samples: the same classes, drawn from a stream no step uses."""
        return self._draw(_held_out_generator(self.seed, index), size)

    def _draw(self, gen: torch.Generator, n: int) -> Batch:
        labels = torch.randint(0, self.num_classes, (n,), generator=gen)
        coarse = 0.5 * self.templates[labels] + torch.randn((n, *self.templates.shape[1:]), generator=gen)
        x = F.interpolate(coarse, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = x + 0.5 * torch.randn(x.shape, generator=gen)
        x = (x - x.mean(dim=(1, 2, 3), keepdim=True)) / x.std(dim=(1, 2, 3), keepdim=True)
        return x, labels


class ImageFolder:
    """Labelled images held in memory as one normalised tensor; batches are drawn by step like ``ByteCorpus``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str], seed: int = 0):
        self.images, self.labels, self.classes, self.seed = images, labels, classes, seed
        self.num_classes = len(classes)

    @classmethod
    def from_dir(cls, path: str | Path, image_size: int, in_channels: int = 3, seed: int = 0,
                 held_out: bool = False) -> ImageFolder:
        """Read ``path/<class>/<image>`` (sorted class names are the labels), resized and normalised per channel
        with the training images' mean and deviation. Every ``HELD_OUT_ONE_IN``-th image of each class (by sorted
        file name) is validation: ``held_out`` picks those, else the training images (the rest)."""
        if in_channels not in (1, 3):
            raise SwarmError(f"image folder needs in_channels 1 (grey) or 3 (RGB), not {in_channels}")
        root = Path(path)
        if not root.is_dir():
            raise SwarmError(f"image folder {path} does not exist or is not a directory")
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not classes:
            raise SwarmError(f"image folder {path} has no class subfolders")
        train: list[tuple[torch.Tensor, int]] = []
        validation: list[tuple[torch.Tensor, int]] = []
        for label, name in enumerate(classes):
            files = sorted(f for f in (root / name).iterdir() if f.is_file() and f.suffix.lower() in _IMAGE_SUFFIXES)
            if not files:
                raise SwarmError(f"class folder {root / name} has no images ({', '.join(sorted(_IMAGE_SUFFIXES))})")
            for i, f in enumerate(files):
                part = validation if i % HELD_OUT_ONE_IN == HELD_OUT_ONE_IN - 1 else train
                part.append((_load_image(f, image_size, in_channels), label))
        if held_out and not validation:
            raise SwarmError(f"image folder {path} holds out no images: every {HELD_OUT_ONE_IN}th image of each class "
                             f"is validation, and no class has {HELD_OUT_ONE_IN}")
        x, labels = _stack(train)
        mean, std = x.mean(dim=(0, 2, 3), keepdim=True), x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        if held_out:
            x, labels = _stack(validation)
        return cls((x - mean) / std, labels, classes, seed)

    def batch(self, step: int, size: int, rank: int = 0, world: int = 1) -> Batch:
        """Images and int64 labels of shard ``rank`` of ``world`` of step ``step``'s global batch."""
        gen = _step_generator(self.seed, step)
        idx = torch.randint(0, len(self.labels), (size * world,), generator=gen)[rank::world]
        return self.images[idx], self.labels[idx]


def _stack(images: list[tuple[torch.Tensor, int]]) -> Batch:
    """(uint8 image, label) pairs as float images in [0, 1] and int64 labels."""
    return torch.stack([x for x, _ in images]).float() / 255, torch.tensor([label for _, label in images])


def _load_image(path: Path, image_size: int, in_channels: int) -> torch.Tensor:
    """One image file as uint8 (in_channels, image_size, image_size)."""
    try:
        with Image.open(path) as im:
            im = im.convert("L" if in_channels == 1 else "RGB").resize((image_size, image_size), Image.BILINEAR)
    except UnidentifiedImageError:
        raise SwarmError(f"cannot read image {path}: corrupt or not an image") from None
    except OSError as e:
        raise SwarmError(f"cannot read image {path}: {e.strerror or e}") from None
    return torch.from_numpy(np.array(im)).reshape(image_size, image_size, in_channels).permute(2, 0, 1)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over [batch, time, vocab] logits."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def bits_per_byte(loss: float) -> float:
    """A byte-level model's mean cross-entropy in nats per byte, in bits per byte."""
    return loss / math.log(2)


def perplexity(loss: float) -> float:
    """exp(loss): the model's effective number of choices per token (inf when that overflows a float)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def text_files(source: str | list[str]) -> list[str]:
    """The text files named by a path, a glob pattern, or a list of both (each pattern's matches sorted,
    recursive with ``**``); a plain path is returned as is, so reading it names it if it is missing."""
    entries = [source] if isinstance(source, str) else source
    if not entries:
        raise SwarmError("training data: the list of text files is empty")
    files = []
    for entry in entries:
        if not _GLOB.search(entry) or Path(entry).exists():
            files.append(entry)
            continue
        matches = sorted(p for p in glob.glob(entry, recursive=True) if Path(p).is_file())
        if not matches:
            raise SwarmError(f"training data pattern '{entry}' matches no file")
        files += matches
    return files


def _read_text(paths: list[str]) -> bytes:
    """The files' bytes, in order, separated by newlines."""
    try:
        return b"\n".join(Path(p).read_bytes() for p in paths)
    except OSError as e:
        raise SwarmError(f"cannot read training text {e.filename}: {e.strerror}") from None


def held_out_tail(data: bytes) -> tuple[bytes, bytes]:
    """(training, validation) parts of local text: validation is the last ``len // HELD_OUT_ONE_IN`` bytes."""
    cut = len(data) - len(data) // HELD_OUT_ONE_IN
    return data[:cut], data[cut:]


def _text(source: str | list[str], held_out: bool) -> bytes:
    """The training or (``held_out``) validation bytes of a text source: ``generated``, ``shakespeare`` or local files."""
    if source == "generated":
        return generated_corpus(seed=_HELD_OUT_SEED) if held_out else generated_corpus()
    if source == "shakespeare":
        train, validation = corpus.split(corpus.read_documents())
        return b"\n".join(d.text for d in (validation if held_out else train))
    train, validation = held_out_tail(_read_text(text_files(source)))
    return validation if held_out else train


def _kind(source: str | list[str], input_shape: list[int], input_dtype: str, output_shape: list[int]) -> str:
    """``text`` or ``images`` for a source and the model's traced input and output; a one-line SwarmError when
    the source is unknown or does not fit the model."""
    tokens = input_dtype == "int64" and len(input_shape) == 2
    images = input_dtype.startswith("float") and len(input_shape) == 4 and len(output_shape) == 2
    path = Path(source) if isinstance(source, str) else None
    if path is None or source in _TEXT_SOURCES or path.is_file() or (_GLOB.search(source) and not path.exists()):
        if not tokens:
            raise SwarmError(f"text data needs a model that takes token ids [batch, time], not {input_dtype} {input_shape}")
        return "text"
    if source != "synthetic-images" and not path.is_dir():
        raise SwarmError(f"training data '{source}': not auto, generated, shakespeare, synthetic-images, a text file, "
                         f"a glob pattern or an image folder")
    if not images:
        raise SwarmError(f"image data needs a classifier from [batch, channels, height, width] to [batch, classes], "
                         f"not {input_dtype} {input_shape} to {output_shape}")
    return "images"


def _resolve(source: str | list[str], input_shape: list[int], input_dtype: str, output_shape: list[int]) -> str | list[str]:
    """``source`` with ``auto`` replaced by the default for the model: the generated corpus for token inputs,
    synthetic images for image inputs."""
    if source != "auto":
        return source
    if input_dtype == "int64" and len(input_shape) == 2:
        return "generated"
    if input_dtype.startswith("float") and len(input_shape) == 4 and len(output_shape) == 2:
        return "synthetic-images"
    raise SwarmError(f"no default training data for a model mapping {input_dtype} {input_shape} to {output_shape}: "
                     f"set training.data")


def _image_folder(source: str, input_shape: list[int], output_shape: list[int], held_out: bool) -> ImageFolder:
    folder = ImageFolder.from_dir(source, input_shape[2], input_shape[1], held_out=held_out)
    if len(folder.classes) > output_shape[1]:
        raise SwarmError(f"image folder {source} has {len(folder.classes)} classes; the model predicts {output_shape[1]}")
    return folder


def training_data(source: str | list[str], input_shape: list[int], input_dtype: str, output_shape: list[int],
                  loss: str | None = None):
    """(dataset, loss function) for ``source`` shaped to the model's traced input and output:
    ``auto`` picks the generated corpus for token inputs and synthetic images for image inputs;
    ``generated``, ``shakespeare`` (the training plays), ``synthetic-images``, text files (a path, a glob
    pattern, or a list of paths and patterns: their bytes in order, less the held-out last 1/10), an image
    folder (one subfolder per class, less every 10th image of each), or a user's data factory
    (``package.module:factory``, ``swarm.userdata``). Never a sample of ``validation_data``. ``loss``
    (``package.module:function``) replaces the source's loss."""
    if is_factory(source):
        data = user_data(source)
        _, y = data.check(input_shape, input_dtype)
        return data, user_loss(loss) if loss else default_loss(source, y, output_shape)
    if loss:
        return training_data(source, input_shape, input_dtype, output_shape)[0], user_loss(loss)
    source = _resolve(source, input_shape, input_dtype, output_shape)
    if _kind(source, input_shape, input_dtype, output_shape) == "text":
        return ByteCorpus(_text(source, held_out=False), input_shape[1]), lm_loss
    if source == "synthetic-images":
        return SyntheticImages(output_shape[1], input_shape[2], input_shape[1]), F.cross_entropy
    return _image_folder(source, input_shape, output_shape, held_out=False), F.cross_entropy


def validation_data(source: str | list[str], input_shape: list[int], input_dtype: str, output_shape: list[int],
                    batches: int, batch_size: int) -> list[Batch]:
    """``batches`` global validation batches of ``batch_size`` (inputs, targets) for ``source`` (as in
    ``training_data``, with the same loss), the same in every process and apart from all training data: text
    is ``batches * batch_size`` windows evenly spread over the held-out text (the validation plays, the last
    1/10 of local text, another seed's generated corpus), synthetic images come from a stream no step draws,
    an image folder's held-out images are taken in order (and again from the first if more are asked).
    ``shard`` gives a replica its part of each."""
    if batches < 1 or batch_size < 1:
        raise SwarmError(f"validation needs at least one batch of one sample, not {batches} of {batch_size}")
    if is_factory(source):
        return user_data(source).validation(batches, batch_size)
    source = _resolve(source, input_shape, input_dtype, output_shape)
    count = batches * batch_size
    if _kind(source, input_shape, input_dtype, output_shape) == "text":
        text, seq_len = _text(source, held_out=True), input_shape[1]
        if len(text) < seq_len + 2:
            raise SwarmError(f"held-out text of {source} is {len(text)} bytes, shorter than one sequence of "
                             f"{seq_len + 1}: local text holds out its last 1/{HELD_OUT_ONE_IN}, so give more text")
        x, y = ByteCorpus(text, seq_len).spread(count)
    elif source == "synthetic-images":
        images = SyntheticImages(output_shape[1], input_shape[2], input_shape[1])
        return [images.held_out(i, batch_size) for i in range(batches)]
    else:
        folder = _image_folder(source, input_shape, output_shape, held_out=True)
        idx = torch.arange(count) % len(folder.labels)
        x, y = folder.images[idx], folder.labels[idx]
    return list(zip(x.split(batch_size), y.split(batch_size)))


def shard(batches: list[Batch], rank: int, world: int) -> list[Batch]:
    """Replica ``rank`` of ``world``'s part of each batch: its rows ``rank::world``, as ``batch`` cuts a step's."""
    if not 0 <= rank < world:
        raise SwarmError(f"replica rank {rank} is not in 0..{world - 1}")
    return [(x[rank::world], y[rank::world]) for x, y in batches]
