"""Remote autodiff over real libp2p streams: three stages (the middle one on two replicas that
all-reduce their gradients) in four p2p daemons train exactly like one process; garbage, stale steps,
strangers and oversized frames get error replies and the stages keep serving."""
import asyncio
import copy
import gc
import tracemalloc
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hivemind.p2p import P2P

from swarm.compression.policy import LinkPolicy
from swarm.dag.stages import extract_stages, input_specs
from swarm.dag.trace import trace
from swarm.models import load_model
from swarm.net.streams import read_frame
from swarm.pipeline import PROTOCOL, Neighbours, StageServer, local_caller, stage_caller, train_step
from swarm.runtime import StageWorker, make_optimizer
from swarm.runtime.local import local_servers
from swarm.wire import Limits, pack, unpack


def lm_loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def reference_step(model, opt, x, y, micro_batches):
    opt.zero_grad()
    losses = []
    for xm, ym in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
        loss = lm_loss(model(xm), ym)
        (loss / micro_batches).backward()
        losses.append(loss.item())
    opt.step()
    return sum(losses) / len(losses)


async def _scenario(schedule):
    torch.manual_seed(0)
    built = load_model("gpt2-tiny")
    reference = copy.deepcopy(built.module)
    traced = trace(built.module, built.example_inputs(2), "coarse", name=built.name)
    stages = extract_stages(traced, traced.dag.balanced_partition(3))
    # stage 1 twice: each replica gets its own copy of the (identical) initial weights
    layout = [stages[0], stages[1], copy.deepcopy(stages[1]), stages[2]]
    workers = [StageWorker(s, "adam", 1e-3, loss_fn=lm_loss if s.io.index == 2 else None, max_batch=64,
                           input_specs=input_specs(traced.dag, s.io)) for s in layout]
    p2ps = [await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])]
    for _ in range(3):
        p2ps.append(await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=await p2ps[-1].get_visible_maddrs()))
    ids = [p.peer_id.to_base58() for p in p2ps]
    first, mids, last = (ids[0],), tuple(sorted(ids[1:3])), (ids[3],)
    try:
        limits = Limits(max_frame_bytes=64 << 20)
        hoods = [Neighbours(ids[0], first, (), mids), Neighbours(ids[1], mids, first, last),
                 Neighbours(ids[2], mids, first, last), Neighbours(ids[3], last, mids, ())]
        servers = [StageServer(w, h, stage_caller(p, limits), limits, schedule=schedule)
                   for w, h, p in zip(workers, hoods, p2ps)]
        for p, server in zip(p2ps[1:], servers[1:]):
            await p.add_binary_stream_handler(PROTOCOL, server.handle)

        opt = make_optimizer("adam", reference.parameters(), 1e-3)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            data = torch.randint(0, 256, (8, 129), generator=gen)
            x, y = data[:, :-1], data[:, 1:]
            # the next step follows the step message down the pipeline: each stage takes it once it stepped
            loss = await train_step(servers[0], x, y, micro_batches=4, in_flight=3, settle=False)
            assert abs(loss - reference_step(reference, opt, x, y, 4)) < 1e-5
        await servers[0].settle()   # the last step reached the end of the pipeline
        assert workers[1].step_id == workers[2].step_id == workers[3].step_id == 3
        for i in (0, 1, 2, 3):
            ours = dict(workers[i].stage.module.named_parameters())
            for name, p in reference.named_parameters():
                if name in ours:
                    assert torch.allclose(ours[name], p, atol=1e-5, rtol=1e-4), name
        # the two replicas really shared the work, and their weights are bit-identical after the all-reduce
        assert servers[1].counters.bytes_sent > 0 and servers[2].counters.bytes_sent > 0
        for k in (1, 2):   # bytes by receiver add up; the all-reduce's went to the other replica only
            c, other = servers[k].counters, ids[3 - k]
            assert sum(c.sent_to.values()) == c.bytes_sent and set(c.sent_to) == {ids[0], ids[3], other}
            assert set(c.reduce_to) == {other} and 0 < c.reduce_to[other] <= c.sent_to[other]
        for a, b in zip(workers[1].params, workers[2].params):
            assert torch.equal(a, b)

        # hostile or confused callers: each gets an error reply (or a closed stream); nothing changes
        call = stage_caller(p2ps[0], limits)
        step = workers[1].step_id
        bad = [b"garbage", pack("forward", {"step": 99, "mb": 0}, {"x0": torch.zeros(1, 128, 128)})[0],
               pack("forward", {"step": step, "mb": 0}, {"x0": torch.zeros(3, 3)})[0],
               pack("forward", {"step": step, "mb": 0}, {"x0": torch.zeros(1, 4096, 128)})[0],
               pack("forward", {"step": step, "mb": -1}, {"x0": torch.zeros(1, 128, 128)})[0],
               pack("reduce", {"step": step, "part": 0}, {"g": torch.zeros(10)})[0],   # stage 0 is no replica
               pack("launch", {"step": step}, {})[0]]
        for frame in bad:
            reply = unpack(await call(ids[1], frame), limits)
            assert reply.kind == "error", reply.meta
        stranger = unpack(await stage_caller(p2ps[3], limits)(ids[1], bad[2]), limits)   # stage 2 is downstream
        assert stranger.kind == "error" and "not a previous-stage replica" in stranger.meta["message"]
        wrong_part = pack("reduce", {"step": step, "part": 1 - mids.index(ids[1])}, {"g": torch.zeros(10)})[0]
        assert unpack(await stage_caller(p2ps[2], limits)(ids[1], wrong_part), limits).kind == "error"
        _, reader, writer = await p2ps[0].call_binary_stream_handler(p2ps[1].peer_id, PROTOCOL)
        writer.write((1 << 40).to_bytes(8, "big"))   # announces a 1 TiB frame: an error reply, the frame unread
        await writer.drain()
        refused = unpack(await read_frame(reader, limits.max_frame_bytes, 30), limits)
        assert refused.kind == "error" and not refused.meta["retry"]
        assert f"frame of {1 << 40} bytes announced (limit {limits.max_frame_bytes})" in refused.meta["message"]
        writer.close()
        assert servers[1].errors >= len(bad) + 2 and not workers[1].saved and not servers[1].protocol.rounds
        before = {n: p.clone() for w in workers for n, p in w.stage.module.named_parameters()}
        data = torch.randint(0, 256, (4, 129), generator=gen)
        await train_step(servers[0], data[:, :-1], data[:, 1:], micro_batches=2)   # still serving
        assert any(not torch.equal(before[n], p) for w in workers for n, p in w.stage.module.named_parameters())
    finally:
        for p in p2ps:
            await p.shutdown()


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_pipeline_with_replicas_over_libp2p_trains_like_one_process_and_survives_garbage(schedule):
    asyncio.run(asyncio.wait_for(_scenario(schedule), 240))


