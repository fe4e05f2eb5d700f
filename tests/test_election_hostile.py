"""The election as nodes run it (rotating proposers, an epoch window) among honest and hostile members:
the scenarios of test_election.py still end in one plan, and a hostile member can neither hijack nor
stall the swarm (docs/election.md, "A hostile member")."""
from hypothesis import HealthCheck, given, settings

from swarm.election import Ballot, Election, ElectionSettings, Ignored, PeerState, rank
from tests.test_election import Sim, events, plan_hash

ROTATING = ElectionSettings(join_batch_s=2.0, min_epoch_s=3.0, election_timeout_s=5.0, leader="rotating", epoch_window=64)


class HostileSim(Sim):
    """A simulation where some published states belong to no honest node: the test writes them."""

    def __init__(self, names, settings=ROTATING):
        super().__init__(names, settings)
        self.ignored: list[Ignored] = []

    def add_hostile(self, name: str, state: PeerState = PeerState()) -> None:
        self.published[name], self.group[name] = state, 0
        self.alive.add(name)

    def observe(self, name, hidden=frozenset()):
        if name in self.nodes:
            super().observe(name, hidden)

    def run(self, commands, name):
        self.ignored += [c for c in commands if isinstance(c, Ignored)]
        super().run(commands, name)

    def honest_agreed(self, without=()):
        honest = [n for n in self.alive if n in self.nodes]
        last = {self.nodes[n].committed for n in honest}
        return len(last) == 1 and None not in last and set(next(iter(last)).members) == set(honest) - set(without)

    def settle_until(self, predicate, rounds=120):
        for _ in range(rounds):
            self.settle(1)
            if predicate():
                return True
        return False


def test_the_scenarios_of_the_plain_election_end_in_one_plan_with_rotating_proposers():
    sim = HostileSim(["n3"])
    for k, name in enumerate(["n5", "n1", "n7", "n2", "n8", "n4", "n6"]):
        sim.settle(rounds=3 + k % 3)
        sim.join(name)
    sim.settle(60)
    sim.check_safety()
    assert sim.agreed() and len(sim.nodes["n1"].committed.members) == 8

    before = sim.nodes["n1"].committed
    leader = sim.nodes["n1"]._leader(before.epoch + 1, sim.published, sim.nodes["n1"]._running(sim.published))
    sim.kill(leader)   # the next epoch's rightful proposer dies: the one after it takes over
    sim.settle(40)
    sim.check_safety()
    survivor = sorted(sim.alive)[0]
    assert sim.agreed() and leader not in sim.nodes[survivor].committed.members

    groups = HostileSim(["a1", "a2", "a3"])
    for name in ["b1", "b2", "b3", "b4"]:
        groups.join(name, group=1)
    groups.settle(30)
    assert groups.nodes["a1"].committed != groups.nodes["b1"].committed
    for name in groups.group:
        groups.group[name] = 0
    groups.settle(60)
    groups.check_safety()
    assert groups.agreed()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events)
def test_random_event_orders_never_commit_divergent_plans_with_rotating_proposers(evts):
    names = [f"p{i}" for i in range(10)]
    sim = Sim(names[:4], ROTATING)
    for kind, k, others in evts:
        name = names[k]
        if kind == "observe" and name in sim.nodes:
            sim.observe(name, hidden={names[o] for o in others})
        elif kind == "tick":
            sim.now += k / 2
        elif kind == "plans":
            sim.finish_plans(keep=set(others))
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
    for n in sim.group:
        sim.group[n] = 0
    sim.settle(120)
    sim.check_safety()
    assert sim.agreed(), {n: sim.nodes[n].committed for n in sim.alive}


def test_a_hijack_ballot_far_above_the_swarms_epoch_is_ignored_and_named():
    sim = HostileSim([f"n{i}" for i in range(4)])
    sim.settle(20)
    assert sim.agreed()
    epoch = sim.nodes["n0"].committed.epoch
    everyone = tuple(sorted([*sim.nodes, "x"]))
    hijack = Ballot(10**12, "evil", "x", everyone)
    sim.add_hostile("x", PeerState(hijack, hijack.key, (10**12 - 1, "older-evil")))
    sim.settle(40)
    sim.check_safety()
    assert all(b.epoch < 10**6 and b.plan_hash != "evil" for c in sim.commits.values() for b in c)
    assert {i.peer for i in sim.ignored} == {"x"} and "10000000000" in sim.ignored[0].what
    # x is live but never votes for an honest ballot: the swarm commits without it, one epoch at a time
    assert sim.honest_agreed(without={"x"}) and sim.nodes["n0"].committed.epoch < epoch + 64


