"""Errors that say whose fault a failure is (h11's local/remote split, plus the transient case).

- ``ConfigError``: this node's own input is wrong (config file, CLI flag, model spec). Nothing a retry
  fixes; the CLI prints ``error: <one line>`` and exits with code 2.
- ``RemoteProtocolError``: a peer broke the protocol (malformed or oversized frame, a tensor that is
  not the boundary's, a stranger, NaN/Inf). The request is refused and the peer may be banned; a
  retry on the *same* peer is pointless, another replica may do.
- ``PeerUnavailable``: a peer could not be reached or is busy (dial failure, time-out, stage busy,
  a step it has not reached yet). Retrying later, or on another replica, may succeed.

All three are ``SwarmError``, which the CLI turns into one line and exit 2 when nothing handled it.
Code that retries catches ``PeerUnavailable`` only.
"""


class SwarmError(Exception):
    """A problem caused by input (config, flag, model, peer message) or the swarm, not a bug here."""


class ConfigError(SwarmError):
    """This node's own configuration or input is wrong: exit 2, never retried."""


class RemoteProtocolError(SwarmError):
    """A peer sent what no honest peer of this plan sends: refused (and the peer possibly banned)."""


class PeerUnavailable(SwarmError):
    """A peer is unreachable, busy or not there yet: another attempt (later, elsewhere) may succeed."""


class Poisoned(RemoteProtocolError):
    """A peer sent tensors with NaN or Inf: refused, and the peer banned for a while."""
