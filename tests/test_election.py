"""The election state machine under randomized event orders: no divergent commits, ever; one plan
for everybody once the swarm is connected and quiet."""
import hashlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarm.election import Ballot, Commit, ComputePlan, Election, ElectionSettings, PeerState, Publish

FAST = ElectionSettings(join_batch_s=2.0, min_epoch_s=3.0, election_timeout_s=5.0)


def plan_hash(epoch: int, members: tuple[str, ...]) -> str:
    return hashlib.sha256(repr((epoch, members)).encode()).hexdigest()[:16]


class Sim:
    """Nodes that see each other's published states through a lossy, partitionable medium."""

    def __init__(self, names, settings=FAST):
        self.now, self.settings = 0.0, settings
        self.nodes = {n: Election(n, settings) for n in names}
        self.published = {n: PeerState() for n in names}
        self.alive = set(names)
        self.group = {n: 0 for n in names}
        self.pending: list[tuple[str, Ballot]] = []   # plans being computed
        self.commits: dict[str, list[Ballot]] = {n: [] for n in names}

    def join(self, name, group=0):
        self.nodes[name] = Election(name, self.settings)
        self.published[name], self.group[name], self.commits[name] = PeerState(), group, []
        self.alive.add(name)

    def kill(self, name):
        self.alive.discard(name)

    def run(self, commands, name):
        for c in commands:
            if isinstance(c, ComputePlan):
                self.pending.append((name, Ballot(c.epoch, plan_hash(c.epoch, c.members), name, c.members)))
            elif isinstance(c, Publish):
                self.published[name] = c.state
            elif isinstance(c, Commit):
                self.commits[name].append(c.ballot)

    def observe(self, name, hidden=frozenset()):
        if name not in self.alive:
            return
        visible = {p: self.published[p] for p in self.alive if self.group[p] == self.group[name] and p not in hidden}
        self.run(self.nodes[name].observe(self.now, visible), name)

    def finish_plans(self, keep=()):
        done, self.pending = [x for i, x in enumerate(self.pending) if i not in keep], [x for i, x in enumerate(self.pending) if i in keep]
        for name, ballot in done:
            if name in self.alive:
                self.run(self.nodes[name].proposed(ballot), name)

    def settle(self, rounds=200):
        for _ in range(rounds):
            self.now += 1.0
            for name in sorted(self.alive):
                self.observe(name)
            self.finish_plans()

    def check_safety(self):
        by_epoch = {}
        for name, ballots in self.commits.items():
            epochs = [b.epoch for b in ballots]
            assert epochs == sorted(set(epochs)), f"{name} committed epochs out of order: {epochs}"
            for b in ballots:
                by_epoch.setdefault(b.epoch, set()).add(b)
        for epoch, ballots in by_epoch.items():
            ballots = list(ballots)
            for i, a in enumerate(ballots):
                for b in ballots[i + 1:]:
                    assert not set(a.members) & set(b.members), f"divergent commits in epoch {epoch}: {a} / {b}"

    def agreed(self):
        last = {n: self.nodes[n].committed for n in self.alive}
        ballots = set(last.values())
        return len(ballots) == 1 and None not in ballots and set(next(iter(ballots)).members) == self.alive


def test_staggered_joins_end_in_one_plan():
    sim = Sim(["n3"])
    for k, name in enumerate(["n5", "n1", "n7", "n2", "n8", "n4", "n6"]):
        sim.settle(rounds=3 + k % 3)
        sim.join(name)
    sim.settle(60)
    sim.check_safety()
    assert sim.agreed() and len(sim.nodes["n1"].committed.members) == 8


def test_first_plan_waits_for_min_members():
    sim = Sim(["n2", "n4"], ElectionSettings(join_batch_s=2.0, min_epoch_s=3.0, election_timeout_s=5.0, min_members=3))
    sim.settle(20)
    assert all(node.committed is None and node.asked is None for node in sim.nodes.values())
    sim.join("n3")
    sim.settle(20)
    sim.check_safety()
    assert sim.agreed() and len(sim.nodes["n2"].committed.members) == 3


