"""AdaTopK on the pipeline's links at >= 10x on the wire still trains gpt2-tiny as well as without
compression (the stage servers' real path: frames, masks, channel scales; in one process)."""
import pytest

from benchmarks.compression import train

STEPS = 50


@pytest.mark.slow
@pytest.mark.scenario   # 50 s: run by `python -m benchmarks.scenarios`; the accuracy claim itself is measured as
# validation loss on held-out text, 3 seeds, by `python -m benchmarks.compression` (docs/benchmarks.md)
def test_adatopk_at_10x_on_the_wire_trains_within_5_percent_of_uncompressed():
    plain, packed = train(1.0, STEPS), train(10.0, STEPS)
    assert plain["achieved_ratio"] == pytest.approx(1.0) and packed["achieved_ratio"] >= 10.0
    # each step's batch is new data, so the last steps' losses are held-out losses
    assert packed["final_loss"] <= 1.05 * plain["final_loss"], (packed["final_loss"], plain["final_loss"])
    assert packed["final_loss"] < 0.6 * packed["losses"][0]   # it really learned
