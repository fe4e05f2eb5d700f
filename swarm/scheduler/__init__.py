"""OP-Fence scheduler (pure): from the OP-DAG, peer profiles and the bandwidth matrix to a Plan."""
from swarm.scheduler.costs import PeerSpec, PlanSettings, Swarm, Workload, in_flight
from swarm.scheduler.opfence import baseline, schedule
from swarm.scheduler.plan import LinkPlan, Plan, StagePlan, evaluate

__all__ = ["LinkPlan", "PeerSpec", "Plan", "PlanSettings", "StagePlan", "Swarm", "Workload", "baseline", "evaluate",
           "in_flight", "schedule"]
