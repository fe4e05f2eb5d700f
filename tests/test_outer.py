"""Replicas that synchronise rarely (``swarm.runtime.outer``, docs/sync.md): the codec and its error
feedback, the outer optimizer, and a stage on two replicas in one process: ``sync_every = 1`` is
exactly the synchronous path, ``H > 1`` takes inner steps apart and meets at every sync, compressed,
and the state a joiner takes is the last synced one."""
import asyncio
import copy

import pytest
import torch
import torch.nn.functional as F

from swarm.dag.stages import extract_stages, input_specs
from swarm.dag.trace import trace
from swarm.errors import RemoteProtocolError
from swarm.models import load_model
from swarm.pipeline import Neighbours, StageServer, local_caller, train_step
from swarm.runtime import StageWorker
from swarm.runtime.outer import ErrorFeedback, OuterCodec, OuterSettings, OuterState, outer_tensors, resume_outer
from swarm.runtime.state import capture, op_tensors


def lm_loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@pytest.mark.parametrize("compression,ratio", [("off", 1.0), ("int8", 3.9), ("topk8", 12.7)])
def test_codecs_decode_what_their_shapes_say_and_compress_as_priced(compression, ratio):
    codec = OuterCodec(compression, 1 / 16)
    v = torch.randn(10_000)
    payload = codec.encode(v)
    assert {k: (list(t.shape), str(t.dtype)[6:]) for k, t in payload.items()} == codec.shapes(v.numel())
    assert codec.ratio(10_000) >= ratio
    out = codec.decode(payload, v.numel())
    if compression == "off":
        assert torch.equal(out, v)
    elif compression == "int8":
        assert (out - v).abs().max() <= v.abs().max() / 127 * 0.51
    else:   # the largest 1/16 of the values, each within int8 of itself; zeros elsewhere
        kept = out != 0
        assert int(kept.sum()) == codec.kept(v.numel()) and v[kept].abs().min() >= v[~kept].abs().max()


def test_malformed_exchanges_are_refused_in_one_line():
    codec, v = OuterCodec("topk8", 0.1), torch.randn(100)
    good = codec.encode(v)
    bad = [{**good, "i": good["i"].flip(0)},                                   # indices not increasing
           {**good, "i": good["i"] + 1000},                                    # out of range
           {**good, "s": -good["s"]},                                          # negative scales
           {**good, "q": good["q"][:-1]},                                      # wrong shape
           {"g": v}]                                                           # another codec's tensors
    for payload in bad:
        with pytest.raises(RemoteProtocolError, match="outer exchange"):
            codec.decode(payload, 100)


def test_error_feedback_sends_everything_eventually():
    feedback = ErrorFeedback(OuterCodec("topk8", 1 / 16), 4096)
    torch.manual_seed(0)
    total_in, total_sent = torch.zeros(4096), torch.zeros(4096)
    for _ in range(200):
        v = torch.randn(4096)
        _, sent = feedback.encode(v)
        total_in += v
        total_sent += sent
    # what is not sent yet is exactly the residual, and it stays bounded while the inputs' sum grows
    assert torch.allclose(total_in - total_sent, feedback.residual, atol=1e-3)
    assert feedback.residual.norm() < 0.5 * total_in.norm() + 60


def test_the_outer_step_is_sgd_with_nesterov_momentum_on_the_pseudo_gradient():
    torch.manual_seed(0)
    settings = OuterSettings(sync_every=4, lr=0.7, momentum=0.9)
    anchor = torch.randn(50)
    state = OuterState(settings, anchor)
    ref = torch.nn.Parameter(anchor.clone())
    opt = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=True)
    for _ in range(3):
        delta = torch.randn(50) * 0.1
        new = state.apply(delta)
        ref.grad = delta.clone()
        opt.step()
        assert torch.allclose(new, ref.detach(), atol=1e-6)


