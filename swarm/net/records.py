"""Member records and ballots as the DHT carries them: the wire schemas (strict pydantic.v1, installed
as a hivemind ``SchemaValidator``), ``MemberRecord``, and the bounds a record or ballot must keep to
be believed (``check_record``, ``parse_record``, ``check_ballot``; docs/hostile.md, "Member records")."""
from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from typing import Any

import pydantic.v1 as pv1
from hivemind.dht.schema import BytesWithPublicKey

from swarm.config import RELAY_DATA_LIMIT_MB, RELAY_TIME_LIMIT_S

MAX_LINKS = 32                     # bandwidth/RTT entries per record: keeps every DHT value small
DEFAULT_BANDWIDTH_BPS = 100e6      # estimate for an edge nobody has measured (see ``bandwidth``)
CUT_BPS = 1e3                      # what planning prices a link at that one end cannot reach
RELAYED_BPS = 5e6                  # estimate for an unmeasured link that runs through a relay (docs/nat.md)
RELAY_SUSTAINED_BPS = RELAY_DATA_LIMIT_MB * 2**20 * 8 / RELAY_TIME_LIMIT_S   # ~19 Mbit/s: what a relay carries for good


class MemberState(enum.StrEnum):
    """A member's ``state`` (the same strings on the wire). ``LEAVING``: handing its state over, out of
    elections; ``OFFLINE``: gone (readers drop the record). No node ever set the old ``"joining"``."""

    ONLINE = "online"
    LEAVING = "leaving"
    OFFLINE = "offline"


STATES = tuple(s.value for s in MemberState)


class Reachability(enum.StrEnum):
    """Whether peers can dial a member (docs/nat.md): ``PUBLIC`` (a dial-back reached it), ``NAT``
    (behind NAT, every link to a member direct: hole punching worked where needed), ``RELAYED`` (behind
    NAT, some link goes through a relay)."""

    PUBLIC = "public"
    NAT = "nat"
    RELAYED = "relayed"


class LinkPath(enum.StrEnum):
    """How a link runs: straight between the two peers, or through a relay (``/p2p-circuit``)."""

    DIRECT = "direct"
    RELAYED = "relayed"


