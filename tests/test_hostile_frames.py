"""The data plane against a hostile or broken member (issue 22, items 1, 5 and 6; docs/hostile.md):
decompression bombs on both protocols are refused from the frame's header, before anything is
allocated, and a non-neighbour's frame is not even read; NaN/Inf activations, gradients, reduce parts,
snapshots and fetched state are refused and their sender banned, so NaN never reaches an honest stage's
parameters, a poisoning replica is routed around and a non-finite update is skipped; floods of unread
fetches and half-sent stage frames against live servers over loopback libp2p stay within a stated
memory bound and leave nothing behind."""
import asyncio
import copy
import functools
import gc
import struct
import threading
import time
import tracemalloc
from types import SimpleNamespace

import msgpack
import pytest
import torch
from hivemind.p2p import P2P

from swarm.churn.follower import PlanFollower
from swarm.churn.state_service import FETCHES, FETCHES_PER_PEER, STATE_PROTOCOL
from swarm.compression import adatopk
from swarm.config import NodeConfig
from swarm.dag.stages import extract_stages, input_specs
from swarm.dag.trace import trace
from swarm.data import lm_loss
from swarm.errors import SwarmError
from swarm.models import load_model
from swarm.net.streams import Gate, stream_caller
from swarm.pipeline import PROTOCOL, Neighbours, StageServer, local_caller, stage_caller, train_step
from swarm.runtime import StageWorker
from swarm.runtime.allreduce import parts
from swarm.runtime.state import OpState, capture
from swarm.wire import Limits, pack, read_header, unpack

MiB = 1 << 20


# --- helpers --------------------------------------------------------------------------------------

def bomb_packet(numel: int = 1 << 28) -> bytes:
    """An AdaTopK packet with k = 0 claiming ``numel`` float32 zeros: 32 bytes."""
    return (adatopk._HEAD.pack(adatopk.MAGIC, 0, adatopk.VARINT, 1, 0) + struct.pack("<q", numel)
            + adatopk._TAIL.pack(0, adatopk.BLOCK, 0))


def bomb_frame(kind: str, meta: dict, names: list[str], numel: int = 1 << 28) -> bytes:
    packet = bomb_packet(numel)
    header = msgpack.packb({"v": 1, "kind": kind, "meta": meta, "tensors": [
        {"name": n, "dtype": "float32", "shape": [numel], "codec": "adatopk", "nbytes": len(packet)} for n in names]})
    return b"SWM1" + len(header).to_bytes(4, "little") + header + packet * len(names)


def rss_kib() -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1])


class PeakRss:
    """The process's peak RSS above its RSS at entry (KiB), via /proc/self/clear_refs (Linux >= 4.0)."""

    def __enter__(self):
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # resets VmHWM to the current RSS
        self.base = rss_kib()
        return self

    def __exit__(self, *exc):
        self.peak = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) - self.base


class SpyZeros:
    """Records the size of every ``torch.zeros`` the codec asks for."""

    def __init__(self, monkeypatch):
        self.sizes, real = [], torch.zeros

        def spy(*shape, **kw):
            self.sizes.append(int(torch.Size(shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape).numel()))
            return real(*shape, **kw)
        monkeypatch.setattr(adatopk.torch, "zeros", spy)


@functools.cache
def traced_gpt(batch: int = 1):
    torch.manual_seed(0)
    built = load_model("gpt2-tiny")
    return trace(built.module, built.example_inputs(batch), "coarse", name=built.name)


def gpt_stages(n: int, batch: int = 1):
    """gpt2-tiny (traced once per batch size) cut in ``n``: fresh copies of the stages every call."""
    traced = traced_gpt(batch)
    return traced, copy.deepcopy(extract_stages(traced, traced.dag.balanced_partition(n)))


def two_stage_gpt(batch: int = 1):
    return gpt_stages(2, batch)


def last_stage_server(log=None, **kw) -> tuple[StageServer, torch.Tensor, torch.Tensor]:
    """gpt2-tiny's second half served for upstream peer ``up`` (in-process), with a valid input."""
    traced, (_, stage) = two_stage_gpt()
    worker = StageWorker(stage, loss_fn=lm_loss, max_batch=1, input_specs=input_specs(traced.dag, stage.io))
    server = StageServer(worker, Neighbours("me", ("me",), ("up",), ()), None, Limits(max_frame_bytes=4 * MiB),
                         timeout_s=5.0, log=log or (lambda line: None), **kw)
    (shape, _, _), = input_specs(traced.dag, stage.io)
    return server, torch.randn(1, *shape[1:]), torch.randint(0, 256, (1, shape[1]))


