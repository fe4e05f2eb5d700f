"""Remote autodiff over real libp2p streams: three stages in three p2p daemons train exactly like one
process; garbage, stale steps and oversized frames get error replies and the stages keep serving."""
import asyncio
import copy

import torch
import torch.nn.functional as F
from hivemind.p2p import P2P

from swarm.dag.stages import extract_stages, input_specs
from swarm.dag.trace import trace
from swarm.models import load_model
from swarm.runtime import StageWorker, make_optimizer
from swarm.runtime.rpc import PROTOCOL, StageServer, stream_caller, train_step
from swarm.wire import Limits, pack, unpack


def lm_loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


async def _scenario():
    torch.manual_seed(0)
    built = load_model("gpt2-tiny")
    reference = copy.deepcopy(built.module)
    traced = trace(built.module, built.example_inputs(2), "coarse", name=built.name)
    stages = extract_stages(traced, traced.dag.balanced_partition(3))
    workers = [StageWorker(s, "adam", 1e-3, loss_fn=lm_loss if i == 2 else None, max_batch=64,
                           input_specs=input_specs(traced.dag, s.io)) for i, s in enumerate(stages)]
    p2ps = [await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])]
    for _ in range(2):
        p2ps.append(await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=await p2ps[-1].get_visible_maddrs()))
    try:
        limits = Limits(max_frame_bytes=64 << 20)
        last = StageServer(workers[2], None, limits)
        middle = StageServer(workers[1], stream_caller(p2ps[1], p2ps[2].peer_id, limits), limits)
        first = StageServer(workers[0], stream_caller(p2ps[0], p2ps[1].peer_id, limits), limits)
        await p2ps[2].add_binary_stream_handler(PROTOCOL, last.handle)
        await p2ps[1].add_binary_stream_handler(PROTOCOL, middle.handle)

        opt = make_optimizer("adam", reference.parameters(), 1e-3)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            data = torch.randint(0, 256, (8, 129), generator=gen)
            x, y = data[:, :-1], data[:, 1:]
            loss = await train_step(first, x, y, micro_batches=4, in_flight=3)
            opt.zero_grad()
            ref = []
            for xm, ym in zip(x.chunk(4), y.chunk(4)):
                ref_loss = lm_loss(reference(xm), ym)
                (ref_loss / 4).backward()
                ref.append(ref_loss.item())
            opt.step()
            assert abs(loss - sum(ref) / 4) < 1e-5
        ours = {n: p for w in workers for n, p in w.stage.module.named_parameters()}
        for name, p in reference.named_parameters():
            assert torch.allclose(ours[name], p, atol=1e-5, rtol=1e-4), name

        # hostile or confused callers: each gets an error reply (or a closed stream); nothing changes
        call = stream_caller(p2ps[0], p2ps[1].peer_id, limits)
        bad = [b"garbage", pack("forward", {"step": 99, "mb": 0}, {"x0": torch.zeros(1, 128, 256)})[0],
               pack("forward", {"step": workers[1].step_id, "mb": 0}, {"x0": torch.zeros(3, 3)})[0],
               pack("forward", {"step": workers[1].step_id, "mb": 0}, {"x0": torch.zeros(1, 4096, 256)})[0],
               pack("launch", {"step": workers[1].step_id}, {})[0]]
        for frame in bad:
            reply = unpack(await call(frame), limits)
            assert reply.kind == "error", reply.meta
        _, reader, writer = await p2ps[0].call_binary_stream_handler(p2ps[1].peer_id, PROTOCOL)
        writer.write((1 << 40).to_bytes(8, "big"))   # announces a 1 TiB frame: closed without reading it
        await writer.drain()
        assert await reader.read() == b""
        writer.close()
        assert middle.errors >= 6 and not workers[1].saved
        before = {n: p.clone() for n, p in ours.items()}
        data = torch.randint(0, 256, (4, 129), generator=gen)
        await train_step(first, data[:, :-1], data[:, 1:], micro_batches=2)   # still serving
        assert any(not torch.equal(before[n], p) for n, p in ours.items())
    finally:
        for p in p2ps:
            await p.shutdown()


def test_three_stages_over_libp2p_train_like_one_process_and_survive_garbage():
    asyncio.run(asyncio.wait_for(_scenario(), 240))
