"""Bundled training and validation data: deterministic, sharded without overlap, held out from training, one-line errors."""
import hashlib
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from swarm import corpus
from swarm.config import NodeConfig, validate
from swarm.data import (
    ByteCorpus,
    ImageFolder,
    SyntheticImages,
    bits_per_byte,
    generated_corpus,
    held_out_tail,
    lm_loss,
    perplexity,
    shard,
    training_data,
    validation_data,
)
from swarm.errors import SwarmError

GPT2_TINY = ([2, 128], "int64", [2, 128, 256])   # a byte-level LM's traced input and output


def test_generated_corpus_is_deterministic_text():
    a, b = generated_corpus(10_000), generated_corpus(10_000)
    assert a == b and len(a) == 10_000 and a.decode().count(". ") > 100


def test_batches_are_deterministic_and_shards_partition_the_global_batch():
    corpus = ByteCorpus(generated_corpus(50_000), seq_len=32)
    x, y = corpus.batch(3, 8)
    assert x.shape == (8, 32) and torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x, corpus.batch(3, 8)[0])
    shards = [corpus.batch(3, 4, rank, 2)[0] for rank in range(2)]   # two replicas' halves of the step's batch
    rows = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert rows(torch.cat(shards)) == rows(corpus.batch(3, 8)[0]) and not torch.equal(shards[0], shards[1])


def test_errors():
    with pytest.raises(SwarmError, match="shorter than one sequence"):
        ByteCorpus(b"abc", 16)
    with pytest.raises(SwarmError, match="cannot read training text"):
        ByteCorpus.from_files(["/nonexistent.txt"], 16)


def test_training_text_from_several_files_a_glob_or_a_list(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"a" * 5000)
    (tmp_path / "b.txt").write_bytes(b"b" * 5000)
    (tmp_path / "notes.md").write_bytes(b"m" * 5000)
    model_io = ([1, 16], "int64", [1, 16, 256])
    listed = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    for source in (listed, str(tmp_path / "*.txt"), [str(tmp_path / "a.txt"), str(tmp_path / "[b].txt")]):
        corpus, _ = training_data(source, *model_io)
        x, _ = corpus.batch(0, 64)
        seen = set(bytes(x.flatten().tolist()))
        assert {ord("a"), ord("b")} <= seen and ord("m") not in seen, source   # batches draw from both files
    assert validate(NodeConfig, {"training": {"data": listed}}, "test").training.data == listed
    assert len(training_data(str(tmp_path / "a.txt"), *model_io)[0].data) == 4500   # one path; its last 1/10 held out
    missing = str(tmp_path / "gone.txt")
    for source, message in [([listed[0], missing], f"cannot read training text {missing}: No such file"),
                            (str(tmp_path / "*.csv"), "pattern '.*csv' matches no file"),
                            ([], "list of text files is empty")]:
        with pytest.raises(SwarmError, match=message) as err:
            training_data(source, *model_io)
        assert "\n" not in str(err.value)
    with pytest.raises(SwarmError, match="text data needs a model that takes token ids"):
        training_data(listed, [1, 3, 8, 8], "float32", [1, 10])


def interleave(shards: list[torch.Tensor]) -> torch.Tensor:
    """Shards taken as ``[rank::world]`` put back in the order of the global draw."""
    return torch.stack(shards, dim=1).flatten(0, 1)


def test_synthetic_images_are_deterministic_and_shards_interleave_into_the_global_batch():
    images = SyntheticImages(num_classes=4, image_size=8, in_channels=3, seed=1)
    x, y = images.batch(5, 300)
    assert x.shape == (300, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) == {0, 1, 2, 3} and abs(x.mean()) < 0.05 and 0.9 < x.std() < 1.1
    again = SyntheticImages(num_classes=4, image_size=8, in_channels=3, seed=1).batch(5, 300)   # another process
    assert torch.equal(x, again[0]) and torch.equal(y, again[1])
    assert not torch.equal(x, SyntheticImages(4, 8, 3, seed=2).batch(5, 300)[0])
    shards = [images.batch(5, 4, rank, 3) for rank in range(3)]
    assert torch.equal(interleave([s[0] for s in shards]), images.batch(5, 12)[0])
    assert torch.equal(interleave([s[1] for s in shards]), images.batch(5, 12)[1])
    flat = [tuple(row) for s in shards for row in s[0].flatten(1).tolist()]
    assert len(set(flat)) == 12   # no sample in two shards
    assert SyntheticImages(3, 16, in_channels=1).batch(0, 2)[0].shape == (2, 1, 16, 16)