def test_dead_member_is_dropped_in_a_new_epoch():
    sim = Sim([f"n{i}" for i in range(5)])
    sim.settle(30)
    assert sim.agreed()
    before = sim.nodes["n1"].committed.epoch
    sim.kill("n0")   # the leader dies
    sim.settle(30)
    sim.check_safety()
    assert sim.agreed() and sim.nodes["n1"].committed.epoch > before and "n0" not in sim.nodes["n1"].committed.members


def test_member_dying_mid_election():
    sim = Sim([f"n{i}" for i in range(4)])
    sim.now += 5
    for name in sorted(sim.alive):
        sim.observe(name)
    sim.finish_plans()
    sim.observe("n2")     # n2 votes, then dies before anyone sees unanimity
    sim.kill("n3")
    sim.settle(40)
    sim.check_safety()
    assert sim.agreed() and set(sim.nodes["n0"].committed.members) == {"n0", "n1", "n2"}


def test_two_groups_that_meet_converge_to_one_plan():
    sim = Sim(["a1", "a2", "a3"])
    for name in ["b1", "b2", "b3", "b4"]:
        sim.join(name, group=1)
    sim.settle(30)
    sim.check_safety()
    assert sim.nodes["a1"].committed != sim.nodes["b1"].committed   # two swarms, two plans
    for name in sim.group:
        sim.group[name] = 0   # the networks get connected
    sim.settle(40)
    sim.check_safety()
    assert sim.agreed()


events = st.lists(st.tuples(st.sampled_from(["observe", "observe", "observe", "tick", "plans", "kill", "join",
                                             "split", "heal"]),
                            st.integers(0, 9), st.frozensets(st.integers(0, 9), max_size=4)),
                  min_size=5, max_size=120)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events)
def test_random_event_orders_never_commit_divergent_plans(evts):
    names = [f"p{i}" for i in range(10)]
    sim = Sim(names[:4])
    for kind, k, others in evts:
        name = names[k]
        if kind == "observe" and name in sim.nodes:
            sim.observe(name, hidden={names[o] for o in others})   # an incomplete, possibly stale view
        elif kind == "tick":
            sim.now += k / 2
        elif kind == "plans":
            sim.finish_plans(keep=set(others))                     # some plans are still computing
        elif kind == "kill" and len(sim.alive) > 1:
            sim.kill(name)
        elif kind == "join" and name not in sim.nodes:
            sim.join(name, group=k % 2)
        elif kind == "split":
            for o in others:
                if names[o] in sim.group:
                    sim.group[names[o]] = 1 - sim.group[names[o]]
        elif kind == "heal":
            for n in sim.group:
                sim.group[n] = 0
        sim.check_safety()
    for n in sim.group:   # then the network heals and goes quiet: everyone must agree
        sim.group[n] = 0
    sim.settle(80)
    sim.check_safety()
    assert sim.agreed(), {n: sim.nodes[n].committed for n in sim.alive}


def test_two_leaders_with_partial_views_cannot_both_commit():
    sim = Sim([f"n{i}" for i in range(5)])
    views = {"n0": {"n3", "n4"}, "n1": {"n0"}, "n2": set(), "n3": {"n0"}, "n4": {"n0"}}   # hidden peers
    for _ in range(6):   # both n0 and n1 think they lead: two ballots for epoch 1 that share n1 and n2
        sim.now += 1.0
        for name in sorted(views):
            sim.observe(name, hidden=views[name])
        sim.finish_plans()
        sim.check_safety()
    proposers = {sim.published[n].ballot.proposer for n in ("n0", "n1") if sim.published[n].ballot}
    assert proposers == {"n0", "n1"}
    assert not any(sim.commits.values())   # neither ballot has all its members' votes
    sim.settle(40)
    sim.check_safety()
    assert sim.agreed()
