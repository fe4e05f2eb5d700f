"""Bundled training data: deterministic, sharded without overlap, one-line errors."""
import pytest
import torch

from swarm.data import ByteCorpus, generated_corpus
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
