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
from dataclasses import dataclass
from typing import Any

import pydantic.v1 as pv1
from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import SchemaValidator
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from swarm.errors import SwarmError
from swarm.events import NO_EVENTS, Events
from swarm.net.auth import CredentialChecker, peer_id_of
from swarm.net.records import (
    CUT_BPS,
    DEFAULT_BANDWIDTH_BPS,
    MAX_PLAN_CHARS,
    RELAY_SUSTAINED_BPS,
    RELAYED_BPS,
    LinkPath,
    MemberRecord,
    MemberState,
    _BallotV1,
    _SwarmSchema,
    check_ballot,
    check_record,
    parse_record,
)
from swarm.refusals import Refusals, short


def make_validators(prefix: str, private_key: RSAPrivateKey | None = None) -> list:
    """Validators every node of a swarm must install (same prefix everywhere); without a key, a fresh one."""
    key = private_key if private_key is not None else RSAPrivateKey()
    return [RSASignatureValidator(key), SchemaValidator(_SwarmSchema, allow_extra_keys=True, prefix=prefix)]


class SwarmDHT(DHT):
    """A hivemind DHT whose child process (and its p2pd) exits when the owner process dies.
    ``daemon_flags``: p2pd flags hivemind's ``P2P.create`` has no parameter for (relay limits)."""

    def __init__(self, *args, daemon_flags: dict | None = None, start: bool = False, **kwargs):
        self.daemon_flags = dict(daemon_flags or {})
        super().__init__(*args, start=False, **kwargs)
        if start:
            self.run_in_background(await_ready=True)

    def run(self) -> None:
        os.setpgrp()  # the DHT child and its p2pd form one process group we can kill together
        if self.daemon_flags:   # this (child) process only: its daemon gets the extra flags
            from hivemind.p2p import P2P
            make, flags = P2P._make_process_args, self.daemon_flags

            def with_flags(*args, **kwargs):   # a daemon without trusted relays (hivemind's identity check) keeps discovery
                extra = {k: v for k, v in flags.items() if k != "relayDiscovery" or "trustedRelays" in kwargs}
                return make(*args, **{**kwargs, **extra})
            P2P._make_process_args = staticmethod(with_flags)
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
        return MembershipView({p: r for p, r in self.members.items() if r.state != MemberState.LEAVING}, self.taken_at)

    def cut(self, a: str, b: str) -> bool:
        """Either member says it cannot reach the other (``unreachable``: its pings go unanswered)."""
        return b in (self.members[a].unreachable or ()) or a in (self.members[b].unreachable or ())

    def bandwidth(self, a: str, b: str) -> float:
        """Bits/s between two members: ``CUT_BPS`` for a cut link (``cut``); the smaller of the two
        measured directions; for an edge nobody measured, the smaller of the two peers' median
        measured bandwidths (the weaker access link bounds it), else ``DEFAULT_BANDWIDTH_BPS``. An edge
        that runs through a relay (``relayed``) is priced at most ``RELAY_SUSTAINED_BPS`` when measured
        (a burst measures the link, but the relay resets a connection that carries more than its data
        limit within its time limit) and at most ``RELAYED_BPS`` when not."""
        if self.cut(a, b):
            return CUT_BPS
        measured = [v for v in (self.members[a].bandwidth_bps.get(b), self.members[b].bandwidth_bps.get(a)) if v]
        if measured:
            return min(min(measured), RELAY_SUSTAINED_BPS) if self.relayed(a, b) else min(measured)
        medians = [statistics.median(m.bandwidth_bps.values()) for m in (self.members[a], self.members[b]) if m.bandwidth_bps]
        guess = min(medians) if medians else DEFAULT_BANDWIDTH_BPS
        return min(guess, RELAYED_BPS) if self.relayed(a, b) else guess

    def relayed(self, a: str, b: str) -> bool:
        """Either member says their connection runs through a relay (its record's ``paths``)."""
        return LinkPath.RELAYED in ((self.members[a].paths or {}).get(b), (self.members[b].paths or {}).get(a))

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
                 checker: CredentialChecker | None = None, events: Events = NO_EVENTS):
        self.dht, self.signer, self.key, self.ttl_s = dht, signer, f"{prefix}_members", ttl_s
        self.ballot_key = f"{prefix}_ballots"
        self.checker = checker
        self.refusals = Refusals(events=events)   # bad records and ballots: one line per peer and minute (swarm.refusals)

    def publish(self, record: MemberRecord, timeout_s: float = 10.0) -> bool:
        """Store (refresh) this node's record, stamped ``updated_at`` now (``record`` itself is left as it
        is); False if no DHT peer accepted it in time. A record the readers would refuse (only a bug of
        this node: measurements are clamped) is a ``SwarmError``."""
        record = dataclasses.replace(record, updated_at=get_dht_time())
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
            if record is not None and record.state == MemberState.OFFLINE:
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
