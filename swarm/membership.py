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
import os
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import pydantic.v1 as pv1
from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from swarm.auth import CredentialChecker, peer_id_of

MAX_LINKS = 32                     # bandwidth/RTT entries per record: keeps every DHT value small
DEFAULT_BANDWIDTH_BPS = 100e6      # estimate for an edge nobody has measured (see ``bandwidth``)
STATES = ("joining", "online", "leaving", "offline")   # leaving: handing its state over, out of elections
MAX_HOLDS = 16                     # op ranges a record advertises
MAX_PLAN_CHARS = 12_000            # a ballot's plan JSON (without op names): ~150 peers


class _RecordV1(pv1.BaseModel):
    """Wire schema of a member record (strict: no type conversions are accepted)."""

    peer_id: pv1.StrictStr
    maddrs: List[pv1.StrictStr]
    device: pv1.StrictStr
    device_name: pv1.StrictStr
    tflops: pv1.StrictFloat
    memory_bytes: pv1.StrictInt
    versions: Dict[pv1.StrictStr, pv1.StrictStr]
    started_at: pv1.StrictFloat
    updated_at: pv1.StrictFloat
    state: pv1.StrictStr
    bandwidth_bps: Dict[pv1.StrictStr, pv1.StrictFloat]
    rtt_s: Dict[pv1.StrictStr, pv1.StrictFloat]
    stage: Optional[pv1.StrictInt]
    credential: Optional[pv1.StrictBytes] = None
    vote_epoch: Optional[pv1.StrictInt] = None
    vote_hash: Optional[pv1.StrictStr] = None
    committed_epoch: Optional[pv1.StrictInt] = None
    committed_hash: Optional[pv1.StrictStr] = None
    role: Optional[pv1.StrictStr] = None
    step: Optional[pv1.StrictInt] = None
    codec_bps: Optional[pv1.StrictFloat] = None
    model_tflops: Optional[pv1.StrictFloat] = None
    cpu_cores: Optional[pv1.StrictFloat] = None
    holds: Optional[List[List[pv1.StrictInt]]] = None
    ready: Optional[pv1.StrictStr] = None


class _BallotV1(pv1.BaseModel):
    """A proposer's ballot and its plan (``Plan.compact`` as JSON)."""

    epoch: pv1.StrictInt
    plan_hash: pv1.StrictStr
    proposer: pv1.StrictStr
    members: List[pv1.StrictStr]
    plan: pv1.constr(strict=True, max_length=MAX_PLAN_CHARS)


class _SwarmSchema(pv1.BaseModel):
    members: Dict[BytesWithPublicKey, _RecordV1]
    ballots: Dict[BytesWithPublicKey, _BallotV1]


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

    @property
    def uptime_s(self) -> float:
        return max(0.0, self.updated_at - self.started_at)

    def to_wire(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("peer_id", "device", "device_name", "state"):  # e.g. torch's TorchVersion is a str subclass
            d[name] = str(d[name])
        d["maddrs"] = [str(a) for a in d["maddrs"]]
        d["versions"] = {str(k): str(v) for k, v in d["versions"].items()}
        for name in ("tflops", "started_at", "updated_at"):
            d[name] = float(d[name])
        for name in ("bandwidth_bps", "rtt_s"):  # the most recent measurements, capped
            d[name] = {k: float(v) for k, v in list(d[name].items())[-MAX_LINKS:]}
        d["memory_bytes"] = int(d["memory_bytes"])
        for name in ("codec_bps", "model_tflops", "cpu_cores"):
            if d[name] is not None:
                d[name] = float(d[name])
        return d

    @classmethod
    def from_wire(cls, value: Any) -> "MemberRecord | None":
        """The record, or None when ``value`` is malformed (it is then ignored)."""
        try:
            parsed = _RecordV1.parse_obj(value)
        except (pv1.ValidationError, TypeError):
            return None
        if parsed.state not in STATES or len(parsed.bandwidth_bps) > MAX_LINKS or len(parsed.rtt_s) > MAX_LINKS:
            return None
        if parsed.holds is not None and (len(parsed.holds) > MAX_HOLDS or any(
                len(h) != 3 or not 0 <= h[0] < h[1] or h[2] < 0 for h in parsed.holds)):
            return None
        return cls(**parsed.dict())


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

    def electorate(self) -> "MembershipView":
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
                 checker: CredentialChecker | None = None):
        self.dht, self.signer, self.key, self.ttl_s = dht, signer, f"{prefix}_members", ttl_s
        self.ballot_key = f"{prefix}_ballots"
        self.checker = checker

    def publish(self, record: MemberRecord, timeout_s: float = 10.0) -> bool:
        """Store (refresh) this node's record; False if no DHT peer accepted it in time."""
        record.updated_at = get_dht_time()
        future = self.dht.store(self.key, record.to_wire(), expiration_time=record.updated_at + self.ttl_s,
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
            try:
                ballot = _BallotV1.parse_obj(getattr(entry, "value", None)).dict()
            except (pv1.ValidationError, TypeError):
                continue
            if owner_peer_id(subkey) == ballot["proposer"] and ballot["members"] == sorted(set(ballot["members"])):
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
        found = self.dht.get(self.key, latest=True, return_future=True).result(timeout=timeout_s)
        now, members = get_dht_time(), {}
        entries = found.value if found is not None and isinstance(found.value, dict) else {}
        for subkey, entry in entries.items():
            record = MemberRecord.from_wire(getattr(entry, "value", None))
            if record is None or record.state == "offline" or entry.expiration_time < now:
                continue
            if not self.accepts(subkey, record):
                continue
            if record.peer_id not in members or members[record.peer_id].updated_at < record.updated_at:
                members[record.peer_id] = record
        return MembershipView(members, now)
