"""An attacker's toolkit for the hostile-swarm tests (issue 22): what one extra peer can do to a public
swarm of ``node.py run`` processes, built the way an attacker would build it.

- ``Attacker``: a hivemind DHT peer with its own RSA identity and the swarm's record validators
  (``swarm.net.membership.make_validators``, same prefix), joined to the swarm. It stores *raw* values under
  its own signed subkey: member records with any field values, any expiration and any ``updated_at``,
  ballots, its own vote; it can keep refreshing them (``keep``), vote like a member (``vote=True``) or
  vanish and leave a record behind (``close``). The honest nodes schema-check a record when they store
  it and again when they read it, so what an attack proves is what they actually received: ``store``
  returns whether any honest node accepted the value.
- It answers ``swarm.probe.v1`` (liveness pings, link probes) like a member, unless told not to.
- Raw libp2p streams from the same identity (``dht.replicate_p2p()``, ``call_binary_stream_handler``)
  on ``swarm.stage.v1`` / ``swarm.state.v1``: one request and its reply (``request``), streams opened
  and left hanging (``hold``: a fetch whose reply is never read, a frame sent but for its last byte).
- Frames made by hand (``frame``, ``bomb_frame``: an AdaTopK packet announcing k = 0 kept values of a
  2^28-element tensor, laid out with ``struct`` after adatopk.py's docstring, not with the encoder).
- ``RssWatch``: resident memory of a node's whole process tree (node, DHT child, p2pd), sampled.
- ``EnvProc``: a node process with extra environment (the NaN-poisoning member runs the same model
  factory as everyone, ``tests.user_models:poisonable_gpt``, with ``SWARM_TEST_POISON`` set).
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import struct
import threading
from pathlib import Path

import msgpack
from hivemind.dht import DHT
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from swarm.net.auth import Identity, load_identity
from swarm.net.membership import make_validators
from swarm.procs import poll_until
from tests.swarmproc import Proc

PREFIX = "swarm"
STAGE, STATE = "swarm.stage.v1", "swarm.state.v1"
LEN = struct.Struct(">Q")
BOMB_NUMEL = 1 << 28        # the wire's per-tensor element limit: a 1 GiB float32 tensor when decoded


# --- identities -------------------------------------------------------------------------------------

def identity(directory: Path, name: str, others: list[str] = (), first: bool = False, tries: int = 64) -> Identity:
    """A fresh identity file; with ``others``, the one of ``tries`` fresh identities whose peer id sorts
    last (or first, ``first``), which is after (before) all of ``others`` when one of them does: with no
    plan yet the smallest live id proposes, so the order decides an attack's reach there. RSA peer ids
    are not uniform (``Qm`` then a third character in a narrow range), so an order is not always found."""
    best = None
    for i in range(tries if others else 1):
        path = Path(directory) / f"{name}-{i}.id"
        ident = load_identity(str(path))
        if best is None or (ident.peer_id < best.peer_id if first else ident.peer_id > best.peer_id):
            if best is not None:
                Path(best.path).unlink()
            best = ident
        else:
            path.unlink()
        if not others or (best.peer_id < min(others) if first else best.peer_id > max(others)):
            break
    return best


# --- frames -----------------------------------------------------------------------------------------

def frame(kind: str, meta: dict, entries: list[dict] = (), payload: bytes = b"") -> bytes:
    """A swarm.wire frame: b"SWM1" | u32 header length | msgpack header | payload (anything goes)."""
    header = msgpack.packb({"v": 1, "kind": kind, "meta": meta, "tensors": list(entries)}, use_bin_type=True)
    return b"SWM1" + struct.pack("<I", len(header)) + header + payload


def bomb_packet(numel: int = BOMB_NUMEL) -> bytes:
    """An AdaTopK packet (adatopk.py's layout): magic b"ATK1", dtype 0 (float32), index kind 0 (varint
    gaps), ndim 1, pad; shape i64[1]; k i64 = 0, block u32 = 64, index bytes u32 = 0; then no indices,
    ceil(0 / 64) = 0 scales and 0 values. 32 bytes that decode to ``numel`` zeros."""
    return struct.pack("<4sBBBB", b"ATK1", 0, 0, 1, 0) + struct.pack("<q", numel) + struct.pack("<qII", 0, 64, 0)


def bomb_frame(kind: str = "forward", packets: int = 1, numel: int = BOMB_NUMEL) -> bytes:
    """A frame of ``packets`` bomb tensors x0.. (a ``forward`` of step 0, micro-batch 0: plausible meta)."""
    packet = bomb_packet(numel)
    entries = [{"name": f"x{i}", "dtype": "float32", "shape": [numel], "codec": "adatopk", "nbytes": len(packet)}
               for i in range(packets)]
    return frame(kind, {"step": 0, "mb": 0, "scale": 1.0}, entries, packet * packets)


def fetch_frame(op: str) -> bytes:
    return frame("fetch", {"op": op})


def prefixed(data: bytes) -> bytes:
    """What goes on a stream: the ``>Q`` length prefix and the frame."""
    return LEN.pack(len(data)) + data


def reply_text(reply: bytes | None) -> str:
    """A reply frame as 'kind: message' (the wire's own parser; '' for no reply)."""
    if not reply:
        return ""
    from swarm.wire import unpack
    try:
        msg = unpack(reply)
    except Exception as e:   # a reply we cannot read is an answer too
        return f"unreadable reply ({e})"
    return f"{msg.kind}: {msg.meta.get('message', msg.meta)}"


# --- the attacker peer ------------------------------------------------------------------------------

class Attacker:
    """One hostile peer: a client-mode hivemind DHT with its own identity and the swarm's validators
    (``schema=False`` drops its own schema check, to store what the swarm's schema would refuse to
    write), and a libp2p endpoint of the same identity for raw streams."""

    def __init__(self, initial_peers: list[str], ident: Identity, prefix: str = PREFIX, ttl_s: float = 4.0,
                 schema: bool = True, answer_probes: bool = True):
        validators = make_validators(prefix, ident.key)
        self.signer = validators[0]
        self.peer_id, self.ttl_s = ident.peer_id, ttl_s
        self.members_key, self.ballots_key = f"{prefix}_members", f"{prefix}_ballots"
        self.dht = DHT(initial_peers=initial_peers, start=True, client_mode=True, identity_path=ident.path,
                       host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=validators if schema else validators[:1],
                       startup_timeout=30)
        assert self.dht.peer_id.to_base58() == self.peer_id
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="attacker").start()
        self.p2p = self.run(self.dht.replicate_p2p())
        self.maddrs = [str(m) for m in self.dht.get_visible_maddrs()]
        if answer_probes:   # a live member answers liveness pings and link probes, as an honest node does
            from swarm.net.probe import LinkProber
            self.run(LinkProber(self.p2p).serve())
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.held: list = []
        self.record: dict | None = None
        self.stores = {"ok": 0, "refused": 0}

    @property
    def tail(self) -> str:
        return self.peer_id[-8:]

    def run(self, coro, timeout_s: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    # DHT values ----------------------------------------------------------------------------------

    def store(self, key: str, value, expiration_time: float, timeout_s: float = 10.0) -> bool:
        """Store ``value`` under this peer's signed subkey; True if an honest node accepted it."""
        future = self.dht.store(key, value, expiration_time=expiration_time, subkey=self.signer.local_public_key,
                                return_future=True)
        try:
            ok = bool(future.result(timeout=timeout_s))
        except Exception:
            ok = False
        self.stores["ok" if ok else "refused"] += 1
        return ok

    def raw(self, key: str) -> dict:
        """Every entry stored under ``key`` (subkey -> value), unvalidated: what a reader receives."""
        found = self.dht.get(key, latest=True, return_future=True).result(timeout=10)
        entries = found.value if found is not None and isinstance(found.value, dict) else {}
        return {k: getattr(v, "value", None) for k, v in entries.items()}

    def records(self) -> dict[str, dict]:
        """Member records by the peer id they claim."""
        return {v["peer_id"]: v for v in self.raw(self.members_key).values() if isinstance(v, dict) and "peer_id" in v}

    def ballots(self) -> dict[str, dict]:
        return {v["proposer"]: v for v in self.raw(self.ballots_key).values() if isinstance(v, dict) and "proposer" in v}

    def clone_record(self, like: dict, **fields) -> dict:
        """A member record copied from an honest one (its device, memory, measurements, versions) with
        this peer's id, a fresh start, no links, no election state, no stage; ``fields`` override."""
        now = get_dht_time()
        record = dict(like, peer_id=self.peer_id, maddrs=list(self.maddrs), started_at=now, updated_at=now, state="online",
                      bandwidth_bps={}, rtt_s={}, stage=None, vote_epoch=None, vote_hash=None, committed_epoch=None,
                      committed_hash=None, role=None, step=0, holds=None, ready=None, credential=None)
        record.update(fields)
        return record

    def publish(self, record: dict, expiration_time: float | None = None) -> bool:
        """Store a member record as is (``updated_at`` and all); expiring after the TTL unless told."""
        self.record = record
        return self.store(self.members_key, record, expiration_time or get_dht_time() + self.ttl_s)

    def keep(self, record: dict, every_s: float = 0.5, fresh: bool = True, vote: bool = False) -> None:
        """Refresh ``record`` like a live member would (``fresh``: a new ``updated_at`` each time);
        ``vote``: also vote for the best ballot naming this peer (highest epoch, then smallest proposer)
        and commit it once everyone it names voted, as an honest member does, so that a plan placing it
        can commit and be adopted."""
        self.record = record

        def loop() -> None:
            while not self.stop.is_set():
                if vote:
                    try:
                        named = [b for b in self.ballots().values() if self.peer_id in b.get("members", ())
                                 and isinstance(b.get("epoch"), int)]
                    except Exception:
                        named = []
                    if named:
                        best = min(named, key=lambda b: (-b["epoch"], b["proposer"]))
                        if self.record.get("vote_epoch") is None or best["epoch"] > self.record["vote_epoch"]:
                            self.record = dict(self.record, vote_epoch=best["epoch"], vote_hash=best["plan_hash"])
                        self._commit(named)
                if fresh:
                    self.record = dict(self.record, updated_at=get_dht_time())
                self.publish(self.record)
                self.stop.wait(every_s)   # the heartbeat's period (a timer, not a synchronisation)
        thread = threading.Thread(target=loop, daemon=True, name="attacker-heartbeat")
        thread.start()
        self.threads.append(thread)

    def _commit(self, ballots: list[dict]) -> None:
        """Commit the ballot voted for once every member it names votes for it, as a member does (the
        followers wait for every member of a plan to say it committed before they take their stage)."""
        key = (self.record.get("vote_epoch"), self.record.get("vote_hash"))
        ballot = next((b for b in ballots if (b["epoch"], b["plan_hash"]) == key), None)
        if ballot is None or (self.record.get("committed_epoch") or -1) >= key[0]:
            return
        records = self.records()
        if all(m == self.peer_id or (records.get(m, {}).get("vote_epoch"), records.get(m, {}).get("vote_hash")) == key
               for m in ballot["members"]):
            try:
                stages = json.loads(ballot["plan"])["stages"]
            except (ValueError, KeyError, TypeError):
                return
            stage = next((s["index"] for s in stages if self.peer_id in s.get("peers", ())), None)
            self.record = dict(self.record, committed_epoch=key[0], committed_hash=key[1], stage=stage,
                               role=f"stage {stage}" if stage is not None else "spare")

    def go_offline(self) -> None:
        """Stop refreshing and publish ``state = offline`` (readers drop it at once, as for a leaver)."""
        self.stop.set()
        for t in self.threads:
            t.join(5)
        if self.record is not None:
            self.publish(dict(self.record, state="offline", updated_at=get_dht_time()), get_dht_time() + 2 * self.ttl_s)

    def publish_ballot(self, ballot: dict, expiration_time: float | None = None) -> bool:
        return self.store(self.ballots_key, ballot, expiration_time or get_dht_time() + 10 * self.ttl_s)

    # raw streams ---------------------------------------------------------------------------------

    async def _open(self, peer: str, protocol: str):
        _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(peer), protocol)
        return reader, writer

    async def _request(self, peer: str, protocol: str, data: bytes, timeout_s: float) -> bytes | None:
        try:
            reader, writer = await asyncio.wait_for(self._open(peer, protocol), timeout_s)
        except Exception:   # no such handler right now (a stage between plans), dial failed: no reply
            return None
        try:
            writer.write(data)
            await writer.drain()
            (n,) = LEN.unpack(await asyncio.wait_for(reader.readexactly(LEN.size), timeout_s))
            return await asyncio.wait_for(reader.readexactly(n), timeout_s)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            return None   # the node hung up: that is an answer too
        finally:
            writer.close()

    def request(self, peer: str, protocol: str, data: bytes, timeout_s: float = 30.0) -> bytes | None:
        """Send raw stream bytes (prefix included) and read one reply frame (None if the node hung up)."""
        return self.run(self._request(peer, protocol, data, timeout_s), timeout_s + 30)

    async def _hold(self, peer: str, protocol: str, data: bytes, n: int, drain_s: float) -> int:
        async def one():
            reader, writer = await asyncio.wait_for(self._open(peer, protocol), drain_s)
            self.held.append((reader, writer))
            writer.write(data)
            await asyncio.wait_for(writer.drain(), drain_s)
        results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
        return sum(1 for r in results if not isinstance(r, BaseException))

    def hold(self, peer: str, protocol: str, data: bytes, n: int, drain_s: float = 20.0) -> int:
        """Open ``n`` streams, write ``data`` on each, and leave them open, reading nothing (released by
        ``release``); returns how many were opened and written in time."""
        return self.run(self._hold(peer, protocol, data, n, drain_s), drain_s * 3 + 30)

    def release(self) -> None:
        async def close_all():
            for _, writer in self.held:
                writer.close()
            self.held.clear()
        self.run(close_all())

    def close(self) -> None:
        """Vanish: stop every heartbeat, close the streams, leave the DHT (what was stored stays)."""
        self.stop.set()
        for t in self.threads:
            t.join(5)
        try:
            self.release()
            self.run(self.p2p.shutdown(), 10)
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.dht.shutdown()