def test_synthetic_images_are_learnable():
    images = SyntheticImages(num_classes=4, image_size=8)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 8 * 8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(100):
        x, y = images.batch(step, 32)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = images.batch(10_000, 512)   # a step never trained on
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.6   # chance is 0.25


def write_image(path, size: tuple[int, int], colour: tuple[int, int, int]) -> None:
    """A PNG/JPEG/... of one colour with a lighter diagonal, so channels vary within the image."""
    image = Image.new("RGB", size, colour)
    for i in range(min(size)):
        image.putpixel((i, i), tuple(min(255, c + 60) for c in colour))
    image.save(path)


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "dog").mkdir()
    (tmp_path / "cat").mkdir()
    (tmp_path / ".cache").mkdir()   # hidden: not a class
    write_image(tmp_path / "cat" / "a.png", (10, 6), (200, 20, 20))
    write_image(tmp_path / "cat" / "b.JPG", (20, 20), (180, 30, 10))
    write_image(tmp_path / "cat" / "c.bmp", (7, 13), (220, 10, 40))
    write_image(tmp_path / "dog" / "a.png", (30, 12), (20, 20, 200))
    write_image(tmp_path / "dog" / "b.webp", (9, 9), (10, 40, 190))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    return tmp_path


def test_image_folder_reads_resizes_normalises_and_labels_by_sorted_folder_name(folder):
    data = ImageFolder.from_dir(folder, image_size=8)
    assert data.classes == ["cat", "dog"] and data.num_classes == 2
    assert data.images.shape == (5, 3, 8, 8) and data.images.dtype == torch.float32
    assert data.labels.tolist() == [0, 0, 0, 1, 1] and data.labels.dtype == torch.int64
    assert data.images.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert torch.allclose(data.images.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4)
    red_minus_blue = (data.images[:, 0] - data.images[:, 2]).mean(dim=(1, 2))
    assert (red_minus_blue[:3] > 0).all() and (red_minus_blue[3:] < 0).all()   # cats red, dogs blue
    x, y = data.batch(7, 6)
    assert x.shape == (6, 3, 8, 8) and torch.equal(x, data.batch(7, 6)[0]) and torch.equal(y, data.batch(7, 6)[1])
    shards = [data.batch(7, 2, rank, 3) for rank in range(3)]
    assert torch.equal(interleave([s[0] for s in shards]), x) and torch.equal(interleave([s[1] for s in shards]), y)
    assert ImageFolder.from_dir(str(folder), image_size=4, in_channels=1).images.shape == (5, 1, 4, 4)