def test_a_ballot_from_anyone_but_the_rightful_proposer_gets_no_vote():
    sim = HostileSim([f"n{i}" for i in range(4)])
    sim.settle(20)
    committed = sim.nodes["n0"].committed
    x_ballot = Ballot(committed.epoch + 1, "evil", "x", tuple(sorted([*sim.nodes, "x"])))
    sim.add_hostile("x", PeerState(x_ballot, x_ballot.key, committed.key))
    for _ in range(3):
        sim.now += 1.0
        for name in sorted(sim.nodes):
            sim.observe(name)
    assert not any(sim.nodes[n].vote == x_ballot.key for n in sim.nodes)   # a valid epoch, the wrong proposer
    assert sim.settle_until(lambda: sim.honest_agreed(without={"x"}))
    assert all(b.plan_hash != "evil" for c in sim.commits.values() for b in c)


def test_a_stranger_cannot_make_everyone_join_a_plan_that_names_only_itself():
    sim = HostileSim([f"n{i}" for i in range(3)])
    sim.settle(20)
    mine = sim.nodes["n0"].committed
    alone = Ballot(mine.epoch + 1, "alone", "x", ("x",))
    sim.add_hostile("x", PeerState(alone, alone.key, alone.key))
    sim.settle(10)
    assert all(sim.nodes[n].committed.plan_hash != "alone" for n in sim.nodes)


def test_a_rightful_proposer_that_never_proposes_only_delays_the_election():
    sim = HostileSim(["n0", "n1", "n2", "n3"])
    sim.settle(20)
    assert sim.agreed()
    committed = sim.nodes["n0"].committed
    running = sim.nodes["n0"]._running(sim.published)
    silent = sim.nodes["n0"]._leader(committed.epoch + 1, sim.published, running)
    sim.nodes.pop(silent)   # alive and publishing its old state, but it never proposes nor votes again
    sim.add_hostile(silent, sim.published[silent])
    sim.kill(next(n for n in sorted(sim.nodes) if n != silent))   # an election is needed now
    assert sim.settle_until(lambda: sim.honest_agreed(without={silent}), rounds=60)
    survivor = min(n for n in sim.alive if n in sim.nodes)
    assert sim.nodes[survivor].committed.epoch > committed.epoch + 1   # the silent one's epoch passed


def test_a_peer_id_chosen_after_a_commit_cannot_lead_the_next_epoch():
    sim = HostileSim([f"n{i}" for i in range(4)])
    sim.settle(20)
    committed = sim.nodes["n0"].committed
    # a joiner grinds an id that ranks first for the next epoch of the current plan ...
    ground = next(f"g{i}" for i in range(10_000)
                  if all(rank(f"g{i}", committed.epoch + 1, committed.plan_hash) < rank(n, committed.epoch + 1, committed.plan_hash)
                         for n in sim.nodes))
    sim.join(ground)
    sim.settle(1)
    node = sim.nodes["n0"]
    # ... but only members of the running plan may lead: the joiner commits that plan as an outsider
    assert node._leader(committed.epoch + 1, sim.published, node._running(sim.published)) != ground
    sim.settle(30)
    sim.check_safety()
    assert sim.agreed() and ground in sim.nodes["n0"].committed.members


def test_the_plain_rules_are_unchanged_by_default():
    node = Election("n1")
    assert node.settings.leader == "smallest" and node.settings.epoch_window is None
    far = Ballot(10**12, plan_hash(10**12, ("n0", "n1")), "n0", ("n0", "n1"))
    node.observe(0.0, {"n0": PeerState(far, far.key)})
    assert node.vote == far.key   # no window: the plain machine believes any epoch (nodes run the hardened one)


def test_a_stranger_claiming_a_commit_in_a_new_swarm_neither_leads_nor_moves_the_epoch():
    sim = HostileSim([f"n{i}" for i in range(3)])
    fake = Ballot(10**9, "fake", "x", ("x",))
    sim.add_hostile("x", PeerState(fake, fake.key, fake.key))   # before any honest commit
    assert sim.settle_until(lambda: all(sim.nodes[n].committed for n in sim.nodes), rounds=40)
    sim.check_safety()
    assert all(sim.nodes[n].committed.epoch < 64 and sim.nodes[n].committed.plan_hash != "fake" for n in sim.nodes)
    assert {i.peer for i in sim.ignored} == {"x"}