# --- memory -----------------------------------------------------------------------------------------

def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a node: its process, the DHT child, p2pd)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def status_kib(pid: int, field: str = "VmRSS") -> int:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    except OSError:
        return 0
    return int(m.group(1)) if m else 0


class RssWatch:
    """Samples the resident memory of each node's process tree every ``interval_s`` in a thread;
    ``peak_mib()`` also counts a process's own high-water mark (VmHWM) where it rose while watched,
    so a spike shorter than the sampling interval is not missed."""

    def __init__(self, roots: dict[str, int], interval_s: float = 0.1):
        self.trees = {name: process_tree(pid) for name, pid in roots.items()}
        self.hwm0 = {p: status_kib(p, "VmHWM") for tree in self.trees.values() for p in tree}
        self.baseline = {name: self.tree_kib(name) for name in self.trees}
        self.peak = {p: status_kib(p) for tree in self.trees.values() for p in tree}
        self.interval_s, self.done = interval_s, threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="rss-watch")
        self.thread.start()

    def tree_kib(self, name: str) -> int:
        return sum(status_kib(p) for p in self.trees[name])

    def _loop(self) -> None:
        while not self.done.is_set():
            for tree in self.trees.values():
                for p in tree:
                    self.peak[p] = max(self.peak[p], status_kib(p))
            self.done.wait(self.interval_s)   # the sampling period

    def peak_mib(self, name: str) -> float:
        total = 0
        for p in self.trees[name]:
            hwm = status_kib(p, "VmHWM")
            total += max(self.peak[p], hwm if hwm > self.hwm0[p] else 0)
        return total / 1024

    def baseline_mib(self, name: str) -> float:
        return self.baseline[name] / 1024

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)


