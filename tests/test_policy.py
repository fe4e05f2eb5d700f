"""AdaTopK's run-time rule: off, warm-up, fixed; in auto mode the slower the link the harder the
ratio, none where raw transfer fits or compression does not pay; measured compute and codec time count."""
import pytest

from swarm.compression.policy import LinkPolicy

MB = 1 << 20


def policy(**kw) -> LinkPolicy:
    args = dict(mode="auto", cut_bytes=1 * MB, budget_s=0.05, flows=1, planned_bps=100e6, warmup_steps=0)
    return LinkPolicy(**{**args, **kw})


def test_modes_and_warm_up():
    assert policy(mode="off").ratio(100, 1e6) == 1.0
    assert policy(mode="fixed", fixed_ratio=12).ratio(100, 10e9) == 12
    assert policy(warmup_steps=20).ratio(19, 1e6) == 1.0 and policy(warmup_steps=20).ratio(20, 1e6) > 1


def test_slower_links_compress_harder_and_fast_links_not_at_all():
    p = policy()
    ratios = [p.ratio(50, bps) for bps in (10e9, 1e9, 300e6, 100e6, 30e6, 10e6)]
    assert ratios[0] == ratios[1] == 1.0                  # 2 MB in 50 ms needs ~340 Mbit/s: fits raw
    assert ratios[2:] == sorted(ratios[2:]) and 1 < ratios[2] < ratios[-1] <= p.max_ratio
    assert p.ratio(50, None) == p.ratio(50, 100e6)       # not measured yet: the plan's bandwidth


def test_measured_compute_and_codec_time_count():
    p = policy()
    planned = p.ratio(50, 100e6)
    p.observe_compute(0.5)                                # the stage is 10x slower than planned: less to gain
    assert p.ratio(50, 100e6) < planned
    slow = policy()
    slow.observe_codec(1 * MB, 2.0)                       # codec at 0.5 MB/s: compressing costs more than it saves
    assert slow.ratio(50, 100e6) == 1.0 and policy().ratio(50, 100e6) > 1
    assert slow.codec_bytes_per_s == pytest.approx(MB / 2.0)
