"""OP-Fence scheduler (pure): from the OP-DAG, peer profiles and the bandwidth matrix to a Plan."""
from swarm.scheduler.costs import PeerSpec, PlanSettings, Swarm, Workload, in_flight
from swarm.scheduler.opfence import baseline, best_alone, schedule
from swarm.scheduler.plan import LinkPlan, Plan, StagePlan, evaluate

__all__ = ["LinkPlan", "PeerSpec", "Plan", "PlanSettings", "StagePlan", "Swarm", "Workload", "baseline", "best_alone", "evaluate",
           "in_flight", "schedule"]
