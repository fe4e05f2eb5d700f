"""Bundled training data: deterministic, sharded without overlap, one-line errors."""
import pytest
import torch
from PIL import Image

from swarm.config import NodeConfig, validate
from swarm.data import ByteCorpus, ImageFolder, SyntheticImages, generated_corpus, training_data
from swarm.errors import SwarmError


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
    assert len(training_data(str(tmp_path / "a.txt"), *model_io)[0].data) == 5000   # one path, as before
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
