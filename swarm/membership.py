"""Membership: the only module that touches the hivemind DHT. It owns every DHT key.

Each node publishes one *member record* under ``<prefix>_members``, in a subkey holding its RSA
public key: ``RSASignatureValidator`` makes the subkey writable by its owner only, and
``SchemaValidator`` (installed on every node) rejects records of the wrong shape at store time.
Readers validate again and drop what is malformed or stale, so a hostile record is ignored, never
fatal. A record counts only if its ``peer_id`` is the one derived from the key that signed it (one
RSA key is both the libp2p identity and the record signer), and, in a private swarm, only if it
carries a valid credential for that peer. DHT records cannot be deleted: a leaving node publishes ``state="offline"``; a killed node's
record simply expires after ``ttl_s``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pydantic.v1 as pv1
from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from swarm.auth import CredentialChecker, peer_id_of
from swarm.errors import SwarmError
from swarm.refusals import Refusals, short

MAX_LINKS = 32                     # bandwidth/RTT entries per record: keeps every DHT value small
DEFAULT_BANDWIDTH_BPS = 100e6      # estimate for an edge nobody has measured (see ``bandwidth``)
STATES = ("joining", "online", "leaving", "offline")   # leaving: handing its state over, out of elections
MAX_HOLDS = 16                     # op ranges a record advertises
MAX_PLAN_CHARS = 12_000            # a ballot's plan JSON (without op names): ~150 peers

# What a record or ballot must keep to be believed (docs/hostile.md, "Member records"): physical
# bounds well above any real machine, sizes well above any honest record. Readers ignore (and log once
# per peer) what breaks them; this node's own record is clamped into them before it is published.
MAX_TFLOPS = 1e4                   # tflops, model_tflops: (0, 1e4] TFLOP/s
MAX_MEMORY_BYTES = 1 << 44         # memory_bytes: [0, 16 TiB]
MAX_BANDWIDTH_BPS = 4e12           # bandwidth_bps values: (0, 4 Tbit/s]
MAX_RTT_S = 300.0                  # rtt_s values: (0, 300 s]
MAX_CODEC_BPS = 1e13               # codec_bps: (0, 10 TB/s]
MAX_CPU_CORES = 4096.0             # cpu_cores: (0, 4096]
MAX_COUNT = 1 << 53                # steps, epochs, op indices: [0, 2**53), exact as a float and within msgpack
MAX_STAGES = 4096                  # stage: [0, 4096)
MAX_ID_CHARS = 64                  # peer ids (46 for RSA keys), plan hashes (16), dictionary keys
MAX_MADDRS, MAX_MADDR_CHARS = 16, 256
MAX_NAME_CHARS = 128               # device, device_name, role, version names and values
MAX_VERSIONS = 16
MAX_CREDENTIAL_BYTES = 8 << 10     # a credential is ~1 KiB (an RSA key and a signature)
MAX_BALLOT_MEMBERS = 1024          # a ballot's electorate (its plan caps it at ~150 anyway)
MAX_DISTRUSTS = 4                  # peers a record accuses of sending poison (docs/hostile.md, "Disputes")
# updated_at may be at most ttl_s ahead of the reader's clock (clock skew allowance = ttl_s), and a
# record counts at most ttl_s after its updated_at, whatever DHT expiration its writer chose.


class _RecordV1(pv1.BaseModel):
    """Wire schema of a member record (strict: no type conversions are accepted)."""

    peer_id: pv1.StrictStr
    maddrs: list[pv1.StrictStr]
    device: pv1.StrictStr
    device_name: pv1.StrictStr
    tflops: pv1.StrictFloat
    memory_bytes: pv1.StrictInt
    versions: dict[pv1.StrictStr, pv1.StrictStr]
    started_at: pv1.StrictFloat
    updated_at: pv1.StrictFloat
    state: pv1.StrictStr
    bandwidth_bps: dict[pv1.StrictStr, pv1.StrictFloat]
    rtt_s: dict[pv1.StrictStr, pv1.StrictFloat]
    stage: pv1.StrictInt | None
    credential: pv1.StrictBytes | None = None
    vote_epoch: pv1.StrictInt | None = None
    vote_hash: pv1.StrictStr | None = None
    committed_epoch: pv1.StrictInt | None = None
    committed_hash: pv1.StrictStr | None = None
    role: pv1.StrictStr | None = None
    step: pv1.StrictInt | None = None
    codec_bps: pv1.StrictFloat | None = None
    model_tflops: pv1.StrictFloat | None = None
    cpu_cores: pv1.StrictFloat | None = None
    holds: list[list[pv1.StrictInt]] | None = None
    ready: pv1.StrictStr | None = None
    observed_tflops: dict[pv1.StrictStr, pv1.StrictFloat] | None = None
    distrusts: list[pv1.StrictStr] | None = None


def check_ballot(ballot: dict) -> str | None:
    """Why a (well-typed) ballot must not be believed, or None: epoch in [0, 2**53), ids and hashes
    at most ``MAX_ID_CHARS``, at most ``MAX_BALLOT_MEMBERS`` members, sorted and distinct."""
    members = ballot["members"]
    checks = [
        _number("epoch", ballot["epoch"], 0, MAX_COUNT, low_open=False, high_open=True),
        _text("plan_hash", ballot["plan_hash"], MAX_ID_CHARS), _text("proposer", ballot["proposer"], MAX_ID_CHARS),
        None if len(members) <= MAX_BALLOT_MEMBERS else f"members has more than {MAX_BALLOT_MEMBERS} entries",
        next((f"members entry longer than {MAX_ID_CHARS} characters" for m in members if len(m) > MAX_ID_CHARS), None),
        None if members == sorted(set(members)) else "members not sorted and distinct",
    ]
    return next((reason for reason in checks if reason is not None), None)


class _BallotV1(pv1.BaseModel):
    """A proposer's ballot and its plan (``Plan.compact`` as JSON)."""

    epoch: pv1.StrictInt
    plan_hash: pv1.StrictStr
    proposer: pv1.StrictStr
    members: list[pv1.StrictStr]
    plan: pv1.constr(strict=True, max_length=MAX_PLAN_CHARS)


