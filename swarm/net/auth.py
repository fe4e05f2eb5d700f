"""Identities and private swarms: who a peer is, and who may take part.

*Identity*: one RSA key per node, stored in libp2p's protobuf format so that p2pd uses it too. The
libp2p peer id is a hash of its public key, and the same key signs the node's member record, so a
record's ``peer_id`` can be checked against the key that signed it (``peer_id_of``).

*Private swarm*: an authority key (kept offline by the swarm's owner) signs a **credential** for each
member: (peer id, member public key, expiry). A node started with a credential authorizes every DHT
request and response with it (hivemind's ``TokenAuthorizerBase`` protocol: the request is signed by
the member key, the credential proves the key belongs to the swarm), and it accepts only credentialed
peers on its own RPCs. Pure logic: no networking here.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
from datetime import datetime, timedelta, timezone

from cryptography.hazmat.primitives import serialization
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.auth import TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey
from hivemind.utils.timed_storage import get_dht_time

from swarm.errors import SwarmError

CREDENTIAL_VERSION = 1


def _key_from_der(der: bytes) -> RSAPrivateKey:
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": der})  # hivemind's own unpickling path: DER, no new key generated
    return key


def peer_id_of(public_key: RSAPublicKey) -> str:
    """The libp2p peer id (base58) of an RSA public key: sha2-256 multihash of its protobuf form."""
    der = serialization.load_ssh_public_key(public_key.to_bytes()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return PeerID(b"\x12\x20" + hashlib.sha256(encoded).digest()).to_base58()


@dataclasses.dataclass(frozen=True)
class Identity:
    path: str
    key: RSAPrivateKey

    @property
    def peer_id(self) -> str:
        return peer_id_of(self.key.get_public_key())

    @property
    def public_key(self) -> str:
        return self.key.get_public_key().to_bytes().decode()


def load_identity(path: str, create: bool = True) -> Identity:
    """Read (or create, mode 0400) a libp2p RSA identity file; one-line errors."""
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        if not create:
            raise SwarmError(f"identity file {path} does not exist")
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            der = RSAPrivateKey().to_bytes()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "wb") as f:
                f.write(crypto_pb2.PrivateKey(key_type=crypto_pb2.RSA, data=der).SerializeToString())
        except OSError as e:
            raise SwarmError(f"cannot create identity file {path}: {e.strerror}") from None
    try:
        with open(path, "rb") as f:
            proto = crypto_pb2.PrivateKey.FromString(f.read())
    except OSError as e:
        raise SwarmError(f"cannot read identity file {path}: {e.strerror}") from None
    except Exception:
        raise SwarmError(f"identity file {path} is not a libp2p private key") from None
    if proto.key_type != crypto_pb2.RSA or not proto.data:
        raise SwarmError(f"identity file {path} is not an RSA libp2p key (swarm signs records with it)")
    try:
        return Identity(path, _key_from_der(proto.data))
    except Exception:
        raise SwarmError(f"identity file {path} holds a corrupt RSA key") from None


# --- authority and credentials -------------------------------------------------------------------

def create_authority(path: str) -> RSAPrivateKey:
    """A new swarm authority key (PEM, mode 0400); refuses to overwrite one."""
    key = RSAPrivateKey()
    pem = key._private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
    write_new(path, pem, 0o400, f"authority key {path}")
    return key


def write_new(path: str | os.PathLike, data: bytes, mode: int, what: str) -> None:
    """Create ``path`` (and its folder) holding ``data``, with ``mode``; never overwrites a file: a
    one-line error naming ``what`` instead."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise SwarmError(f"{what} already exists (refusing to overwrite it)") from None
    except OSError as e:
        raise SwarmError(f"cannot create {what}: {e.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def load_authority(path: str) -> RSAPrivateKey:
    try:
        with open(os.path.expanduser(path), "rb") as f:
            raw = serialization.load_pem_private_key(f.read(), password=None)
        return _key_from_der(raw.private_bytes(serialization.Encoding.DER,
                                               serialization.PrivateFormat.TraditionalOpenSSL,
                                               serialization.NoEncryption()))
    except OSError as e:
        raise SwarmError(f"cannot read authority key {path}: {e.strerror}") from None
    except (ValueError, TypeError):
        raise SwarmError(f"authority key {path} is not a PEM RSA private key") from None


def _signed_part(token: AccessToken) -> bytes:
    return b"\n".join([b"swarm-credential-v1", token.username.encode(), token.public_key,
                       token.expiration_time.encode()])


def _expiry(token: AccessToken) -> float:
    return datetime.fromisoformat(token.expiration_time).timestamp()


@dataclasses.dataclass(frozen=True)
class Credential:
    """A member's admission to one swarm: its peer id and key, signed by the swarm authority."""

    swarm: str
    authority: str  # the authority's public key, OpenSSH format: it pins the swarm
    token: AccessToken

    @property
    def peer_id(self) -> str:
        return self.token.username

    @property
    def expires_at(self) -> float:
        return _expiry(self.token)

    def to_json(self) -> str:
        return json.dumps({"version": CREDENTIAL_VERSION, "swarm": self.swarm, "authority": self.authority,
                           "token": base64.b64encode(self.token.SerializeToString()).decode()}, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "credential") -> Credential:
        try:
            data = json.loads(text)
            if data.get("version") != CREDENTIAL_VERSION:
                raise ValueError(f"unsupported version {data.get('version')!r}")
            cred = cls(str(data["swarm"]), str(data["authority"]),
                       AccessToken.FromString(base64.b64decode(data["token"], validate=True)))
            RSAPublicKey.from_bytes(cred.authority.encode())
            _expiry(cred.token)
        except Exception as e:
            raise SwarmError(f"{source} is not a swarm credential ({type(e).__name__}: {e})") from None
        return cred


def issue_credential(authority: RSAPrivateKey, swarm: str, public_key: str, valid_days: float) -> Credential:
    """Admit the holder of ``public_key`` (OpenSSH RSA format) for ``valid_days``."""
    try:
        member = RSAPublicKey.from_bytes(public_key.strip().encode())
    except Exception:
        raise SwarmError("the member key is not an OpenSSH RSA public key ('ssh-rsa AAAA...')") from None
    expires = datetime.now(timezone.utc) + timedelta(days=valid_days)
    token = AccessToken(username=peer_id_of(member), public_key=member.to_bytes(),
                        expiration_time=expires.isoformat())
    token.signature = authority.sign(_signed_part(token))
    return Credential(swarm, authority.get_public_key().to_bytes().decode(), token)


def read_credential(path: str) -> Credential:
    try:
        with open(os.path.expanduser(path)) as f:
            return Credential.from_json(f.read(), f"credential file {path}")
    except OSError as e:
        raise SwarmError(f"cannot read credential file {path}: {e.strerror}") from None


class CredentialChecker:
    """Decides whether a token is a live credential of this swarm (signature, expiry, key binding)."""

    def __init__(self, authority_public_key: str):
        self.authority = RSAPublicKey.from_bytes(authority_public_key.encode())

    def valid(self, token: AccessToken, now: float | None = None) -> bool:
        try:
            return (self.authority.verify(_signed_part(token), token.signature)
                    and _expiry(token) > (get_dht_time() if now is None else now)
                    and token.username == peer_id_of(RSAPublicKey.from_bytes(token.public_key)))
        except Exception:  # any malformed field: not a credential
            return False

    def valid_bytes(self, raw: bytes) -> AccessToken | None:
        """The token serialized in ``raw`` if it is valid, else None."""
        try:
            token = AccessToken.FromString(raw)
        except Exception:
            return None
        return token if self.valid(token) else None


class SwarmAuthorizer(TokenAuthorizerBase):
    """hivemind authorizer for a private swarm: requests and responses carry our credential, signed
    with the identity key; peers' credentials must be signed by the swarm authority."""

    def __init__(self, identity: Identity, credential: Credential):
        if credential.token.public_key != identity.key.get_public_key().to_bytes():
            raise SwarmError(f"credential is for peer {credential.peer_id}, not for identity {identity.path} "
                             f"(peer {identity.peer_id})")
        self.checker = CredentialChecker(credential.authority)
        if not self.checker.valid(credential.token):
            raise SwarmError(f"credential for peer {credential.peer_id} is expired or not signed by its authority")
        super().__init__(identity.key)
        self.credential = credential

    async def get_token(self) -> AccessToken:
        return self.credential.token

    def is_token_valid(self, access_token: AccessToken) -> bool:
        return self.checker.valid(access_token)

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        return False  # credentials are long-lived; re-issue them with `swarm-admit` before they expire