def test_a_flood_of_requests_is_turned_away_and_every_wait_is_bounded():
    torch.manual_seed(0)
    built = load_model("gpt2-tiny")
    traced = trace(built.module, built.example_inputs(1), "coarse", name=built.name)
    stage = extract_stages(traced, traced.dag.balanced_partition(2))[1]
    worker = StageWorker(stage, loss_fn=lm_loss)
    hood = Neighbours("me", ("me",), ("up1", "up2"), ())
    server = StageServer(worker, hood, None, timeout_s=1.0, max_requests=4)
    step = pack("step", {"step": 0}, {})[0]

    async def flood():
        return await asyncio.gather(*(server.answer(step, "up1") for _ in range(10)))

    replies = [unpack(r) for r in asyncio.run(flood())]   # up2 never comes: every held request times out
    busy = [r for r in replies if "busy" in r.meta["message"]]
    waited = [r for r in replies if "not every previous-stage replica" in r.meta["message"]]
    assert len(busy) == 6 and len(waited) == 4 and all(r.kind == "error" and r.meta["retry"] for r in replies)
    assert server.slots == 4 and worker.step_id == 0 and not worker.saved


def test_a_micro_batch_whose_replica_is_gone_is_retried_on_another():
    torch.manual_seed(0)
    built = load_model("gpt2-tiny")
    traced = trace(built.module, built.example_inputs(1), "coarse", name=built.name)
    first, second = extract_stages(traced, traced.dag.balanced_partition(2))
    replicas = ("b1", "b2")
    servers = {}
    servers["a"] = StageServer(StageWorker(first), Neighbours("a", ("a",), (), replicas), local_caller("a", servers))
    servers["b1"] = StageServer(StageWorker(second, loss_fn=lm_loss), Neighbours("b1", replicas, ("a",), ()),
                                local_caller("b1", servers))    # b2 is gone: calls to it fail like a failed dial
    x = torch.randint(0, 256, (1, 129))
    forward = pack("forward", {"step": 0, "mb": 1, "scale": 1.0}, {"x0": x[:, :-1], "targets": x[:, 1:]})[0]
    reply = unpack(asyncio.run(servers["a"].answer(forward, "a")))   # mb 1 prefers b2
    assert reply.kind == "grads" and reply.meta["loss"] > 0 and servers["a"].counters.retries == 1
    assert servers["b1"].worker.params[0].grad is not None and not servers["b1"].worker.saved
    again = pack("forward", {"step": 0, "mb": 3, "scale": 1.0}, {"x0": x[:, :-1], "targets": x[:, 1:]})[0]
    assert unpack(asyncio.run(servers["a"].answer(again, "a"))).kind == "grads"
    assert servers["a"].counters.retries == 1   # b2 is set aside for a while: tried last, not first