class _SwarmSchema(pv1.BaseModel):
    members: dict[BytesWithPublicKey, _RecordV1]
    ballots: dict[BytesWithPublicKey, _BallotV1]


@dataclass
class MemberRecord:
    peer_id: str
    maddrs: list[str]
    device: str
    device_name: str
    tflops: float
    memory_bytes: int
    versions: dict[str, str]
    started_at: float
    updated_at: float = 0.0
    state: str = "online"
    bandwidth_bps: dict[str, float] = field(default_factory=dict)  # measured, to other peer ids
    rtt_s: dict[str, float] = field(default_factory=dict)
    stage: int | None = None
    credential: bytes | None = None  # private swarms: the member's credential (swarm.auth)
    vote_epoch: int | None = None     # election (swarm.election): my vote ...
    vote_hash: str | None = None
    committed_epoch: int | None = None  # ... and the plan I run
    committed_hash: str | None = None
    role: str | None = None           # in the committed plan: "stage 2", "spare"
    step: int | None = None           # optimizer steps this node's stage has applied
    codec_bps: float | None = None    # measured AdaTopK encode + decode throughput (raw bytes/s)
    model_tflops: float | None = None  # measured TFLOP/s on a training pass of the swarm's model (planning uses it)
    cpu_cores: float | None = None     # a CPU quota its process runs under (cores), if any
    holds: list[list[int]] | None = None   # [first op, stop op, step]: state this node can hand over
    ready: str | None = None          # hash of the plan whose stage this node runs (state loaded)
    observed_tflops: dict[str, float] | None = None   # TFLOP/s this node saw next-stage peers deliver
    distrusts: list[str] | None = None   # peers this node banned for sending NaN/Inf (a dispute: docs/hostile.md)

    @property
    def uptime_s(self) -> float:
        return max(0.0, self.updated_at - self.started_at)

    def to_wire(self) -> dict[str, Any]:
        """The wire form; measurements are clamped into the bounds readers check (a probe that read
        absurdly fast must not make this node's own record refused) and names cut to their caps."""
        d = dataclasses.asdict(self)
        for name in ("peer_id", "device", "device_name", "state"):  # e.g. torch's TorchVersion is a str subclass
            d[name] = str(d[name])
        for name in ("device", "device_name"):
            d[name] = d[name][:MAX_NAME_CHARS]
        d["maddrs"] = [str(a) for a in d["maddrs"]][:MAX_MADDRS]
        d["versions"] = {str(k)[:MAX_NAME_CHARS]: str(v)[:MAX_NAME_CHARS] for k, v in list(d["versions"].items())[:MAX_VERSIONS]}
        for name in ("tflops", "started_at", "updated_at"):
            d[name] = float(d[name])
        d["tflops"] = _clamp(d["tflops"], MAX_TFLOPS)
        for name, high in (("bandwidth_bps", MAX_BANDWIDTH_BPS), ("rtt_s", MAX_RTT_S)):  # the most recent measurements, capped
            d[name] = {k: _clamp(float(v), high) for k, v in list(d[name].items())[-MAX_LINKS:]
                       if math.isfinite(v) and v > 0}
        d["memory_bytes"] = min(max(int(d["memory_bytes"]), 0), MAX_MEMORY_BYTES)
        for name, high in (("codec_bps", MAX_CODEC_BPS), ("model_tflops", MAX_TFLOPS), ("cpu_cores", MAX_CPU_CORES)):
            if d[name] is not None:
                d[name] = _clamp(float(d[name]), high) if math.isfinite(d[name]) and d[name] > 0 else None
        if d["observed_tflops"] is not None:
            d["observed_tflops"] = {str(k): _clamp(float(v), MAX_TFLOPS) for k, v in list(d["observed_tflops"].items())[-MAX_LINKS:]
                                    if math.isfinite(v) and v > 0} or None
        if d["distrusts"] is not None:
            d["distrusts"] = [str(p) for p in d["distrusts"]][:MAX_DISTRUSTS] or None
        return d

    @classmethod
    def from_wire(cls, value: Any) -> MemberRecord | None:
        """The record, or None when ``value`` is malformed or out of bounds (it is then ignored)."""
        return parse_record(value)[0]