def _stage_on_two_replicas(outer, replicas=("b1", "b2")):
    """Stage 0 on ``a``; stage 1 (the last) on replicas ``b1``, ``b2`` (or ``replicas``) with the same
    initial weights."""
    torch.manual_seed(0)
    built = load_model("gpt2-tiny")
    traced = trace(built.module, built.example_inputs(2), "coarse", name=built.name)
    first, second = extract_stages(traced, traced.dag.balanced_partition(2))
    servers = {}
    servers["a"] = StageServer(StageWorker(first, "adam", 1e-3, max_batch=64, input_specs=input_specs(traced.dag, first.io)),
                               Neighbours("a", ("a",), (), replicas), local_caller("a", servers), outer=outer)
    for b in replicas:
        worker = StageWorker(copy.deepcopy(second), "adam", 1e-3, loss_fn=lm_loss, max_batch=64,
                             input_specs=input_specs(traced.dag, second.io))
        servers[b] = StageServer(worker, Neighbours(b, replicas, ("a",), ()), local_caller(b, servers), outer=outer)
    return traced, servers


def _train(servers, steps: int, after=None, in_flight: int = 4) -> list[float]:
    gen = torch.Generator().manual_seed(1)

    async def run():
        losses = []
        for step in range(steps):
            data = torch.randint(0, 256, (8, 129), generator=gen)
            losses.append(await train_step(servers["a"], data[:, :-1], data[:, 1:], micro_batches=4, in_flight=in_flight))
            if after is not None:
                after(step)
        return losses
    try:
        return asyncio.run(asyncio.wait_for(run(), 300))
    finally:
        for s in servers.values():
            s.close()


def _params(server) -> list[torch.Tensor]:
    return [p.detach().clone() for p in server.worker.params]


def test_sync_every_1_is_exactly_synchronous_data_parallelism():
    _, sync = _stage_on_two_replicas(None)
    _, h1 = _stage_on_two_replicas(OuterSettings(sync_every=1, compression="off"))
    assert _train(sync, 3, in_flight=1) == _train(h1, 3, in_flight=1)   # one micro-batch at a time: one summation order
    for name in ("a", "b1", "b2"):
        assert all(torch.equal(x, y) for x, y in zip(_params(sync[name]), _params(h1[name])))
    assert h1["b1"].sync.state is None and h1["b1"].counters.syncs == 0


@pytest.mark.parametrize("compression", ["off", "topk8"])
def test_replicas_step_apart_between_syncs_and_meet_at_each_sync(compression):
    outer = OuterSettings(sync_every=3, compression=compression, overlap=False)
    _, servers = _stage_on_two_replicas(outer)
    seen = {}

    def after(step):
        b1, b2 = _params(servers["b1"]), _params(servers["b2"])
        seen[step] = all(torch.equal(x, y) for x, y in zip(b1, b2))
        seen[f"sent{step}"] = sum(servers["b1"].counters.reduce_to.values())
    _train(servers, 6, after)
    assert [seen[s] for s in range(6)] == [False, False, True, False, False, True]   # syncs after steps 2 and 5
    assert seen["sent0"] == seen["sent1"] == 0 and seen["sent2"] > 0 and seen["sent3"] == seen["sent2"]
    assert servers["b1"].counters.syncs == servers["b2"].counters.syncs == 2
    anchor = servers["b1"].sync.state.anchor
    assert torch.equal(anchor, servers["b1"].worker.flat_params()) and torch.equal(anchor, servers["b2"].sync.state.anchor)
    numel = servers["b1"].protocol.flat_numel
    per_sync = seen["sent2"]   # b1 sends its contribution to b2's part (half the vector) once per sync
    assert per_sync < (4 * numel / 2 / 10 + 4096 if compression == "topk8" else 4 * numel)


def test_an_overlapped_sync_trains_on_and_lands_one_sync_late():
    outer = OuterSettings(sync_every=2, compression="topk8", overlap=True)
    _, servers = _stage_on_two_replicas(outer)
    start = servers["b1"].worker.flat_params()
    seen = {}

    def after(step):
        b1, b2 = (servers[b].sync.state for b in ("b1", "b2"))
        seen[step] = (torch.equal(b1.anchor, b2.anchor), torch.equal(b1.anchor, start),
                      torch.equal(servers["b1"].worker.flat_params(), servers["b2"].worker.flat_params()))
    _train(servers, 7, after)
    # the anchors agree all along; the first sync (after step 1) only starts an exchange, the second
    # (after step 3) applies it; the replicas keep their own newest period, so they never coincide
    assert all(seen[s][0] for s in range(7)) and not any(seen[s][2] for s in range(7))
    assert [seen[s][1] for s in range(7)] == [True, True, True, False, False, False, False]
    assert servers["b1"].counters.syncs == 3 and servers["b1"].sync.exchange is not None
    sent = servers["b1"].counters.reduce_to.get("b2", 0)   # three syncs' contributions, compressed
    assert 0 < sent < 3 * 4 * servers["b1"].protocol.flat_numel / 2 / 10


