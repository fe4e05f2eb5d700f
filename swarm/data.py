"""Training data that needs no download, sampled deterministically by step so that every first-stage replica can
take its own shard: byte-level text (a generated corpus or local files) and labelled images (generated on the fly
or a local folder of one subfolder per class)."""
from __future__ import annotations

import glob
import random
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from swarm.errors import SwarmError

_SUBJECTS = ["the node", "a peer", "the swarm", "each stage", "the scheduler", "a replica", "the network", "every link"]
_VERBS = ["sends", "measures", "elects", "compresses", "averages", "trains", "forwards", "receives"]
_OBJECTS = ["the activations", "its gradients", "a new plan", "the bandwidth", "the next batch", "small tensors",
            "the loss", "a checkpoint"]
_TAILS = ["quickly", "over a slow link", "without a coordinator", "every step", "to its neighbour", "in order", "again"]
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
_GLOB = re.compile(r"[*?[]")


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


class ByteCorpus:
    """Sequences of ``seq_len + 1`` bytes; ``batch(step, size, rank, world)`` is the same in every process."""

    def __init__(self, data: bytes, seq_len: int, seed: int = 0):
        if len(data) < seq_len + 2:
            raise SwarmError(f"corpus of {len(data)} bytes is shorter than one sequence of {seq_len + 1}")
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        self.seq_len, self.seed = seq_len, seed

    @classmethod
    def from_files(cls, paths: list[str], seq_len: int) -> ByteCorpus:
        """The files' bytes, in order, separated by newlines."""
        try:
            return cls(b"\n".join(Path(p).read_bytes() for p in paths), seq_len)
        except OSError as e:
            raise SwarmError(f"cannot read training text {e.filename}: {e.strerror}") from None

    def batch(self, step: int, size: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-byte targets of shard ``rank`` of ``world`` of step ``step``'s global batch."""
        gen = _step_generator(self.seed, step)
        starts = torch.randint(0, len(self.data) - self.seq_len - 1, (size * world,), generator=gen)[rank::world]
        rows = torch.stack([self.data[s: s + self.seq_len + 1] for s in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]


class SyntheticImages:
    """Classes of smooth random templates seen through smooth and per-pixel noise: learnable, but not trivially."""

    def __init__(self, num_classes: int, image_size: int, in_channels: int = 3, seed: int = 0):
        gen = torch.Generator().manual_seed(-1 - seed)  # a stream apart from every step's
        coarse = torch.randn(num_classes, in_channels, 4, 4, generator=gen)
        self.templates = (coarse - coarse.mean(dim=(1, 2, 3), keepdim=True)) / coarse.std(dim=(1, 2, 3), keepdim=True)
        self.num_classes, self.image_size, self.seed = num_classes, image_size, seed

    def batch(self, step: int, size: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (standardised per sample) and int64 labels of shard ``rank`` of ``world`` of step ``step``'s batch."""
        gen, n = _step_generator(self.seed, step), size * world
        labels = torch.randint(0, self.num_classes, (n,), generator=gen)
        coarse = 0.5 * self.templates[labels] + torch.randn((n, *self.templates.shape[1:]), generator=gen)
        x = F.interpolate(coarse, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = x + 0.5 * torch.randn(x.shape, generator=gen)
        x = (x - x.mean(dim=(1, 2, 3), keepdim=True)) / x.std(dim=(1, 2, 3), keepdim=True)
        return x[rank::world], labels[rank::world]


class ImageFolder:
    """Labelled images held in memory as one normalised tensor; batches are drawn by step like ``ByteCorpus``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str], seed: int = 0):
        self.images, self.labels, self.classes, self.seed = images, labels, classes, seed
        self.num_classes = len(classes)

    @classmethod
    def from_dir(cls, path: str | Path, image_size: int, in_channels: int = 3, seed: int = 0) -> ImageFolder:
        """Read ``path/<class>/<image>`` (sorted class names are the labels), resized and normalised per channel."""
        if in_channels not in (1, 3):
            raise SwarmError(f"image folder needs in_channels 1 (grey) or 3 (RGB), not {in_channels}")
        root = Path(path)
        if not root.is_dir():
            raise SwarmError(f"image folder {path} does not exist or is not a directory")
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not classes:
            raise SwarmError(f"image folder {path} has no class subfolders")
        images, labels = [], []
        for label, name in enumerate(classes):
            files = sorted(f for f in (root / name).iterdir() if f.is_file() and f.suffix.lower() in _IMAGE_SUFFIXES)
            if not files:
                raise SwarmError(f"class folder {root / name} has no images ({', '.join(sorted(_IMAGE_SUFFIXES))})")
            images += [_load_image(f, image_size, in_channels) for f in files]
            labels += [label] * len(files)
        x = torch.stack(images).float() / 255
        mean, std = x.mean(dim=(0, 2, 3), keepdim=True), x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        return cls((x - mean) / std, torch.tensor(labels), classes, seed)

    def batch(self, step: int, size: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and int64 labels of shard ``rank`` of ``world`` of step ``step``'s global batch."""
        gen = _step_generator(self.seed, step)
        idx = torch.randint(0, len(self.labels), (size * world,), generator=gen)[rank::world]
        return self.images[idx], self.labels[idx]


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


def training_data(source: str | list[str], input_shape: list[int], input_dtype: str, output_shape: list[int]):
    """(dataset, loss function) for ``source`` shaped to the model's traced input and output:
    ``auto`` picks the generated corpus for token inputs and synthetic images for image inputs;
    ``generated``, ``synthetic-images``, text files (a path, a glob pattern, or a list of paths and
    patterns: their bytes in order), or an image folder (one subfolder per class)."""
    tokens = input_dtype == "int64" and len(input_shape) == 2
    images = input_dtype.startswith("float") and len(input_shape) == 4 and len(output_shape) == 2
    if source == "auto":
        if not (tokens or images):
            raise SwarmError(f"no default training data for a model mapping {input_dtype} {input_shape} to "
                             f"{output_shape}: set training.data")
        source = "generated" if tokens else "synthetic-images"
    path = Path(source) if isinstance(source, str) else None
    if path is None or source == "generated" or path.is_file() or (_GLOB.search(source) and not path.exists()):
        if not tokens:
            raise SwarmError(f"text data needs a model that takes token ids [batch, time], not {input_dtype} {input_shape}")
        if source == "generated":
            return ByteCorpus(generated_corpus(), input_shape[1]), lm_loss
        return ByteCorpus.from_files(text_files(source), input_shape[1]), lm_loss
    if source != "synthetic-images" and not path.is_dir():
        raise SwarmError(f"training data '{source}': not auto, generated, synthetic-images, a text file, a glob "
                         f"pattern or an image folder")
    if not images:
        raise SwarmError(f"image data needs a classifier from [batch, channels, height, width] to [batch, classes], "
                         f"not {input_dtype} {input_shape} to {output_shape}")
    channels, size, classes = input_shape[1], input_shape[2], output_shape[1]
    if source == "synthetic-images":
        return SyntheticImages(classes, size, channels), F.cross_entropy
    folder = ImageFolder.from_dir(path, size, channels)
    if len(folder.classes) > classes:
        raise SwarmError(f"image folder {source} has {len(folder.classes)} classes; the model predicts {classes}")
    return folder, F.cross_entropy