def _clamp(value: float, high: float) -> float:
    return min(max(value, 1e-12), high)


def _brief(value: Any) -> str:
    """A value as a refusal line names it: short whatever the sender put in."""
    text = f"{value:.6g}" if isinstance(value, float) else repr(value)
    return text if len(text) <= 24 else text[:21] + "..."


def _number(name: str, value: float | int | None, low: float, high: float, low_open: bool = True,
            high_open: bool = False) -> str | None:
    """Why ``value`` is out of (low, high] (bounds open or closed as given), or None; None values pass."""
    if value is None:
        return None
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    return None if ok else f"{name} {_brief(value)} out of range"


def _text(name: str, value: str | None, limit: int) -> str | None:
    return None if value is None or len(value) <= limit else f"{name} longer than {limit} characters"


def check_record(record: MemberRecord, now: float | None = None, ttl_s: float | None = None) -> str | None:
    """Why ``record`` must not be believed (one short phrase), or None when it is sane: every number
    finite and within the physical bounds above, every size within its cap, and, when ``now`` and
    ``ttl_s`` are given, ``updated_at`` at most ``ttl_s`` ahead of ``now`` and at most ``ttl_s`` old."""
    return next((reason for reason in _record_faults(record, now, ttl_s) if reason is not None), None)


def _record_faults(r: MemberRecord, now: float | None, ttl_s: float | None):
    """Reasons (or None) in order, lazily: a size cap is checked before the entries it bounds."""
    yield _number("tflops", r.tflops, 0, MAX_TFLOPS)
    yield _number("model_tflops", r.model_tflops, 0, MAX_TFLOPS)
    yield _number("memory_bytes", r.memory_bytes, 0, MAX_MEMORY_BYTES, low_open=False)
    yield _number("codec_bps", r.codec_bps, 0, MAX_CODEC_BPS)
    yield _number("cpu_cores", r.cpu_cores, 0, MAX_CPU_CORES)
    yield _number("started_at", r.started_at, 0, math.inf, low_open=False)
    yield _number("updated_at", r.updated_at, 0, math.inf, low_open=False)
    yield _number("stage", r.stage, 0, MAX_STAGES, low_open=False, high_open=True)
    for name in ("step", "vote_epoch", "committed_epoch"):
        yield _number(name, getattr(r, name), 0, MAX_COUNT, low_open=False, high_open=True)
    yield None if r.state in STATES else f"state {_brief(r.state)} unknown"
    yield _text("peer_id", r.peer_id, MAX_ID_CHARS)
    for name in ("vote_hash", "committed_hash", "ready"):
        yield _text(name, getattr(r, name), MAX_ID_CHARS)
    for name in ("device", "device_name", "role"):
        yield _text(name, getattr(r, name), MAX_NAME_CHARS)
    yield None if len(r.maddrs) <= MAX_MADDRS else f"maddrs has more than {MAX_MADDRS} entries"
    yield from (_text("maddrs entry", a, MAX_MADDR_CHARS) for a in r.maddrs)
    yield None if len(r.versions) <= MAX_VERSIONS else f"versions has more than {MAX_VERSIONS} entries"
    yield from (_text("versions entry", text, MAX_NAME_CHARS) for item in r.versions.items() for text in item)
    yield None if r.credential is None or len(r.credential) <= MAX_CREDENTIAL_BYTES \
        else f"credential longer than {MAX_CREDENTIAL_BYTES} bytes"
    for name, table, high in (("bandwidth_bps", r.bandwidth_bps, MAX_BANDWIDTH_BPS), ("rtt_s", r.rtt_s, MAX_RTT_S)):
        yield None if len(table) <= MAX_LINKS else f"{name} has more than {MAX_LINKS} links"
        yield from (_text(f"{name} peer id", peer, MAX_ID_CHARS) or _number(name, value, 0, high)
                    for peer, value in table.items())
    if r.observed_tflops is not None:
        yield None if len(r.observed_tflops) <= MAX_LINKS else f"observed_tflops has more than {MAX_LINKS} entries"
        yield from (_text("observed_tflops peer id", peer, MAX_ID_CHARS) or _number("observed_tflops", value, 0, MAX_TFLOPS)
                    for peer, value in r.observed_tflops.items())
    if r.distrusts is not None:
        yield None if len(r.distrusts) <= MAX_DISTRUSTS else f"distrusts has more than {MAX_DISTRUSTS} entries"
        yield from (_text("distrusts entry", peer, MAX_ID_CHARS) for peer in r.distrusts)
    if r.holds is not None:
        yield None if len(r.holds) <= MAX_HOLDS else f"holds has more than {MAX_HOLDS} entries"
        yield from (None if len(h) == 3 and 0 <= h[0] < h[1] < MAX_COUNT and 0 <= h[2] < MAX_COUNT
                    else f"holds {_brief(h)} out of range" for h in r.holds)
    if now is not None and ttl_s is not None:
        if r.updated_at > now + ttl_s:
            yield f"updated_at {r.updated_at - now:.3g} s in the future"
        elif r.updated_at + ttl_s < now:
            yield f"updated_at {now - r.updated_at:.3g} s old, past the {ttl_s:g} s TTL"