def test_a_lost_reply_of_an_overlapped_sync_is_asked_for_again_and_the_anchors_stay_one():
    """b1 sums b2's part of the first sync, but the reply to b2 is lost: b2 asks again and gets the
    sum b1 kept, so both apply the same outer step (without it b2 dropped it and the anchors parted)."""
    from swarm.errors import PeerUnavailable
    from swarm.messages import REDUCE
    from swarm.wire import read_header

    outer = OuterSettings(sync_every=2, compression="topk8", overlap=True)
    _, servers = _stage_on_two_replicas(outer)
    link, lost = servers["b2"].link, []
    passed = link.call

    async def lossy(peer: str, frame: bytes) -> bytes:
        reply = await passed(peer, frame)
        if peer == "b1" and read_header(frame).kind == REDUCE and not lost:
            lost.append(read_header(frame).meta["step"])
            raise PeerUnavailable("the reply was lost on the way")
        return reply
    link.call = lossy
    start, agree = servers["b1"].worker.flat_params(), []

    def after(step):
        b1, b2 = (servers[b].sync.state for b in ("b1", "b2"))
        agree.append((torch.equal(b1.anchor, b2.anchor), torch.equal(b1.anchor, start)))   # (same, not moved yet)
    _train(servers, 7, after)
    assert lost == [1]
    assert all(same for same, _ in agree) and [unmoved for _, unmoved in agree] == [True] * 3 + [False] * 4


def test_a_part_whose_owner_answered_some_replicas_then_died_lands_on_all_of_them():
    """b3 sums its part of the first sync and answers b1, then is gone for b2 (every call fails): b2
    takes the part's sum from b1 (``Gather``), so all three apply the same outer step; without it b2
    dropped the step and its anchor parted from the others' for good."""
    from swarm.errors import PeerUnavailable
    from swarm.messages import GATHER, REDUCE
    from swarm.wire import read_header

    outer = OuterSettings(sync_every=2, compression="topk8", overlap=True)
    _, servers = _stage_on_two_replicas(outer, ("b1", "b2", "b3"))
    link, refused, gathered = servers["b2"].link, [], []
    passed = link.call

    async def owner_gone(peer: str, frame: bytes) -> bytes:
        header = read_header(frame)
        reply = await passed(peer, frame)   # b3 takes b2's contribution and sums its part ...
        if peer == "b3" and header.kind == REDUCE and header.meta["step"] == 1:
            refused.append(header.meta["step"])   # ... and answers b1, but is gone before answering b2
            raise PeerUnavailable("peer b3 is gone")
        if header.kind == GATHER:
            gathered.append((peer, header.meta["part"], read_header(reply).kind))
        return reply
    link.call = owner_gone
    start, agree = servers["b1"].worker.flat_params(), []

    def after(step):
        anchors = [servers[b].sync.state.anchor for b in ("b1", "b2", "b3")]
        agree.append((all(torch.equal(anchors[0], x) for x in anchors[1:]), torch.equal(anchors[0], start)))
    _train(servers, 5, after)
    assert refused == [1, 1, 1] and gathered == [("b1", 2, "reduced")]   # PART_TRIES to b3, then b1 answers
    assert all(same for same, _ in agree) and [unmoved for _, unmoved in agree] == [True] * 3 + [False] * 2