def forward(hidden, targets, step=0, mb=0) -> bytes:
    return pack("forward", {"step": step, "mb": mb, "scale": 1.0}, {"x0": hidden, "targets": targets})[0]


def finite(module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


class Loop:
    """An event loop on a thread (the node's transport loop): PlanFollower blocks on it from outside."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout_s: float):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class NoP2P:
    async def add_binary_stream_handler(self, *args):
        pass

    async def remove_binary_stream_handler(self, *args):
        pass


def follower(loop: Loop, p2p=None, me: str = "me", members=("me", "up"), serve_state: str = "plan", log=None):
    """A PlanFollower of gpt2-tiny whose plan has ``members`` (no stages: no session, state from its store)."""
    traced = copy.deepcopy(traced_gpt(1))
    cfg = NodeConfig.model_validate({"training": {"serve_state": serve_state}})
    f = PlanFollower(me, traced, cfg, p2p or NoP2P(), loop.loop, lambda p: None, None, log or (lambda line: None))
    f.adoption.plan = SimpleNamespace(members=tuple(members), stages=[], spares=(), hash="test")
    return f


async def wait_until(predicate, timeout_s: float, what: str):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)


# --- item 1: nothing is allocated from a peer's claim ---------------------------------------------

def test_a_k0_packet_of_2_28_elements_is_refused_from_its_header_and_legit_packets_still_pass():
    frame = bomb_frame("forward", {"step": 0, "mb": 0}, ["x0"])
    assert len(frame) < 200   # the 163-byte frame of the report
    with PeakRss() as rss:
        with pytest.raises(SwarmError, match=r"would decode 32 bytes to 1073741824 \(more than 1024x\)"):
            read_header(frame)
        with pytest.raises(SwarmError, match="more than 1024x"):
            adatopk.decode(bomb_packet())          # the codec refuses it on its own too
    assert rss.peak < 32 << 10, rss.peak            # KiB: nowhere near the 1 GiB claimed
    eight = bomb_frame("forward", {"step": 0, "mb": 0}, [f"x{i}" for i in range(8)])
    assert len(eight) < 1000   # the 849-byte frame that got a node OOM-killed
    with pytest.raises(SwarmError, match="more than 1024x"):
        unpack(eight)
    # many small legitimate-looking tensors cannot add up past the per-frame total either
    many = bomb_frame("forward", {}, [f"x{i}" for i in range(8)], numel=1 << 13)
    with pytest.raises(SwarmError, match=r"decoded \(limit 65536 per frame\)"):
        read_header(many, Limits(max_decoded_bytes=64 << 10))
    # what a real sender produces at the hardest ratios still decodes (a gradient on its mask expands ~2x its ratio)
    x = torch.randn(4, 128, 128)
    for ratio in (16, 32, 64):
        packet = adatopk.encode(x, ratio)
        frame, masks = pack("grads", {}, {"g0": torch.randn(4, 128, 128)}, reuse={"g0": packet.indices})
        assert unpack(frame, masks=masks).tensors["g0"].shape == x.shape
    assert adatopk.max_expansion(200) == 3200 > 2 * 200 * 1.1


def test_bombs_on_the_stage_protocol_are_refused_before_decoding_and_a_strangers_frame_costs_nothing(monkeypatch):
    lines = []
    server, hidden, targets = last_stage_server(lines.append)
    (shape, _, _), = input_specs(two_stage_gpt()[0].dag, server.worker.stage.io)
    zeros = SpyZeros(monkeypatch)
    decoded = []
    real_decode = server.checker.decode
    monkeypatch.setattr(server.checker, "decode", lambda *a, **k: decoded.append(a[2]) or real_decode(*a, **k))

    async def scenario():
        return [unpack(await server.answer(f, sender)) for f, sender in (
            (bomb_frame("forward", {"step": 0, "mb": 0, "scale": 1.0}, ["x0"]), "up"),
            (bomb_frame("forward", {"step": 0, "mb": 0, "scale": 1.0}, [f"x{i}" for i in range(8)]), "up"),
            # a bomb with the boundary's own shape is still refused: it expands too much
            (bomb_frame("forward", {"step": 0, "mb": 0, "scale": 1.0}, ["x0"], numel=int(torch.Size(shape[1:]).numel())), "up"),
            (bomb_frame("forward", {"step": 0, "mb": 0}, ["x0"]), "evil"))]   # a stranger's: not even parsed

    with PeakRss() as rss:
        *bombs, stranger = asyncio.run(scenario())
    assert all(r.kind == "error" and not r.meta["retry"] for r in bombs + [stranger])
    assert all("more than 1024x" in r.meta["message"] for r in bombs), [r.meta for r in bombs]
    assert "not a previous-stage replica" in stranger.meta["message"]
    assert zeros.sizes == [] and decoded == [] and rss.peak < 32 << 10, (zeros.sizes, decoded, rss.peak)
    assert server.counters.refused == 4 and not server.worker.saved and server.worker.step_id == 0
    assert any(line.startswith("refused frame from evil:") and "not a previous-stage replica" in line for line in lines)
    assert any(line.startswith("refused frame from up: wire: tensor 'x0' would decode 32 bytes to 1073741824")
               for line in lines), lines   # the bad frame, named in one line


def test_bombs_on_the_state_protocol_are_refused_and_its_limits_fit_what_it_serves():
    loop = Loop()
    try:
        lines = []
        f = follower(loop, log=lines.append)
        f._backed_up = lambda peer: {"op": 0}   # as if this node backed up peer's op
        bomb = bomb_frame("snapshot", {"op": "op", "step": 1}, [f"p:{i}" for i in range(8)], numel=1 << 20)
        reply = unpack(loop.run(f.service._answer(bomb, "up"), 10))
        assert reply.kind == "error" and "codec 'adatopk'" in reply.meta["message"]   # raw only: nothing expands
        with_tensor = pack("fetch", {"op": "op"}, {"x": torch.zeros(4)})[0]
        assert "carries no tensors" in unpack(loop.run(f.service._answer(with_tensor, "up"), 10)).meta["message"]
        assert any(line.startswith("refused state request from up: wire: tensor 'p:0' uses codec 'adatopk'") for line in lines)
        # every op's real state (parameters, gradients, Adam's moments and step) fits the limits, one tensor more does not
        worker = StageWorker(extract_stages(f.traced, f.traced.dag.balanced_partition(1))[0], loss_fn=lm_loss)
        x = torch.randint(0, 256, (2, 129))
        worker.forward(0, [x[:, :-1]], x[:, 1:])
        worker.backward(0)
        worker.optimizer.step()   # Adam's moments and step, and the gradients still there
        states = capture(worker.stage.module, worker.optimizer, f.service.owned, list(f.service.owned), 1, grads=True)
        biggest = max(states.values(), key=lambda s: sum(t.numel() for t in s.tensors.values()))
        frame = pack("state", {"op": "x", "step": 1}, biggest.tensors)[0]
        assert len(unpack(frame, f.service.limits).tensors) == len(biggest.tensors)
        assert len(frame) < f.service.limits.max_frame_bytes < 8 * len(frame)   # sized to the largest op, not the model
        widest = max(states.values(), key=lambda s: len(s.tensors))
        extra = {**widest.tensors, **{f"p:extra{i}": torch.zeros(1) for i in range(f.service.limits.max_tensors)}}
        with pytest.raises(SwarmError, match="tensors \\(limit"):
            unpack(pack("state", {}, extra)[0], f.service.limits)
    finally:
        loop.close()


# --- item 5: finite tensors only -------------------------------------------------------------------

def three_local_stages():
    return gpt_stages(3, 2)


def test_a_neighbour_sending_nan_activations_and_gradients_is_refused_banned_and_logged():
    """Stage 1 is hostile: NaN activations downstream, NaN gradients upstream with a loss of 2.5."""
    traced, stages = three_local_stages()
    ids, servers, logs = ["s0", "s1", "s2"], {}, {i: [] for i in ("s0", "s1", "s2")}
    for i, stage in enumerate(stages):
        worker = StageWorker(stage, loss_fn=lm_loss if i == 2 else None, max_batch=4,
                             input_specs=input_specs(traced.dag, stage.io))
        hood = Neighbours(ids[i], (ids[i],), tuple(ids[i - 1:i]), tuple(ids[i + 1:i + 2]))
        servers[ids[i]] = StageServer(worker, hood, local_caller(ids[i], servers), timeout_s=5.0, log=logs[ids[i]].append)
    (shape, _, _), = input_specs(traced.dag, stages[2].io)
    downstream = {}

    async def hostile(frame: bytes, sender: str) -> bytes:
        msg = unpack(frame)
        b = msg.tensors["x0"].shape[0]
        poison = torch.full((b, *shape[1:]), float("nan"))
        downstream["reply"] = unpack(await servers["s2"].answer(
            pack("forward", {**msg.meta}, {"x0": poison, "targets": msg.tensors["targets"]})[0], "s1"))
        grads = torch.full_like(msg.tensors["x0"], float("nan"))
        return pack("grads", {"step": msg.meta["step"], "mb": msg.meta["mb"], "loss": 2.5}, {"g0": grads})[0]

    servers["s1"].answer = hostile
    before = {k: [p.clone() for p in servers[k].worker.params] for k in ("s0", "s2")}
    data = torch.randint(0, 256, (4, 129))

    async def scenario():
        with pytest.raises(SwarmError, match="no replica of stage 1 reachable"):
            await train_step(servers["s0"], data[:, :-1], data[:, 1:], micro_batches=2, deadline_s=2.0)
        await wait_until(lambda: servers["s0"].slots == 64, 20, "the step's other micro-batch to give up too")
    asyncio.run(asyncio.wait_for(scenario(), 60))
    refused = downstream["reply"]
    assert refused.kind == "error" and "forward: tensor 'x0' has NaN" in refused.meta["message"]
    assert servers["s2"].bans.banned("s1") and servers["s0"].bans.banned("s1")
    assert servers["s2"].counters.poisoned == 1 and servers["s0"].counters.poisoned == 1   # then s1 is not asked again
    assert [line for line in logs["s2"] if "refused" in line] == [
        "refused forward from s1: forward: tensor 'x0' has NaN; peer s1 banned for 300 s"]
    assert [line for line in logs["s0"] if "refused" in line] == [
        "refused grads reply from s1: grads: tensor 'g0' has NaN; peer s1 banned for 300 s"]
    for k in ("s0", "s2"):   # nothing of it reached the honest stages
        w = servers[k].worker
        assert not w.saved and w.backwards == 0 and all(p.grad is None for p in w.params)
        assert all(torch.equal(a, b) for a, b in zip(before[k], w.params)) and finite(w.stage.module)
    # while banned, even a well-formed request of s1 is refused at once
    again = unpack(asyncio.run(servers["s2"].answer(forward(torch.randn(1, *shape[1:]), data[:1, 1:]), "s1")))
    assert again.kind == "error" and "banned" in again.meta["message"]


def test_a_next_stage_replica_returning_nan_gradients_is_routed_around_and_training_advances():
    traced, (first, second) = two_stage_gpt(2)
    specs = input_specs(traced.dag, second.io)
    replicas, servers, logs = ("h", "l"), {}, []
    servers["a"] = StageServer(StageWorker(first, max_batch=4), Neighbours("a", ("a",), (), replicas, micro_batches=4),
                               local_caller("a", servers), timeout_s=10.0, log=logs.append)
    for name, stage in (("h", second), ("l", copy.deepcopy(second))):
        servers[name] = StageServer(StageWorker(stage, loss_fn=lm_loss, max_batch=4, input_specs=specs),
                                    Neighbours(name, replicas, ("a",), ()), local_caller(name, servers), timeout_s=10.0)
    honest_answer = servers["h"].answer

    async def nan_gradients(frame: bytes, sender: str) -> bytes:   # h computes honestly but lies in its replies
        reply = unpack(await honest_answer(frame, sender))
        if reply.kind != "grads":
            return pack(reply.kind, reply.meta, reply.tensors)[0]
        g = {k: torch.full_like(t, float("nan")) for k, t in reply.tensors.items()}
        return pack("grads", {**reply.meta, "loss": 2.5}, g)[0]

    servers["h"].answer = nan_gradients
    gen = torch.Generator().manual_seed(3)

    async def run():
        losses = []
        for _ in range(3):
            data = torch.randint(0, 256, (8, 129), generator=gen)
            losses.append(await train_step(servers["a"], data[:, :-1], data[:, 1:], micro_batches=4))
        return losses

    before = [p.clone() for p in servers["a"].worker.params]
    losses = asyncio.run(asyncio.wait_for(run(), 120))
    assert all(2.0 < loss < 7.0 for loss in losses), losses   # real losses, not the 2.5 claimed
    assert servers["a"].bans.banned("h") and servers["a"].counters.poisoned >= 1   # then routed around
    assert all(s.worker.step_id == 3 for s in servers.values())
    assert all(finite(s.worker.stage.module) for s in servers.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, servers["a"].worker.params))
    assert servers["l"].counters.micro_batches == 12   # every micro-batch of every step went through l
    assert sum("refused grads reply from h" in line for line in logs) == 1


def test_nan_reduce_parts_snapshots_and_fetched_state_are_refused_and_their_senders_banned():
    traced, (_, second) = two_stage_gpt()
    worker = StageWorker(second, loss_fn=lm_loss)
    lines = []
    server = StageServer(worker, Neighbours("l", ("h", "l"), ("a",), ()), None, timeout_s=2.0, log=lines.append)
    part = server.peers.replicas.index("l")
    lo, hi = parts(server.protocol.flat_numel, 2)[part]
    g = torch.zeros(hi - lo)
    g[7] = float("inf")
    reply = unpack(asyncio.run(server.answer(pack("reduce", {"step": 0, "part": part}, {"g": g})[0], "h")))
    assert reply.kind == "error" and "reduce: tensor 'g' has Inf" in reply.meta["message"] and server.bans.banned("h")
    assert 0 not in server.protocol.rounds   # nothing of it was added to the sum
    assert lines == ["refused reduce from h: reduce: tensor 'g' has Inf; peer h banned for 300 s"]

    loop = Loop()
    try:
        log = []
        f = follower(loop, log=log.append, members=("me", "up", "bad", "good"))
        op = next(op for op, names in f.service.owned.items() if names and names[0][0] == "p")
        name = f.service.owned[op][0][1]
        p = dict(f.traced.gm.named_parameters())[name].detach().clone()
        f._backed_up = lambda peer: {op: 0}
        poisoned = p.clone()
        poisoned.view(-1)[0] = float("nan")
        reply = unpack(loop.run(f.service._answer(pack("snapshot", {"op": op, "step": 3}, {f"p:{name}": poisoned})[0], "up"), 10))
        assert reply.kind == "error" and "has NaN" in reply.meta["message"] and f.service.bans.banned("up") and not f.service.received
        banned = f.service._refuse("up")
        assert banned is not None and "banned" in str(banned)
        good = unpack(loop.run(f.service._answer(pack("snapshot", {"op": op, "step": 3}, {f"p:{name}": p})[0], "good"), 10))
        assert good.kind == "kept" and len(f.service.received) == 1

        async def call(peer: str, frame: bytes) -> bytes:   # two donors: one answers NaN
            return pack("state", {"op": op, "step": 5}, {f"p:{name}": poisoned if peer == "bad" else p})[0]
        f.service.call = call
        got = loop.run(f.service.fetch({op: ["bad", "good"]}), 30)
        assert got[op][1] == "good" and torch.equal(got[op][0].tensors[f"p:{name}"], p) and f.service.bans.banned("bad")
        assert any("refused state reply from bad: state: tensor" in line and "has NaN" in line for line in log)
    finally:
        loop.close()


def test_a_stage_whose_own_update_is_not_finite_skips_the_step_and_says_so():
    lines = []
    server, hidden, targets = last_stage_server(lines.append)
    worker = server.worker

    async def scenario():
        assert unpack(await server.answer(forward(hidden, targets), "up")).kind == "grads"
        worker.params[0].grad[0] = float("inf")   # an overflow in this stage's own backward
        before = [p.clone() for p in worker.params]
        assert unpack(await server.answer(pack("step", {"step": 0}, {})[0], "up")).kind == "stepped"
        assert worker.step_id == 1 and all(torch.equal(a, b) for a, b in zip(before, worker.params))
        assert all(p.grad is None for p in worker.params) and server.counters.skipped_steps == 1
        assert unpack(await server.answer(forward(hidden, targets, step=1), "up")).kind == "grads"   # the next step trains
        assert unpack(await server.answer(pack("step", {"step": 1}, {})[0], "up")).kind == "stepped"
        assert worker.step_id == 2 and any(not torch.equal(a, b) for a, b in zip(before, worker.params))
    try:
        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        server.close()
    assert finite(worker.stage.module) and worker.skipped_steps == 1
    assert [line for line in lines if "skipped" in line] == [
        "warning: stage 1 skipped step 0: non-finite gradient of 1 parameters "
        f"({next(iter(dict(worker.stage.module.named_parameters())))})"]


def test_a_stage_never_sends_non_finite_activations_of_its_own():
    traced, (first, second) = two_stage_gpt()
    servers, lines = {}, []
    servers["a"] = StageServer(StageWorker(first), Neighbours("a", ("a",), (), ("b",)), local_caller("a", servers),
                               log=lines.append)
    servers["b"] = StageServer(StageWorker(second, loss_fn=lm_loss), Neighbours("b", ("b",), ("a",), ()), local_caller("b", servers))
    with torch.no_grad():
        servers["a"].worker.params[0].fill_(float("inf"))   # this stage itself is broken
    x = torch.randint(0, 256, (1, 129))
    reply = unpack(asyncio.run(servers["a"].answer(forward(x[:, :-1], x[:, 1:]), "a")))
    assert reply.kind == "error" and "computed non-finite activations" in reply.meta["message"]
    assert servers["b"].counters.micro_batches == 0 and not servers["b"].bans.active()   # b never saw it, bans nobody
    assert not servers["a"].worker.saved and any("not sent" in line for line in lines)


# --- item 6: bounded serving ----------------------------------------------------------------------

def test_the_gate_bounds_requests_per_peer_overall_and_the_bytes_being_read():
    gate = Gate(per_peer=2, total=3, read_bytes=100)
    assert gate.enter("a", 10) is None and gate.enter("a", 10) is None
    assert "2 requests of this peer" in str(gate.enter("a", 10))
    assert gate.enter("b", 70) is None
    assert "3 requests in progress" in str(gate.enter("c", 1))
    gate.read(10)
    gate.leave("a")
    assert "bytes being read (budget 100)" in str(gate.enter("c", 40))   # 80 being read, 40 more would pass 100
    assert gate.enter("c", 20) is None
    for n, peer in ((10, "a"), (70, "b"), (20, "c")):
        gate.read(n)
        gate.leave(peer)
    assert gate.active == {} and gate.reading == 0 and gate.enter("d", 500) is None   # alone, one frame always passes


def test_state_is_served_to_members_of_the_plan_only_unless_configured_otherwise():
    loop = Loop()
    try:
        plan_only, anyone = follower(loop), follower(loop, serve_state="anyone")
        refused = plan_only.service._refuse("stranger")
        assert refused is not None and "not a member of the plan" in str(refused)
        assert plan_only.service._refuse("up") is None and anyone.service._refuse("stranger") is None
        plan_only.adoption.plan, plan_only.adoption.pending = None, SimpleNamespace(members=("me", "joiner"), stages=[], spares=())
        assert plan_only.service._refuse("joiner") is None   # a joining node fetches for the plan it is a member of
    finally:
        loop.close()


def test_a_flood_of_unread_fetches_stays_bounded_and_the_node_serves_again(monkeypatch):
    """300 concurrent fetches (58-byte requests) of a 9.5 MB op state whose replies are never read,
    against a live state service over loopback libp2p: at most FETCHES_PER_PEER captures of one peer at a
    time (FETCHES in all), each dropped at its send deadline. Bound: Python's traced memory peaks below
    64 MiB (two replies in flight, each with its transport buffer; unbounded, it held 300 x 9.5 MB), the process's RSS grows by less than
    150 MiB; afterwards every table is empty and an honest fetch is served."""
    handled, serve = {"in": 0, "out": 0}, PlanFollower._serve

    async def counted_serve(self, *args):
        handled["in"] += 1
        try:
            await serve(self, *args)
        finally:
            handled["out"] += 1
    monkeypatch.setattr(PlanFollower, "_serve", counted_serve)
    loop = Loop()
    try:
        server_p2p = loop.run(P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"]), 60)
        client_p2p = loop.run(P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                         initial_peers=loop.run(server_p2p.get_visible_maddrs(), 30)), 60)
        me, them = server_p2p.peer_id.to_base58(), client_p2p.peer_id.to_base58()
        lines = []
        f = follower(loop, server_p2p, me=me, members=(me, them), log=lines.append)
        f.service.serve_timeout_s = 3.0
        f.store["big"] = OpState(4, {"p:w": torch.randn(2_375_000)})   # 9.5 MB
        small = next(op for op, names in f.service.owned.items() if names)
        f.store[small] = OpState(4, {"p:x": torch.randn(1000)})
        places, enter = [], f.service.fetches.enter

        def counted(peer, n):
            refused = enter(peer, n)
            places.append(sum(f.service.fetches.active.values()))
            return refused
        f.service.fetches.enter = counted
        request = pack("fetch", {"op": "big"}, {})[0]
        assert len(request) < 64
        framed = len(request).to_bytes(8, "big") + request

        async def flood():
            streams = []

            async def one():
                _, reader, writer = await client_p2p.call_binary_stream_handler(server_p2p.peer_id, STATE_PROTOCOL)
                streams.append((reader, writer))   # the reply is never read
                writer.write(framed)
                try:
                    await writer.drain()
                except ConnectionError:   # refused and closed already
                    pass

            await asyncio.gather(*(one() for _ in range(300)))
            # the daemon hands the handler what it accepts of the 300 streams (here about half; it resets the others)
            await wait_until(lambda: handled["in"] >= 100 and handled["in"] == handled["out"], 60,
                             "every stream handed to the state service to be refused, or dropped at its deadline")
            for _, writer in streams:
                writer.close()

        tracemalloc.start()
        try:
            with PeakRss() as rss:
                loop.run(flood(), 150)
            traced_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        print(f"fetch flood: {handled['in']} streams handled, {f.service.served} served, traced peak {traced_peak / MiB:.1f} MiB, "
              f"RSS +{rss.peak / 1024:.1f} MiB")
        assert traced_peak < 64 * MiB, traced_peak
        assert rss.peak < 150 << 10, rss.peak
        assert max(places) <= FETCHES_PER_PEER <= FETCHES and f.service.served >= 1
        assert f.service.refusals.total("busy") + f.service.served >= handled["in"] - 8   # all but what the request gate let in
        assert f.service.gate.active == {} and f.service.gate.reading == 0 and f.service.fetches.active == {}
        assert any(line.startswith(f"refused busy from {them[-8:]}: busy:") for line in lines), lines[:5]
        assert len(lines) < 10   # rate-limited: one line per (peer, kind) and minute

        call = stream_caller(client_p2p, f.service.limits.max_frame_bytes, 30.0, STATE_PROTOCOL)
        reply = unpack(loop.run(call(me, pack("fetch", {"op": small}, {})[0]), 60), f.service.limits)
        assert reply.kind == "state" and reply.meta["step"] == 4 and torch.equal(reply.tensors["p:x"], f.store[small].tensors["p:x"])
        loop.run(client_p2p.shutdown(), 30)
        loop.run(server_p2p.shutdown(), 30)
    finally:
        loop.close()


def test_200_half_sent_stage_frames_stay_within_the_read_budget_and_the_stage_serves_again():
    """200 streams from a neighbour each send all but the last byte of a 4 MiB frame to a live stage server
    over loopback libp2p. Bound: at most the read budget (max(4 frames, 32 MiB)) is being read at once, so
    Python's traced memory peaks below 96 MiB (unbounded: 200 x 4 MiB; the
    server's 32 MiB and the 200 senders' write buffers) and RSS grows by less than
    150 MiB; each admitted stream is dropped at the read deadline; then every table is empty and the
    stage answers a real micro-batch."""
    async def scenario():
        server_p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        client_p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=await server_p2p.get_visible_maddrs())
        try:
            up = client_p2p.peer_id.to_base58()
            traced, (_, stage) = two_stage_gpt()
            specs = input_specs(traced.dag, stage.io)
            worker = StageWorker(stage, loss_fn=lm_loss, max_batch=1, input_specs=specs)
            lines = []
            limits = Limits(max_frame_bytes=4 * MiB)
            server = StageServer(worker, Neighbours("me", ("me",), (up,), ()), None, limits, timeout_s=3.0, log=lines.append)
            await server_p2p.add_binary_stream_handler(PROTOCOL, server.handle)
            n = 4 * MiB
            chunk = bytes(64 << 10)
            peak = {"reading": 0}

            async def half_sent():
                try:
                    _, reader, writer = await client_p2p.call_binary_stream_handler(server_p2p.peer_id, PROTOCOL)
                    writer.write(n.to_bytes(8, "big"))
                    for _ in range(n // len(chunk) - 1):
                        writer.write(chunk)
                        await asyncio.wait_for(writer.drain(), 5)
                        peak["reading"] = max(peak["reading"], server.gate.reading)
                    writer.write(chunk[:-1])   # all but the last byte
                    await asyncio.wait_for(writer.drain(), 5)
                    await asyncio.wait_for(reader.read(), 10)   # the server's refusal or its drop at the deadline
                except (asyncio.TimeoutError, ConnectionError, OSError, asyncio.IncompleteReadError):
                    pass
                return writer

            tracemalloc.start()
            try:
                with PeakRss() as rss:
                    writers = await asyncio.gather(*(half_sent() for _ in range(200)))
                    await wait_until(lambda: server.gate.in_progress == 0, 30, "every half-sent frame to be dropped")
                traced_peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            for w in writers:
                w.close()
            print(f"half-sent frames: peak {peak['reading'] / MiB:.1f} MiB being read, traced peak {traced_peak / MiB:.1f} MiB, "
                  f"RSS +{rss.peak / 1024:.1f} MiB")
            assert traced_peak < 96 * MiB, traced_peak   # the server's 32 MiB read budget, plus the senders' buffers (this process)
            assert rss.peak < 150 << 10, rss.peak
            assert 0 < peak["reading"] <= server.gate.read_bytes == 32 * MiB
            assert server.gate.active == {} and server.gate.reading == 0 and server.slots == 64
            assert any(line.startswith(f"refused busy from {up[-8:]}: busy:") for line in lines), lines[:5]
            assert any(line.startswith(f"refused stream from {up[-8:]}: no frame or hang-up in time") for line in lines)
            (shape, _, _), = specs
            hidden, targets = torch.randn(1, *shape[1:]), torch.randint(0, 256, (1, shape[1]))
            call = stage_caller(client_p2p, limits, 30.0)
            reply = unpack(await call(server_p2p.peer_id.to_base58(), forward(hidden, targets)), limits)
            assert reply.kind == "grads" and reply.meta["loss"] > 0
            assert not (server.protocol.arrived or server.protocol.rounds or worker.saved) and server.gate.in_progress == 0
            server.close()
        finally:
            await client_p2p.shutdown()
            await server_p2p.shutdown()

    asyncio.run(asyncio.wait_for(scenario(), 240))


def test_a_member_that_never_commits_holds_the_adoption_of_a_plan_up_for_two_ttls_only():
    from swarm.net.membership import MemberRecord, MembershipView

    def record(peer: str, committed: str) -> MemberRecord:
        now = time.time()
        return MemberRecord(peer, [], "cpu", "test", 1.0, 8 << 30, {"swarm": "0"}, now, now, committed_hash=committed)

    loop, logged = Loop(), []
    try:
        f = follower(loop, log=logged.append)
        plan = SimpleNamespace(members=("me", "x"), stages=[], spares=(), hash="new", feasible=True,
                               role=lambda peer: {"stage": None, "spare": True})
        view = MembershipView({"me": record("me", "new"), "x": record("x", "old")}, time.time())
        advert = f.follow(plan, view)
        assert advert.ready is None and f.adoption.pending is plan   # x may still be handing its state over
        f.adoption.pending_since -= 2 * f.cfg.network.ttl_s          # ... but not for longer than two TTLs
        advert = f.follow(plan, view)
        assert advert.ready == "new" and f.adoption.pending is None
        assert [line for line in logged if "adopting plan new without x" in line]
    finally:
        loop.close()


def test_the_step_never_goes_back_when_the_only_holder_dies_before_any_snapshot():
    """A spare that had no state takes over from a holder that died at step 2 before its first snapshot:
    the ops start afresh (at most K steps lost, by design), but the step counter goes on from 2."""
    from swarm.net.membership import MemberRecord, MembershipView

    def record(peer: str, committed: str, step: int) -> MemberRecord:
        now = time.time()
        return MemberRecord(peer, [], "cpu", "test", 1.0, 8 << 30, {"swarm": "0"}, now, now, committed_hash=committed, step=step)

    loop = Loop()
    try:
        f = follower(loop, members=("me", "holder"))
        old = f.adoption.plan
        old.role = lambda peer: {"stage": None, "spare": True}
        f.follow(old, MembershipView({"me": record("me", "test", 0), "holder": record("holder", "test", 2)}, time.time()))
        new = SimpleNamespace(members=("me",), stages=[SimpleNamespace(ops=())], spares=(), hash="after", feasible=True,
                              role=lambda peer: {"stage": 0})
        alone = MembershipView({"me": record("me", "after", 0)}, time.time())   # the holder is gone
        started = []
        f._start = lambda plan, stage, states: started.append(f.adoption.start_step)
        f.follow(new, alone)
        assert started == [2]
    finally:
        loop.close()