def parse_record(value: Any) -> tuple[MemberRecord | None, str | None]:
    """(record, None) for a well-formed record within bounds, else (None, why it is refused)."""
    try:
        parsed = _RecordV1.parse_obj(value)
    except pv1.ValidationError as e:
        error = e.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        return None, f"malformed: {where[:40]}: {error['msg'][:60]}"
    except TypeError:
        return None, "malformed: not a record"
    record = MemberRecord(**parsed.dict())
    reason = check_record(record)
    return (None, reason) if reason else (record, None)


def make_validators(prefix: str, private_key: RSAPrivateKey) -> list:
    """Validators every node of a swarm must install (same prefix everywhere)."""
    return [RSASignatureValidator(private_key), SchemaValidator(_SwarmSchema, allow_extra_keys=True, prefix=prefix)]


class SwarmDHT(DHT):
    """A hivemind DHT whose child process (and its p2pd) exits when the owner process dies."""

    def run(self) -> None:
        os.setpgrp()  # the DHT child and its p2pd form one process group we can kill together
        owner = self._parent_pid

        def watchdog() -> None:
            while os.getppid() == owner:
                time.sleep(0.5)
            os.killpg(os.getpgrp(), signal.SIGKILL)

        threading.Thread(target=watchdog, daemon=True, name="owner-watchdog").start()
        super().run()


