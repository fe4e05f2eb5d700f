"""The backup pool's rules without a network: who keeps snapshots, how a sole holder's steps are gated
on acknowledged snapshots (the K-step bound), that a dead backup does not stall training, and how a
new owner spreads its fetches over donors (the checks on a received snapshot: tests/test_state.py)."""
import asyncio

from swarm.churn.adoption import donor_order
from swarm.churn.backup import SnapshotPusher, backups
from swarm.runtime.state import OpState
from swarm.scheduler.plan import Plan, StagePlan


def plan_of(groups: list[tuple[str, ...]], spares: tuple[str, ...] = ()) -> Plan:
    stages = tuple(StagePlan(i, i, i + 1, (f"op{i}",), peers, 0.1, 1.0, 0.0) for i, peers in enumerate(groups))
    return Plan("m", stages, (), spares, 0.1, 1.0, 4)


def test_spares_keep_single_holder_stages_in_turn_then_the_nearest_stages():
    plan = plan_of([("a",), ("b", "c"), ("d",), ("e",)], spares=("s1", "s2"))
    assert backups(plan) == {0: ["s1"], 2: ["s2"], 3: ["s1"]}                 # replicated stage 1 needs none
    assert backups(plan, copies=3) == {0: ["s1", "s2", "b"], 2: ["s2", "s1", "e"], 3: ["s1", "s2", "d"]}
    no_spares = plan_of([("a",), ("b",), ("c",)])
    assert backups(no_spares, copies=2) == {0: ["b", "c"], 1: ["c", "a"], 2: ["b", "a"]}
    assert backups(plan_of([("a",)])) == {}                                   # nobody else: no backup


class Holder:
    """A sole holder's steps against backups whose transfers the test completes by hand."""

    def __init__(self, every: int, peers=("k1",)):
        self.step, self.log, self.broken = 0, [], []
        self.transfers: list[tuple[str, int, asyncio.Future]] = []
        self.pusher = SnapshotPusher(self.capture, self.send, list(peers), every, self.log.append)

    async def capture(self) -> dict[str, OpState]:
        return {"op0": OpState(self.step, {})}

    async def send(self, peer: str, states: dict[str, OpState]) -> None:
        done = asyncio.get_running_loop().create_future()
        self.transfers.append((peer, states["op0"].step, done))
        await done   # the test resolves it (or sets an exception: the backup failed)

    async def apply(self, step: int) -> asyncio.Task:
        """Start applying ``step``; the task is done once the gate let it through."""
        async def run():
            await self.pusher.before_apply(step)
            if not (self.pusher.failing or self.pusher.acked >= step + 2 - self.pusher.every):
                self.broken.append(step)   # the K-step bound (checked by the tests)
            self.step = step + 1
        task = asyncio.ensure_future(run())
        await settle()
        return task

    async def kept(self, k: int, error: Exception | None = None) -> None:
        """Transfer ``k`` ends: kept, or failed with ``error``."""
        done = self.transfers[k][2]
        done.set_exception(error) if error else done.set_result(None)
        await settle()


async def settle() -> None:
    """Run every callback that is ready (no time passes): a task still pending afterwards is blocked."""
    for _ in range(20):
        await asyncio.sleep(0)


def test_a_sole_holder_never_runs_more_than_k_steps_ahead_of_an_acknowledged_snapshot():
    async def main():
        h = Holder(every=4)        # K = 4: pushes every 2 steps; after step s, a snapshot of s - 2 or newer kept
        for step in range(2):      # a push of step 0 starts; steps 0-1 need nothing kept yet
            assert (await h.apply(step)).done()
        gated = await h.apply(2)   # needs step 0 kept
        assert not gated.done() and [(p, s) for p, s, _ in h.transfers] == [("k1", 0)]
        await h.kept(0)
        assert gated.done() and h.pusher.acked == 0
        assert [s for _, s, _ in h.transfers] == [0, 2]   # the next push started as soon as the first landed
        gated = await h.apply(3)   # needs step 1 or newer: the push of step 2, still in flight
        assert not gated.done()
        await h.kept(1)
        assert gated.done() and h.pusher.acked == 2
        assert (await h.apply(4)).done() and [s for _, s, _ in h.transfers] == [0, 2, 4]
        gated = await h.apply(5)   # transfers slower than K/2 steps: the holder waits, the bound holds
        assert not gated.done()
        await h.kept(2)
        assert gated.done() and h.pusher.acked == 4
        for step in range(6, 12):  # transfers that land at once: pushes every K/2 steps, no wait
            assert (await h.apply(step)).done()
            for k, (_, _, done) in enumerate(h.transfers):
                if not done.done():
                    await h.kept(k)
        assert [s for _, s, _ in h.transfers] == [0, 2, 4, 6, 8, 10] and not h.log and not h.broken
    asyncio.run(main())


def test_a_failed_backup_is_not_waited_for_again_and_one_of_several_copies_is_enough():
    async def main():
        h = Holder(every=3, peers=("k1", "k2"))
        assert (await h.apply(0)).done() and len(h.transfers) == 2
        gated = await h.apply(1)
        assert not gated.done()
        await h.kept(1)            # k2 kept it, k1 is still transferring: enough
        assert gated.done() and h.pusher.acked == 0
        await h.kept(0, ConnectionError("k1 died"))
        gated = await h.apply(2)   # a new push to both, waited for
        assert not gated.done() and len(h.transfers) == 4
        await h.kept(2, ConnectionError("gone"))
        await h.kept(3, ConnectionError("gone"))
        assert gated.done() and h.pusher.failing and len(h.log) == 1 and "no backup took" in h.log[0]
        for step in range(3, 9):   # no backup reachable: training goes on without waiting, warned once
            assert (await h.apply(step)).done()
            for k, (_, _, done) in enumerate(h.transfers):
                if not done.done():
                    await h.kept(k, ConnectionError("gone"))
        assert h.step == 9 and len(h.log) == 1 and h.pusher.acked == 0 and not h.broken   # unprotected, as warned
    asyncio.run(main())


def test_fetches_spread_over_the_donors_that_hold_the_newest_step():
    sources = {f"op{k}": ["d1", "d2", "d3"] for k in range(6)} | {"solo": ["d2"]}
    order = donor_order(sources)
    firsts = [order[op][0] for op in sorted(sources) if op != "solo"]
    assert sorted(firsts) == ["d1", "d1", "d2", "d2", "d3", "d3"]           # each donor gives a third
    assert all(sorted(order[op]) == ["d1", "d2", "d3"] for op in order if op != "solo")   # the rest are fall-backs
    assert order["solo"] == ["d2"]