# --- processes --------------------------------------------------------------------------------------

class EnvProc(Proc):
    """``Proc`` with extra environment variables (a poisoning member: same code, same model, env set)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, ready_file: str | Path | None = None):
        super().__init__(*args, env=env, ready_file=ready_file)


def hijack_plan(traced, attacker: str, honest: list[str], micro_batches: int, model: str):
    """A plan giving every op of the model to ``attacker`` (stage 0 alone) and making every honest
    member a spare: a valid ``Plan`` that hashes like one an honest node would rebuild from its compact form."""
    from swarm.scheduler import Plan
    from swarm.scheduler.costs import Workload
    from swarm.scheduler.plan import StagePlan

    names = Workload.from_dag(traced.dag).names
    stage = StagePlan(0, 0, len(names), tuple(names), (attacker,), 0.01, 1e6, 0.0)
    return Plan(model, (stage,), (), tuple(sorted(honest)), 0.01, 0.05, micro_batches)


def ballot_of(plan, epoch: int, proposer: str) -> dict:
    return {"epoch": int(epoch), "plan_hash": plan.hash, "proposer": proposer, "members": list(plan.members),
            "plan": json.dumps(plan.compact())}


def wait_for_time(seconds: float, still: callable = lambda: True, interval_s: float = 0.25) -> bool:
    """Let an attack run for ``seconds`` while checking ``still()`` (False ends it early); True if it held."""
    try:
        poll_until(lambda: not still(), seconds, "the attack's time to pass", interval_s)
        return False
    except TimeoutError:
        return True