@dataclass
class MembershipView:
    """Live members at one moment, by peer id (offline and expired records dropped)."""

    members: dict[str, MemberRecord]
    taken_at: float

    def peers(self) -> list[str]:
        return sorted(self.members)

    def electorate(self) -> MembershipView:
        """The members that take part in elections (not those leaving)."""
        return MembershipView({p: r for p, r in self.members.items() if r.state != "leaving"}, self.taken_at)

    def bandwidth(self, a: str, b: str) -> float:
        """Bits/s between two members: the smaller of the two measured directions; for an edge
        nobody measured, the smaller of the two peers' median measured bandwidths (the weaker access
        link bounds it), else ``DEFAULT_BANDWIDTH_BPS``."""
        measured = [v for v in (self.members[a].bandwidth_bps.get(b), self.members[b].bandwidth_bps.get(a)) if v]
        if measured:
            return min(measured)
        medians = [statistics.median(m.bandwidth_bps.values()) for m in (self.members[a], self.members[b]) if m.bandwidth_bps]
        return min(medians) if medians else DEFAULT_BANDWIDTH_BPS

    def bandwidth_matrix(self) -> dict[str, dict[str, float]]:
        peers = self.peers()
        return {a: {b: self.bandwidth(a, b) for b in peers if b != a} for a in peers}


@functools.lru_cache(maxsize=4096)
def owner_peer_id(subkey: bytes) -> str | None:
    """The peer id of the key named in an ``[owner:...]`` subkey (None if there is none)."""
    keys = RSASignatureValidator._PUBLIC_KEY_RE.findall(subkey) if isinstance(subkey, bytes) else []
    try:
        return peer_id_of(RSAPublicKey.from_bytes(keys[0])) if len(keys) == 1 else None
    except Exception:
        return None