def test_image_folder_errors(tmp_path, folder):
    with pytest.raises(SwarmError, match="image folder .*missing does not exist"):
        ImageFolder.from_dir(tmp_path / "missing", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SwarmError, match="image folder .*empty has no class subfolders"):
        ImageFolder.from_dir(tmp_path / "empty", 8)
    (folder / "eel").mkdir()
    (folder / "eel" / "readme.txt").write_text("no pictures here")
    with pytest.raises(SwarmError, match="class folder .*eel has no images"):
        ImageFolder.from_dir(folder, 8)
    (folder / "eel" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(SwarmError, match="cannot read image .*broken.png: corrupt or not an image"):
        ImageFolder.from_dir(folder, 8)
    with pytest.raises(SwarmError, match="in_channels 1 .* or 3 .*, not 2"):
        ImageFolder.from_dir(folder, 8, in_channels=2)


def test_image_folder_holds_out_every_tenth_image_of_each_class(tmp_path):
    for name, base in (("cat", (200, 20, 20)), ("dog", (20, 20, 200))):
        (tmp_path / name).mkdir()
        for i in range(12 if name == "cat" else 3):   # cat's 10th image (09.png) is held out, dog has none to spare
            write_image(tmp_path / name / f"{i:02d}.png", (8, 8), (base[0], 10 * i, base[2]))
    train, held = ImageFolder.from_dir(tmp_path, 8), ImageFolder.from_dir(tmp_path, 8, held_out=True)
    assert train.labels.tolist() == [0] * 11 + [1] * 3 and held.labels.tolist() == [0]
    assert train.images.mean(dim=(0, 2, 3)).abs().max() < 1e-5   # normalised by the training images
    assert not any(torch.allclose(held.images[0], x) for x in train.images)
    model_io = ([1, 3, 8, 8], "float32", [1, 4])
    trained, _ = training_data(str(tmp_path), *model_io)
    assert torch.equal(trained.images, train.images) and torch.equal(trained.labels, train.labels)
    batches = validation_data(str(tmp_path), *model_io, batches=2, batch_size=3)   # the one held-out image, 6 times
    assert [tuple(x.shape) for x, _ in batches] == [(3, 3, 8, 8)] * 2
    assert all(torch.equal(image, held.images[0]) for x, _ in batches for image in x)
    assert torch.cat([y for _, y in batches]).tolist() == [0] * 6
    for name in ("09.png", "10.png", "11.png"):
        (tmp_path / "cat" / name).unlink()   # no class has ten images: none held out
    with pytest.raises(SwarmError, match=r"image folder .* holds out no images: every 10th image of each class") as err:
        validation_data(str(tmp_path), *model_io, batches=1, batch_size=1)
    assert "\n" not in str(err.value)


def test_synthetic_and_generated_validation_is_fixed_and_apart_from_training():
    model_io = ([1, 3, 8, 8], "float32", [1, 4])
    batches = validation_data("synthetic-images", *model_io, batches=3, batch_size=16)
    again = validation_data("auto", *model_io, batches=3, batch_size=16)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    assert batches[0][0].shape == (16, 3, 8, 8) and not torch.equal(batches[0][0], batches[1][0])
    images, _ = training_data("synthetic-images", *model_io)
    trained = {tuple(row) for step in range(20) for row in images.batch(step, 16)[0].flatten(1).tolist()}
    assert not trained & {tuple(row) for x, _ in batches for row in x.flatten(1).tolist()}
    assert set(torch.cat([y for _, y in batches]).tolist()) == {0, 1, 2, 3}   # the same classes as training

    text = generated_corpus()
    windows = validation_data("generated", *GPT2_TINY, batches=4, batch_size=8)
    assert windows[0][0].shape == (8, 128) and windows[0][0].dtype == torch.int64
    assert all(torch.equal(a[0], b[0]) for a, b in zip(windows, validation_data("auto", *GPT2_TINY, batches=4, batch_size=8)))
    for x, y in windows:
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
            assert bytes(row) not in text   # another seed's sequence of sentences, never the training text's


def test_local_text_holds_out_its_last_tenth(tmp_path):
    numbers = b"".join(b"%07d|" % i for i in range(2500))   # 20,000 bytes; every 8-byte group says where it is
    (tmp_path / "a.txt").write_bytes(numbers[:12_000])
    (tmp_path / "b.txt").write_bytes(numbers[12_000:])
    joined = numbers[:12_000] + b"\n" + numbers[12_000:]
    train_part, val_part = held_out_tail(joined)
    assert len(val_part) == len(joined) // 10 == 2000 and train_part + val_part == joined
    model_io, cut = ([1, 32], "int64", [1, 32, 256]), len(train_part)
    source = str(tmp_path / "*.txt")
    data, loss = training_data(source, *model_io)
    assert loss is lm_loss and bytes(data.data.tolist()) == train_part
    for step in range(50):
        x, y = data.batch(step, 16)
        for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
            assert joined.find(bytes(row)) + 33 <= cut   # every training window ends before the held-out tail
    batches = validation_data(source, *model_io, batches=5, batch_size=8)
    listed = validation_data([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], *model_io, batches=5, batch_size=8)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, listed))
    starts = [joined.find(bytes(row)) for x, y in batches for row in torch.cat([x, y[:, -1:]], dim=1).tolist()]
    assert min(starts) == cut and max(starts) == len(joined) - 33 and starts == sorted(starts)   # spread over the tail
    (tmp_path / "b.txt").write_bytes(b"b" * 10)
    short = r"held-out text of .*a.txt is 1200 bytes, shorter than one sequence of 1201: local text holds out its last 1/10"
    with pytest.raises(SwarmError, match=short):
        validation_data(str(tmp_path / "a.txt"), [1, 1200], "int64", [1, 1200, 256], batches=1, batch_size=1)
    with pytest.raises(SwarmError, match="at least one batch of one sample, not 0 of 8"):
        validation_data(source, *model_io, batches=0, batch_size=8)