def test_a_gather_nobody_can_answer_drops_the_outer_step_on_every_replica_alike():
    """b3 answers nobody at the first sync: b1 and b2 each ask the other, neither has the part, and both
    drop the outer step (bounded, no deadlock); the anchors stay one and move at the next sync."""
    from swarm.errors import PeerUnavailable
    from swarm.messages import REDUCE
    from swarm.wire import read_header

    outer = OuterSettings(sync_every=2, compression="topk8", overlap=True)
    _, servers = _stage_on_two_replicas(outer, ("b1", "b2", "b3"))
    for b in ("b1", "b2"):
        passed = servers[b].link.call

        async def owner_gone(peer: str, frame: bytes, passed=passed) -> bytes:
            header = read_header(frame)
            if peer == "b3" and header.kind == REDUCE and header.meta["step"] == 1:
                raise PeerUnavailable("peer b3 is gone")
            return await passed(peer, frame)
        servers[b].link.call = owner_gone
    for server in servers.values():   # b3 waits that long for the contributions that never come
        server.timeout_s = 5.0
    start, agree = servers["b1"].worker.flat_params(), []

    def after(step):
        anchors = [servers[b].sync.state.anchor for b in ("b1", "b2")]
        agree.append((torch.equal(*anchors), torch.equal(anchors[0], start)))
    _train(servers, 7, after)
    # the sync after step 1 is dropped where it would land (step 3); the one after step 3 lands at step 5
    assert all(same for same, _ in agree) and [unmoved for _, unmoved in agree] == [True] * 5 + [False] * 2


def test_the_last_step_lands_the_exchange_in_flight_and_the_replicas_end_on_one_anchor():
    outer = OuterSettings(sync_every=2, compression="topk8", overlap=True)
    runs = {}
    for last_step in (None, 5):   # syncs after steps 1, 3, 5; the last one lands at once or one sync late
        _, servers = _stage_on_two_replicas(outer)
        for b in ("b1", "b2"):
            servers[b].sync.last_step = last_step
        _train(servers, 6)
        runs[last_step] = servers
    late, landed = runs[None], runs[5]
    assert [late[b].sync.state.version for b in ("b1", "b2")] == [2, 2] and late["b1"].sync.exchange is not None
    b1, b2 = (landed[b] for b in ("b1", "b2"))
    assert b1.sync.state.version == b2.sync.state.version == 3 and b1.sync.exchange is None
    assert torch.equal(b1.sync.state.anchor, b2.sync.state.anchor)
    assert torch.equal(b1.worker.flat_params(), b1.sync.state.anchor) and torch.equal(b2.worker.flat_params(), b1.sync.state.anchor)
    assert not torch.equal(late["b1"].worker.flat_params(), late["b2"].worker.flat_params())   # each its own newest period


def test_a_joiner_takes_the_last_synced_parameters_and_the_outer_momentum():
    outer = OuterSettings(sync_every=2, compression="off", overlap=False)
    traced, servers = _stage_on_two_replicas(outer)
    _train(servers, 3)   # a sync after step 1, then one inner step: b1 is ahead of its anchor
    worker, state = servers["b1"].worker, servers["b1"].sync.state
    assert not torch.equal(worker.flat_params(), state.anchor)
    owned = op_tensors(traced.dag, traced.gm)
    ops = [op for op in worker.stage.io.ops if op in owned]
    states = capture(worker.stage.module, worker.optimizer, owned, ops, worker.step_id,
                     outer=outer_tensors(state, worker.stage.module, worker.params))
    with_params = [st for st in states.values() if any(k[:2] == "p:" for k in st.tensors)]
    assert with_params and all(any(k[:2] == "a:" for k in st.tensors) and any(k[:2] == "m:" for k in st.tensors)
                               for st in with_params)

    def resumed(own):
        fresh = StageWorker(copy.deepcopy(worker.stage), "adam", 1e-3, loss_fn=lm_loss)
        fresh.resume(states, worker.step_id)
        return fresh, resume_outer(states, fresh.stage.module, fresh.params, own)
    joiner, taken = resumed(set())   # taken over from b1: the last synced parameters
    assert torch.equal(joiner.flat_params(), state.anchor)
    assert torch.equal(taken.anchor, state.anchor) and torch.equal(taken.momentum, state.momentum)
    again, kept = resumed(None)   # b1's own states (a new plan): its inner steps are kept
    assert torch.equal(again.flat_params(), worker.flat_params()) and torch.equal(kept.anchor, state.anchor)