def test_a_request_for_the_next_step_waits_for_the_stage_to_step():
    torch.manual_seed(0)
    built = load_model("gpt2-tiny")
    traced = trace(built.module, built.example_inputs(1), "coarse", name=built.name)
    worker = StageWorker(extract_stages(traced, traced.dag.balanced_partition(2))[1], loss_fn=lm_loss)
    server = StageServer(worker, Neighbours("me", ("me",), ("up",), ()), None, timeout_s=30.0)
    (shape, _, _), = input_specs(traced.dag, worker.stage.io)
    hidden, targets = torch.randn(1, *shape[1:]), torch.randint(0, 256, (1, shape[1]))

    def forward(step):
        return pack("forward", {"step": step, "mb": 0, "scale": 1.0}, {"x0": hidden, "targets": targets})[0]

    async def scenario():
        early = asyncio.ensure_future(server.answer(forward(1), "up"))   # step 1 while the stage is at 0
        too_far = unpack(await server.answer(forward(2), "up"))
        assert too_far.kind == "error" and too_far.meta["retry"] and "not the current step 0" in too_far.meta["message"]
        now = unpack(await server.answer(forward(0), "up"))
        assert now.kind == "grads" and now.meta["step"] == 0 and not early.done()
        assert unpack(await server.answer(pack("step", {"step": 0}, {})[0], "up")).kind == "stepped"
        later = unpack(await early)   # the stage stepped: the waiting micro-batch ran in step 1, not from a cache
        assert later.kind == "grads" and later.meta["step"] == 1 and worker.step_id == 1
        repeat = unpack(await server.answer(pack("step", {"step": 0}, {})[0], "up"))   # its first reply was lost
        assert repeat.kind == "stepped" and worker.step_id == 1
    try:
        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        server.close()


def test_first_stage_replicas_start_their_round_robin_one_replica_apart():
    hood = Neighbours("a", ("a", "b"), (), ("x", "y"), micro_batches=8)
    first = [hood.route(mb)[0] for mb in range(16)]   # replica 0 sends ids 0..7, replica 1 ids 8..15
    assert first.count("x") == first.count("y") == 8
    assert first[0] != first[8] and first[7] != first[15]   # their first and last go to different replicas
    assert hood.route(3, banned={first[3]}) == [p for p in ("x", "y") if p != first[3]] + [first[3]]


