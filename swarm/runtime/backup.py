"""Moved to ``swarm.churn.backup``; these names stay importable."""
from swarm.churn.backup import SnapshotPusher, backups

__all__ = ["SnapshotPusher", "backups"]