def test_validation_batches_shard_among_replicas():
    batches = validation_data("generated", [1, 16], "int64", [1, 16, 256], batches=2, batch_size=6)
    parts = [shard(batches, rank, 3) for rank in range(3)]
    assert all(p[0][0].shape == (2, 16) for p in parts)
    for i, (x, y) in enumerate(batches):
        assert torch.equal(interleave([p[i][0] for p in parts]), x) and torch.equal(interleave([p[i][1] for p in parts]), y)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(shard(batches, 0, 1), batches))
    with pytest.raises(SwarmError, match="replica rank 3 is not in 0..2"):
        shard(batches, 3, 3)


def test_bits_per_byte_and_perplexity():
    uniform = lm_loss(torch.zeros(2, 5, 256), torch.randint(0, 256, (2, 5))).item()
    assert math.isclose(bits_per_byte(uniform), 8.0, rel_tol=1e-6) and math.isclose(perplexity(uniform), 256.0, rel_tol=1e-6)
    assert bits_per_byte(math.log(2)) == 1.0 and perplexity(0.0) == 1.0 and perplexity(1e6) == math.inf


@pytest.fixture(scope="module")
def shakespeare():
    """The real corpus (``make setup`` fetched it): (training, validation) documents."""
    return corpus.split(corpus.read_documents())


def test_shakespeare_trains_a_byte_level_lm_on_the_training_plays_only(shakespeare):
    train, validation = shakespeare
    data, loss = training_data("shakespeare", *GPT2_TINY)
    assert loss is lm_loss and len(data.data) == sum(len(d.text) + 1 for d in train) - 1
    x, y = data.batch(0, 64)
    assert x.shape == y.shape == (64, 128) and x.dtype == y.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.max()) < 256 and bytes(x.flatten().tolist()).count(b"the ") > 20   # English, 8 KiB of it
    train_text = bytes(data.data.tolist())
    batches = validation_data("shakespeare", *GPT2_TINY, batches=4, batch_size=8)
    assert [tuple(b[0].shape) for b in batches] == [(8, 128)] * 4
    rows = [bytes(row) for x, y in batches for row in torch.cat([x, y[:, -1:]], dim=1).tolist()]
    val_text = b"\n".join(d.text for d in validation)
    assert all(row in val_text and row not in train_text for row in rows)
    assert rows[0] == val_text[:129] and rows[-1] == val_text[-129:]   # spread over all the validation plays


def _validation_digest(source: str) -> str:
    batches = validation_data(source, *GPT2_TINY, batches=3, batch_size=4)
    return hashlib.sha256(b"".join(t.numpy().tobytes() for b in batches for t in b)).hexdigest()


def test_validation_batches_are_the_same_in_another_process(tmp_path):
    (tmp_path / "notes.txt").write_bytes(generated_corpus(20_000, seed=7))
    sources = ["shakespeare", str(tmp_path / "notes.txt"), "generated"]
    code = ("import sys; from tests.test_data import _validation_digest as d; "
            "print(' '.join(d(s) for s in sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", code, *sources], capture_output=True, text=True, timeout=120, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"}).stdout.split()
    assert out == [_validation_digest(s) for s in sources]
