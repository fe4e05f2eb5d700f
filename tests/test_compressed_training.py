"""AdaTopK on the pipeline's links at >= 10x on the wire still trains gpt2-tiny as well as without
compression (the stage servers' real path: frames, masks, channel scales; in one process)."""
import asyncio

import pytest

from swarm.compression.policy import LinkPolicy
from swarm.data import ByteCorpus, generated_corpus, lm_loss
from swarm.models import trace_model
from swarm.runtime.local import local_servers
from swarm.runtime.rpc import train_step

STEPS, MICRO_BATCHES, MICRO_BATCH_SIZE = 50, 4, 4


def train(mode: str, ratio: float = 1.0, n_stages: int = 3) -> tuple[list[float], float]:
    """Losses of every step and the achieved wire ratio (activations + gradients, raw / sent)."""
    traced = trace_model("gpt2-tiny", "coarse", MICRO_BATCH_SIZE)
    servers = local_servers(traced, n_stages, lm_loss, lambda: LinkPolicy(mode, 1.0, 1.0, 1, 1e9, fixed_ratio=ratio))
    corpus = ByteCorpus(generated_corpus(), 128)

    async def run() -> list[float]:
        return [await train_step(servers[0], *corpus.batch(step, MICRO_BATCHES * MICRO_BATCH_SIZE), MICRO_BATCHES, 3)
                for step in range(STEPS)]

    losses = asyncio.run(run())
    counters = [s.counters for s in servers]
    return losses, sum(c.act_raw for c in counters) / sum(c.act_wire for c in counters)


@pytest.mark.slow
def test_adatopk_at_10x_on_the_wire_trains_within_5_percent_of_uncompressed():
    plain, plain_ratio = train("off")
    packed, ratio = train("fixed", 10.0)
    assert plain_ratio == pytest.approx(1.0) and ratio >= 10.0
    final = lambda losses: sum(losses[-5:]) / 5   # noqa: E731  (each step's batch is new data: a held-out loss)
    assert final(packed) <= 1.05 * final(plain), (final(packed), final(plain))
    assert final(packed) < 0.6 * packed[0]   # it really learned
