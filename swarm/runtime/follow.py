"""Moved to ``swarm.churn`` (``follower``, ``adoption``, ``state_service``); these names stay importable."""
from swarm.churn.adoption import ADOPT_WAIT_TTLS, donor_order
from swarm.churn.follower import OBSERVED_KEEP_S, HoldingAdvert, PlanFollower, holds_ranges
from swarm.churn.state_service import (
    BUSY_WAIT_S,
    CONCURRENCY,
    FETCHES,
    FETCHES_PER_PEER,
    REQUESTS,
    REQUESTS_PER_PEER,
    STATE_PROTOCOL,
    state_limits,
)

__all__ = ["ADOPT_WAIT_TTLS", "BUSY_WAIT_S", "CONCURRENCY", "FETCHES", "FETCHES_PER_PEER", "OBSERVED_KEEP_S",
           "REQUESTS", "REQUESTS_PER_PEER", "STATE_PROTOCOL", "HoldingAdvert", "PlanFollower", "donor_order",
           "holds_ranges", "state_limits"]