class Membership:
    """Publish this node's record and read everyone's (a synchronous facade over the DHT).
    ``checker`` (private swarms) makes the view keep only records carrying a valid credential."""

    def __init__(self, dht: DHT, signer: RSASignatureValidator, prefix: str = "swarm", ttl_s: float = 30.0,
                 checker: CredentialChecker | None = None, log: Callable[[str], None] = lambda line: None):
        self.dht, self.signer, self.key, self.ttl_s = dht, signer, f"{prefix}_members", ttl_s
        self.ballot_key = f"{prefix}_ballots"
        self.checker = checker
        self.refusals = Refusals(log)   # bad records and ballots: one line per peer and minute

    def publish(self, record: MemberRecord, timeout_s: float = 10.0) -> bool:
        """Store (refresh) this node's record; False if no DHT peer accepted it in time. A record the
        readers would refuse (only a bug of this node: measurements are clamped) is a ``SwarmError``."""
        record.updated_at = get_dht_time()
        wire = record.to_wire()
        reason = check_record(MemberRecord(**wire))
        if reason is not None:
            raise SwarmError(f"this node's member record is out of bounds: {reason}")
        future = self.dht.store(self.key, wire, expiration_time=record.updated_at + self.ttl_s,
                                subkey=self.signer.local_public_key, return_future=True)
        try:
            return bool(future.result(timeout=timeout_s))
        except TimeoutError:
            return False

    def publish_ballot(self, epoch: int, plan_hash: str, proposer: str, members: list[str], plan_json: str,
                       timeout_s: float = 10.0) -> bool:
        """Store this node's current ballot (one per proposer: a new one replaces the old)."""
        value = {"epoch": int(epoch), "plan_hash": str(plan_hash), "proposer": str(proposer),
                 "members": [str(m) for m in members], "plan": plan_json}
        reason = check_ballot(value) or (f"plan longer than {MAX_PLAN_CHARS} characters" if len(plan_json) > MAX_PLAN_CHARS else None)
        if reason is not None:   # e.g. an epoch of 2**64 would be an OverflowError inside the DHT
            raise SwarmError(f"cannot publish a ballot: {reason}")
        future = self.dht.store(self.ballot_key, value, expiration_time=get_dht_time() + 10 * self.ttl_s,
                                subkey=self.signer.local_public_key, return_future=True)
        try:
            return bool(future.result(timeout=timeout_s))
        except TimeoutError:
            return False

    def ballots(self, timeout_s: float = 10.0) -> dict[str, dict]:
        """Valid ballots by proposer peer id (a ballot counts only if its proposer signed it)."""
        found = self.dht.get(self.ballot_key, latest=True, return_future=True).result(timeout=timeout_s)
        entries = found.value if found is not None and isinstance(found.value, dict) else {}
        out = {}
        for subkey, entry in entries.items():
            signer = owner_peer_id(subkey) or "?"
            try:
                ballot = _BallotV1.parse_obj(getattr(entry, "value", None)).dict()
            except (pv1.ValidationError, TypeError):
                self.refusals.note(signer, "ballot", "malformed")
                continue
            reason = check_ballot(ballot) or (None if signer == ballot["proposer"] else "proposer is not its signer")
            if reason is not None:
                self.refusals.note(signer, "ballot", reason)
                continue
            out[ballot["proposer"]] = ballot
        return out

    def accepts(self, subkey: Any, record: MemberRecord) -> bool:
        """The record is its signer's own (peer id bound to the key) and, if private, credentialed."""
        if owner_peer_id(subkey) != record.peer_id:
            return False
        if self.checker is None:
            return True
        token = self.checker.valid_bytes(record.credential or b"")
        return token is not None and token.username == record.peer_id

    def view(self, timeout_s: float = 10.0) -> MembershipView:
        """Live members: records expired, offline, past ``ttl_s`` after their ``updated_at`` (whatever
        DHT expiration the writer chose), out of bounds or not their signer's are left out; each bad one
        is logged, naming its signer (one line per peer and minute: ``swarm.refusals``)."""
        found = self.dht.get(self.key, latest=True, return_future=True).result(timeout=timeout_s)
        now, members = get_dht_time(), {}
        entries = found.value if found is not None and isinstance(found.value, dict) else {}
        for subkey, entry in entries.items():
            if entry.expiration_time < now:
                continue   # an honest record's end: expiration = updated_at + ttl_s
            signer = owner_peer_id(subkey) or "?"
            record, reason = parse_record(getattr(entry, "value", None))
            if record is not None and record.state == "offline":
                continue
            reason = reason or check_record(record, now, self.ttl_s)
            if reason is None and not self.accepts(subkey, record):
                reason = f"claims peer id {short(record.peer_id)}" if signer != record.peer_id else "no valid credential"
            if reason is not None:
                self.refusals.note(signer, "record", reason)
                continue
            if record.peer_id not in members or members[record.peer_id].updated_at < record.updated_at:
                members[record.peer_id] = record
        return MembershipView(members, now)
