"""Hosting a private swarm: the directory ``node.py swarm-init`` creates and ``swarm-admit`` extends.

    DIR/authority.key            the swarm authority (secret: whoever holds it can admit members)
    DIR/swarm.json               {"name", "authority"}: the swarm's name and public authority key
    DIR/members/<n>/identity     a member's identity (created by --members; goes to that machine only)
    DIR/members/<n>/credential.json
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from swarm.errors import SwarmError
from swarm.net.auth import Credential, create_authority, issue_credential, load_authority, load_identity, write_new


@dataclass(frozen=True)
class Member:
    peer_id: str
    identity_path: str
    credential_path: str


@dataclass(frozen=True)
class SwarmFiles:
    authority_path: str
    members: list[Member]


def _write_new(path: Path, text: str) -> None:
    write_new(path, text.encode(), 0o600, str(path))


def init_swarm(directory: str, name: str, n_members: int = 0, valid_days: float = 365.0) -> SwarmFiles:
    """A new authority in ``directory`` (which must be new or empty), plus ``n_members`` members."""
    root = Path(directory).expanduser()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise SwarmError(f"{root} exists and is not an empty directory")
    authority = create_authority(str(root / "authority.key"))
    _write_new(root / "swarm.json", json.dumps({"name": name, "authority": authority.get_public_key().to_bytes().decode()}))
    members = []
    for i in range(n_members):
        identity = load_identity(str(root / "members" / str(i) / "identity"))
        cred_path = root / "members" / str(i) / "credential.json"
        _write_new(cred_path, issue_credential(authority, name, identity.public_key, valid_days).to_json())
        members.append(Member(identity.peer_id, identity.path, str(cred_path)))
    return SwarmFiles(str(root / "authority.key"), members)


def admit(directory: str, public_key: str, out: str, valid_days: float = 365.0) -> Credential:
    """Issue a credential for ``public_key`` with the authority in ``directory``; write it to ``out``."""
    root = Path(directory).expanduser()
    try:
        name = json.loads((root / "swarm.json").read_text())["name"]
    except (OSError, ValueError, KeyError, TypeError):
        raise SwarmError(f"{root} is not a swarm directory made by `node.py swarm-init` (no valid swarm.json)") from None
    cred = issue_credential(load_authority(str(root / "authority.key")), str(name), public_key, valid_days)
    _write_new(Path(out).expanduser(), cred.to_json())
    return cred