def two_stage_gpt(batch: int = 1):
    """gpt2-tiny traced at ``batch`` and cut in two (FLOP-balanced)."""
    torch.manual_seed(0)
    built = load_model("gpt2-tiny")
    traced = trace(built.module, built.example_inputs(batch), "coarse", name=built.name)
    return traced, extract_stages(traced, traced.dag.balanced_partition(2))


def test_hostile_requests_leave_nothing_behind_and_memory_stays_bounded():
    """A burst of oversized announcements, garbage, cut-off frames, wrong shapes, wrong step ids and
    strangers against a live stage server (real handler and framing, on loopback TCP): each costs an
    error reply or a closed stream, the traced Python memory never holds a frame above the limit,
    every table is empty afterwards, and the stage still trains."""
    traced, (_, stage) = two_stage_gpt()
    limits = Limits(max_frame_bytes=1 << 20)
    worker = StageWorker(stage, loss_fn=lm_loss, max_batch=1, input_specs=input_specs(traced.dag, stage.io))
    server = StageServer(worker, Neighbours("me", ("me",), ("up",), ()), None, limits, timeout_s=5.0)
    (shape, _, _), = input_specs(traced.dag, stage.io)
    hidden, targets = torch.randn(1, *shape[1:]), torch.randint(0, 256, (1, shape[1]))

    def framed(kind: str, meta: dict, tensors: dict) -> bytes:
        frame = pack(kind, meta, tensors)[0]
        return len(frame).to_bytes(8, "big") + frame

    def forward(**meta) -> bytes:
        return framed("forward", {"step": 0, "mb": 0, "scale": 1.0, **meta}, {"x0": hidden, "targets": targets})

    announced = [1 << 40, 64 << 20, limits.max_frame_bytes + 1]
    hostile = [("up", n.to_bytes(8, "big"), f"frame of {n} bytes announced (limit {limits.max_frame_bytes})")
               for n in announced] + [
        ("up", (7).to_bytes(8, "big") + b"garbage", "wire: truncated frame"),
        ("up", (1000).to_bytes(8, "big") + b"cut off", None),   # the stream ends inside the frame
        ("up", framed("forward", {"step": 0, "mb": 0, "scale": 1.0}, {"x0": torch.zeros(3, 3)}), "does not match"),
        ("up", framed("forward", {"step": 0, "mb": 0, "scale": 1.0},
                      {"x0": torch.zeros(2, *shape[1:]), "targets": targets.repeat(2, 1)}), "does not match"),
        ("up", forward(step=99), "not the current step"), ("up", forward(step=-1), "not the current step"),
        ("up", forward(step="0"), "not the current step"), ("up", forward(mb=-1), "bad micro-batch id"),
        ("up", forward(scale=5.0), "bad loss scale"), ("up", framed("step", {"step": 7}, {}), "not the current step"),
        ("up", framed("reduce", {"step": 0, "part": 0}, {"g": torch.zeros(4)}), "not a replica"),
        ("up", framed("launch", {"step": 0}, {}), "unknown request kind"),
        ("evil", forward(), "not a previous-stage replica"), ("evil", framed("step", {"step": 0}, {}), "not a previous"),
    ]

    async def scenario():
        async def serve_as(peer: str):
            info = SimpleNamespace(peer_id=SimpleNamespace(to_base58=lambda: peer))
            return await asyncio.start_server(lambda r, w: server.handle(info, r, w), "127.0.0.1", 0)

        listeners = {peer: await serve_as(peer) for peer in ("up", "evil")}

        async def request(peer: str, data: bytes):
            """The reply to ``data`` sent as ``peer`` (None: the stream closed without one)."""
            reader, writer = await asyncio.open_connection(*listeners[peer].sockets[0].getsockname()[:2])
            writer.write(data)
            writer.write_eof()
            try:
                reply = unpack(await read_frame(reader, limits.max_frame_bytes, 10), limits)
            except asyncio.IncompleteReadError:
                reply = None
            assert await asyncio.wait_for(reader.read(), 10) == b""   # the server closed the stream
            writer.close()
            return reply

        async def burst():
            replies = await asyncio.gather(*(request(peer, data) for peer, data, _ in hostile))
            for (_, data, expected), reply in zip(hostile, replies):
                if expected is None:
                    assert reply is None
                else:
                    assert reply.kind == "error" and expected in reply.meta["message"], (data[:40], reply.meta)

        try:
            await burst()   # warm-up: first-time code paths and caches are not what is measured
            tracemalloc.start()
            try:
                held = []   # traced bytes held after each burst, once what failed requests left in cycles is freed
                for _ in range(10):
                    await burst()
                    gc.collect()
                    held.append(tracemalloc.get_traced_memory()[0])
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert peak < 4 << 20, peak   # 19 requests at once: never near the 64 MiB one announced
            assert held[-1] - held[0] < 16 << 10, held   # nothing accumulates request after request
            assert server.errors == 11 * len(hostile) and server.slots == 64 and worker.step_id == 0
            assert not (server.protocol.replies or server.protocol.arrived or server.protocol.rounds or server.steps.all_in
                        or server.steps.finishing or worker.saved or server.protocol.failed)

            before = [p.clone() for p in worker.params]   # still serving: a real micro-batch and step
            done = await request("up", forward())
            assert done.kind == "grads" and done.meta["loss"] > 0
            assert (await request("up", framed("step", {"step": 0}, {}))).kind == "stepped"
            assert worker.step_id == 1 and any(not torch.equal(a, b) for a, b in zip(before, worker.params))
            assert not (server.protocol.replies or server.protocol.arrived or worker.saved) and server.between_steps
        finally:
            for listener in listeners.values():
                listener.close()
            server.close()

    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_auto_compression_follows_the_live_bandwidth():
    """Past warm-up, a stage in auto mode sends its activations hard-compressed once the measured
    bandwidth to the next stage drops, and raw again once it recovers."""
    traced, _ = two_stage_gpt(2)
    policy = LinkPolicy("auto", cut_bytes=traced.dag.cut_bytes()[0], budget_s=0.01, flows=1, planned_bps=1e9,
                        max_ratio=16.0, warmup_steps=1)
    first, last = local_servers(traced, 2, lm_loss, policy=lambda: policy)
    link = {"bps": 1e3}   # the newest measurement of the link, as the node's prober would report it
    first.link.bandwidth = lambda peer: link["bps"]
    gen = torch.Generator().manual_seed(0)

    async def run() -> list[tuple[float, float]]:
        """Per step: the ratio last used on the link and the wire ratio achieved (raw / wire bytes)."""
        seen = []
        for bps in (1e3, 10e9, 1e5, 1e5, 10e9):   # step 0 is the warm-up: uncompressed however slow the link
            link["bps"] = bps
            raw, wire = first.counters.act_raw, first.counters.act_wire
            data = torch.randint(0, 256, (4, 129), generator=gen)
            await train_step(first, data[:, :-1], data[:, 1:], micro_batches=2)
            seen.append((first.counters.ratios["stage1"], (first.counters.act_raw - raw) / (first.counters.act_wire - wire)))
        return seen

    try:
        (warm, warm_wire), (fast, fast_wire), (slow, slow_wire), (still, _), (again, again_wire) = asyncio.run(run())
    finally:
        first.close()
        last.close()
    assert warm == fast == again == 1.0 and warm_wire == fast_wire == again_wire == pytest.approx(1.0)
    assert slow == still == 16.0 and slow_wire > 8.0   # at 100 kbit/s: the hardest ratio, and it shows on the wire
    assert last.worker.step_id == 5
