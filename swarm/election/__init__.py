"""Coordinator-free election of the plan (pure state machine; the node feeds it DHT observations)."""
from swarm.election.machine import Ballot, Commit, ComputePlan, Election, ElectionSettings, Ignored, PeerState, Publish, rank

__all__ = ["Ballot", "Commit", "ComputePlan", "Election", "ElectionSettings", "Ignored", "PeerState", "Publish", "rank"]
