"""The geo benchmark's analytic bound: hand-computed on a two-stage pipeline with two replicas."""
import pytest

from benchmarks.bound import PeerStats, per_step, step_bound

RATES = {frozenset("AB"): 8e6, frozenset("AC"): 16e6, frozenset("BC"): 80e6}


def rate(a: str, b: str) -> float:
    return RATES[frozenset((a, b))]


def peers() -> dict[str, PeerStats]:
    # A (stage 0) sends 4 micro-batches to each of B and C (stage 1) per step; B and C all-reduce
    return {"A": PeerStats(0, 0.8, 8, {"B": 1e6, "C": 1e6}),
            "B": PeerStats(1, 0.8, 4, {"A": 0.5e6, "C": 1e5}, {"C": 1e5}),
            "C": PeerStats(1, 0.8, 4, {"A": 0.5e6, "B": 1e5}, {"B": 1e5})}


def test_the_bound_is_the_busiest_resource_plus_the_pipeline_fill_it_cannot_overlap():
    b = step_bound(peers(), rate)
    # A->B: 1 MB at 1 MB/s = 1.0 s busy, plus stage 0's 0.1 s per micro-batch before its first byte
    assert b.busy_step_s == pytest.approx(1.0) and b.step_s == pytest.approx(1.1) and b.limit == "link A->B"
    # with a fast A->B link, stage 1 sets it: 0.8 s of compute after stage 0's 0.1 s and one
    # micro-batch's crossing (2 MB over 8 micro-batches at 16 Mbit/s forward, half of it back)
    RATES[frozenset("AB")] = 1e9
    try:
        b = step_bound(peers(), rate)
        link = 8 * 250e3 / 1e9 + 8 * 125e3 / 1e9
        assert b.step_s == pytest.approx(0.8 + 0.1 + link) and b.limit in ("compute B", "compute C")
    finally:
        RATES[frozenset("AB")] = 8e6


def test_a_slow_all_reduce_delays_its_stage_past_the_fill():
    slow = {**RATES, frozenset("BC"): 0.4e6}   # 1e5 bytes at 50 kB/s: 2 s of all-reduce after stage 1's compute
    b = step_bound(peers(), lambda a, c: slow[frozenset((a, c))])
    assert b.step_s == pytest.approx(2.8) and b.limit in ("compute B", "compute C")


def test_per_step_rates_come_from_two_rows_of_running_counters():
    first = {"step": 2, "stage": 1, "compute_s": 1.0, "micro_batches": 8, "sent_to": {"A": 100}, "reduce_to": {}}
    last = {"step": 6, "stage": 1, "compute_s": 3.0, "micro_batches": 24, "sent_to": {"A": 500, "C": 40},
            "reduce_to": {"C": 40}}
    s = per_step(first, last)
    assert (s.stage, s.compute_s, s.micro_batches, s.sent, s.reduce) == (1, 0.5, 4, {"A": 100, "C": 10}, {"C": 10})
    with pytest.raises(ValueError):
        per_step(last, last)