REACHABILITIES = tuple(r.value for r in Reachability)
PATHS = tuple(p.value for p in LinkPath)
MAX_UNREACHABLE = 8                # peers a record says it cannot reach
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
MAX_LOSS = 1e6                     # val_loss: [0, 1e6] (nats per sample)
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
    val_loss: pv1.StrictFloat | None = None
    reachability: pv1.StrictStr | None = None
    paths: dict[pv1.StrictStr, pv1.StrictStr] | None = None
    unreachable: list[pv1.StrictStr] | None = None
    precision: pv1.StrictStr | None = None
    memory_limit_bytes: pv1.StrictInt | None = None
    memory_peak_bytes: pv1.StrictInt | None = None


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
    state: MemberState = MemberState.ONLINE
    bandwidth_bps: dict[str, float] = field(default_factory=dict)  # measured, to other peer ids
    rtt_s: dict[str, float] = field(default_factory=dict)
    stage: int | None = None
    credential: bytes | None = None  # private swarms: the member's credential (swarm.net.auth)
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
    val_loss: float | None = None     # first-stage replicas: the newest validation loss measured (its share)
    reachability: str | None = None   # ``Reachability``: can peers dial it (None: not checked yet)
    paths: dict[str, str] | None = None   # ``LinkPath`` of its connection to each connected member
    unreachable: list[str] | None = None  # members it cannot reach (no answer to its pings, failed calls)
    precision: str | None = None      # what its stage computes in: fp32 | bf16 | fp16
    memory_limit_bytes: int | None = None   # its ``memory_limit_gb`` (None: no cap) ...
    memory_peak_bytes: int | None = None    # ... and the most its running stage measured (``swarm.runtime.memory``)

    @property
    def uptime_s(self) -> float:
        return max(0.0, self.updated_at - self.started_at)

    def merged(self, *adverts: Any) -> MemberRecord:
        """A copy with the fields of each advert (a dataclass whose field names are record fields, e.g.
        ``ElectionAdvert``, ``HoldingAdvert``, ``LinkAdvert``) set; later adverts win."""
        changes = {f.name: getattr(a, f.name) for a in adverts if a is not None for f in dataclasses.fields(a)}
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"not member record fields: {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

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
        for name in ("memory_bytes", "memory_limit_bytes", "memory_peak_bytes"):
            if d[name] is not None:
                d[name] = min(max(int(d[name]), 0), MAX_MEMORY_BYTES)
        if d["precision"] is not None:
            d["precision"] = str(d["precision"])[:MAX_NAME_CHARS]
        for name, high in (("codec_bps", MAX_CODEC_BPS), ("model_tflops", MAX_TFLOPS), ("cpu_cores", MAX_CPU_CORES)):
            if d[name] is not None:
                d[name] = _clamp(float(d[name]), high) if math.isfinite(d[name]) and d[name] > 0 else None
        if d["observed_tflops"] is not None:
            d["observed_tflops"] = {str(k): _clamp(float(v), MAX_TFLOPS) for k, v in list(d["observed_tflops"].items())[-MAX_LINKS:]
                                    if math.isfinite(v) and v > 0} or None
        if d["distrusts"] is not None:
            d["distrusts"] = [str(p) for p in d["distrusts"]][:MAX_DISTRUSTS] or None
        if d["paths"] is not None:
            d["paths"] = {str(k): str(v) for k, v in list(d["paths"].items())[-MAX_LINKS:]} or None
        if d["unreachable"] is not None:
            d["unreachable"] = [str(p) for p in d["unreachable"]][:MAX_UNREACHABLE] or None
        if d["val_loss"] is not None:
            d["val_loss"] = min(float(d["val_loss"]), MAX_LOSS) if math.isfinite(d["val_loss"]) and d["val_loss"] >= 0 else None
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
    for name in ("memory_bytes", "memory_limit_bytes", "memory_peak_bytes"):
        yield _number(name, getattr(r, name), 0, MAX_MEMORY_BYTES, low_open=False)
    yield _number("codec_bps", r.codec_bps, 0, MAX_CODEC_BPS)
    yield _number("cpu_cores", r.cpu_cores, 0, MAX_CPU_CORES)
    yield _number("val_loss", r.val_loss, 0, MAX_LOSS, low_open=False)
    yield _number("started_at", r.started_at, 0, math.inf, low_open=False)
    yield _number("updated_at", r.updated_at, 0, math.inf, low_open=False)
    yield _number("stage", r.stage, 0, MAX_STAGES, low_open=False, high_open=True)
    for name in ("step", "vote_epoch", "committed_epoch"):
        yield _number(name, getattr(r, name), 0, MAX_COUNT, low_open=False, high_open=True)
    yield None if r.state in STATES else f"state {_brief(r.state)} unknown"
    yield _text("peer_id", r.peer_id, MAX_ID_CHARS)
    for name in ("vote_hash", "committed_hash", "ready"):
        yield _text(name, getattr(r, name), MAX_ID_CHARS)
    for name in ("device", "device_name", "role", "precision"):
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
    yield None if r.reachability in (None, *REACHABILITIES) else f"reachability {_brief(r.reachability)} unknown"
    if r.paths is not None:
        yield None if len(r.paths) <= MAX_LINKS else f"paths has more than {MAX_LINKS} entries"
        yield from (_text("paths peer id", peer, MAX_ID_CHARS) or (None if path in PATHS else f"path {_brief(path)} unknown")
                    for peer, path in r.paths.items())
    if r.unreachable is not None:
        yield None if len(r.unreachable) <= MAX_UNREACHABLE else f"unreachable has more than {MAX_UNREACHABLE} entries"
        yield from (_text("unreachable entry", peer, MAX_ID_CHARS) for peer in r.unreachable)
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
    values = parsed.dict()
    if values["state"] in STATES:
        values["state"] = MemberState(values["state"])
    record = MemberRecord(**values)
    reason = check_record(record)
    return (None, reason) if reason else (record, None)


