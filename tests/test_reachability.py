"""Reachability and cut links (docs/nat.md): the dial-back protocol, link paths, what a record may
say about them, the daemon options a config gives, and how planning and liveness treat a link one end
cannot reach."""
import asyncio
import time
from types import SimpleNamespace

import pytest
from hivemind.p2p import P2P, PeerID

from swarm.config import NetworkConfig, validate
from swarm.election import Ballot, Commit, ComputePlan, Election, ElectionSettings, PeerState
from swarm.errors import SwarmError
from swarm.liveness import MIN_FAILURES, Liveness, agreed_gone
from swarm.net.membership import MemberRecord, MembershipView
from swarm.net.reach import (
    ReachHelper,
    ask,
    link_paths,
    listen_ports,
    observed_host,
    reachability,
)
from swarm.net.records import CUT_BPS, DEFAULT_BANDWIDTH_BPS, RELAY_SUSTAINED_BPS, RELAYED_BPS, check_record
from swarm.node.setup import daemon_options
from swarm.planning import cut_links, unmeasured_links


def record(peer: str, **fields) -> MemberRecord:
    return MemberRecord(peer, [], "cpu", "test", 1.0, 1 << 30, {"swarm": "0"}, time.time(), time.time(), **fields)


def test_a_peer_whose_pings_fail_twice_in_a_row_is_unreachable_and_retried_at_once():
    live = Liveness(ttl_s=30.0, me="me")
    live.observe(["me", "b"], 0.0)
    live.pinged("b", 0.0)
    live.answered("b", 0.1)
    assert live.due(["b"], 5.0) == [] and live.due(["b"], 10.0) == ["b"]   # every ttl / 3 while it answers
    live.pinged("b", 10.0)
    live.failed("b", 15.0)
    assert live.timeout_s == 5.0 and live.due(["b"], 15.0) == ["b"]          # after a failure: again at once
    assert live.unreachable() == []
    for _ in range(MIN_FAILURES - 1):
        live.failed("b", 20.0)
    assert live.unreachable() == ["b"] and not live.gone("b", 20.0)          # unreachable within ~20 s, not yet gone
    live.answered("b", 21.0)
    assert live.unreachable() == []


def test_a_peer_cut_off_from_one_member_stays_in_every_view_and_a_dead_one_leaves_all():
    # x and y cannot reach each other, z reaches both: x keeps y (z vouches), so all views agree
    assert agreed_gone({"y"}, "x", {"x": ["y"], "y": ["x"], "z": None}) == set()
    # nobody reaches the dead one: gone for everyone, this node's own (stale) record notwithstanding
    assert agreed_gone({"dead"}, "x", {"x": None, "y": ["dead"], "z": ["dead"], "dead": None}) == {"dead"}
    assert agreed_gone({"dead"}, "x", {"x": None, "dead": None}) == {"dead"}   # two members: this node decides
    assert agreed_gone({"dead"}, "x", {"x": None, "y": None, "z": ["dead"], "dead": None}) == {"dead"}   # 2 of 3 say so


def test_a_cut_link_is_priced_as_cut_and_the_plan_links_that_are_cut_are_named():
    view = MembershipView({"a": record("a", unreachable=["b"], bandwidth_bps={"b": 1e9, "c": 1e9}),
                           "b": record("b", bandwidth_bps={"a": 1e9}), "c": record("c")}, time.time())
    assert view.cut("a", "b") and view.cut("b", "a") and not view.cut("a", "c")
    assert view.bandwidth("a", "b") == CUT_BPS and view.bandwidth("b", "a") == CUT_BPS and view.bandwidth("a", "c") == 1e9
    plan = SimpleNamespace(stages=[SimpleNamespace(peers=("a",)), SimpleNamespace(peers=("b", "c"))])
    assert cut_links(plan, view) == [("a", "b")]
    assert cut_links(SimpleNamespace(stages=[SimpleNamespace(peers=("a", "c")), SimpleNamespace(peers=("b",))]),
                     view) == [("a", "b")]
    assert cut_links(SimpleNamespace(stages=[SimpleNamespace(peers=("b",)), SimpleNamespace(peers=("c",)),
                                             SimpleNamespace(peers=("a",))]), view) == []   # a and b are no neighbours
    assert cut_links(None, view) == []


def test_an_unmeasured_relayed_link_is_priced_as_relayed_and_a_measured_one_as_measured():
    view = MembershipView({"a": record("a", paths={"b": "relayed", "c": "direct"}), "b": record("b"),
                           "c": record("c", bandwidth_bps={"b": 50e6})}, time.time())
    assert view.relayed("a", "b") and view.relayed("b", "a") and not view.relayed("a", "c")
    assert view.bandwidth("a", "b") == RELAYED_BPS < DEFAULT_BANDWIDTH_BPS   # a guess, capped: it runs through a relay
    assert view.bandwidth("a", "c") == 50e6    # a direct guess: c's own measured access link
    assert view.bandwidth("b", "c") == 50e6    # measured over the path in use: the measurement holds


def test_a_measured_relayed_link_is_priced_at_most_what_the_relay_sustains():
    fast = record("a", paths={"b": "relayed"}, bandwidth_bps={"b": 47e6})     # a burst over the relay: 47 Mbit/s
    view = MembershipView({"a": fast, "b": record("b", bandwidth_bps={"a": 60e6})}, time.time())
    assert view.bandwidth("a", "b") == RELAY_SUSTAINED_BPS < 47e6    # 4 GiB per 30 min: the relay resets faster links
    slow = MembershipView({"a": record("a", paths={"b": "relayed"}, bandwidth_bps={"b": 8e6}), "b": record("b")},
                          time.time())
    assert slow.bandwidth("a", "b") == 8e6      # slower than the cap: the measurement holds
    direct = MembershipView({"a": record("a", paths={"b": "direct"}, bandwidth_bps={"b": 47e6}), "b": record("b")},
                            time.time())
    assert direct.bandwidth("a", "b") == 47e6
    assert 19e6 < RELAY_SUSTAINED_BPS < 19.2e6


def test_a_cut_link_starts_an_election_at_once_however_young_the_epoch():
    settings = ElectionSettings(join_batch_s=0.0, min_epoch_s=3600.0, election_timeout_s=30.0)
    e = Election("a", settings)
    ballot = Ballot(1, "h1", "a", ("a", "b"))
    e.committed, e.committed_at, e.vote = ballot, 100.0, ballot.key
    peers = {"b": PeerState(None, ballot.key, ballot.key)}
    assert not [c for c in e.observe(101.0, peers) if isinstance(c, ComputePlan)]
    e.report_cut()
    asked = [c for c in e.observe(102.0, peers) if isinstance(c, ComputePlan)]
    assert asked and asked[0].epoch == 2 and e.reason == "a planned link is cut"
    assert not isinstance(asked[0], Commit)


def test_the_first_plan_waits_for_unmeasured_links_but_not_past_the_probe_wait():
    view = MembershipView({"a": record("a", bandwidth_bps={"b": 1e9}), "b": record("b"), "c": record("c", unreachable=["a"])},
                          time.time())
    assert unmeasured_links(view) == [("b", "c")]   # a-b measured, a-c found cut: only b-c is unknown
    settings = ElectionSettings(join_batch_s=5.0, min_epoch_s=60.0, election_timeout_s=30.0, probe_wait_s=20.0)

    def first_plan(unmeasured: bool, now: float) -> bool:
        e = Election("a", settings)
        e.report_unmeasured(unmeasured)
        e.observe(0.0, {"b": PeerState()})
        return any(isinstance(c, ComputePlan) for c in e.observe(now, {"b": PeerState()}))
    assert first_plan(False, 6.0) and not first_plan(True, 6.0)   # measured: at the join batch; else it waits ...
    assert not first_plan(True, 24.0) and first_plan(True, 26.0)  # ... join_batch_s + probe_wait_s at most


def test_records_say_reachability_and_paths_within_bounds():
    assert check_record(record("a", reachability="relayed", paths={"b": "direct"}, unreachable=["c"])) is None
    assert check_record(record("a", reachability="behind a wall")) == "reachability 'behind a wall' unknown"
    assert check_record(record("a", paths={"b": "carrier pigeon"})) == "path 'carrier pigeon' unknown"
    assert check_record(record("a", unreachable=[f"p{i}" for i in range(9)])) == "unreachable has more than 8 entries"
    wire = record("a", paths={f"p{i}": "direct" for i in range(40)}, unreachable=[f"p{i}" for i in range(20)]).to_wire()
    assert len(wire["paths"]) == 32 and len(wire["unreachable"]) == 8   # our own record is cut to the caps


def test_addresses_ports_and_paths():
    assert listen_ports(["/ip4/1.2.3.4/tcp/31337/p2p/Qm", "/ip4/1.2.3.4/udp/5/quic", "/ip6/::1/tcp/31337",
                         "/ip4/9.9.9.9/tcp/4001/p2p/R/p2p-circuit/p2p/Qm", "/ip4/1.2.3.4/tcp/7"]) == [31337, 7]
    assert observed_host("/ip4/11.77.0.2/tcp/4001") == ("11.77.0.2", 4001)
    assert observed_host("/ip4/11.77.0.10/tcp/4001/p2p/R/p2p-circuit") is None
    a, b = PeerID.from_base58("QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"), \
        PeerID.from_base58("QmfQ9hBWDnm3TnUPtGZpRuF1oS5bjDPAyN4uKdN4UTVpcE")
    infos = [SimpleNamespace(peer_id=a, addrs=["/ip4/11.77.0.10/tcp/4001/p2p/R/p2p-circuit"]),
             SimpleNamespace(peer_id=b, addrs=["/ip4/11.77.0.10/tcp/4001/p2p/R/p2p-circuit", "/ip4/11.77.0.3/tcp/4001"])]
    paths = link_paths(infos)
    assert paths == {a.to_base58(): "relayed", b.to_base58(): "direct"}
    assert reachability(None, paths, [a.to_base58()]) is None
    assert reachability(True, paths, [a.to_base58()]) == "public"
    assert reachability(False, paths, [b.to_base58()]) == "nat"
    assert reachability(False, paths, [a.to_base58(), b.to_base58()]) == "relayed"


def test_the_config_turns_into_daemon_options_and_limits():
    net = validate(NetworkConfig, {"relay": {"data_limit_mb": 64, "time_limit_s": 600, "max_circuits": 4}}, "t")
    boot = "/ip4/11.77.0.10/tcp/4001/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"
    options, flags = daemon_options(net, [boot])
    assert options["use_auto_relay"] and options["trusted_relays"] == [boot] and options["auto_nat"]
    assert options["force_reachability"] is None and options["use_relay"]
    assert flags == {"relayService": True, "relayDiscovery": False, "relayDataLimit": 64 << 20,
                     "relayTimeLimit": "600s", "relayMaxCircuits": 4}
    options, flags = daemon_options(validate(NetworkConfig, {"reachability": "public", "hole_punching": False,
                                                             "relay": {"use": False, "serve": False}}, "t"), [boot])
    assert not options["use_auto_relay"] and not options["auto_nat"] and options["force_reachability"] == "public"
    assert not flags["relayService"]
    options, _ = daemon_options(net, [])   # no initial peers: no relays to reserve on
    assert not options["use_auto_relay"] and options["trusted_relays"] is None
    with pytest.raises(SwarmError, match="network.relay.peers: '/ip4/1.2.3.4/tcp/1' lacks /p2p/<peer id>"):
        daemon_options(validate(NetworkConfig, {"relay": {"peers": ["/ip4/1.2.3.4/tcp/1"]}}, "t"), [boot])
    with pytest.raises(SwarmError, match="reachability"):
        validate(NetworkConfig, {"reachability": "maybe"}, "t")


def test_a_dial_back_reaches_a_listening_node_and_not_a_closed_port():
    async def main():
        helper = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        asker = await P2P.create(initial_peers=[str(a) for a in await helper.get_visible_maddrs()],
                                 host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        try:
            served = ReachHelper(helper)
            await served.serve()
            ports = listen_ports([str(a) for a in await asker.get_visible_maddrs()])
            answer = await ask(asker, helper.peer_id.to_base58(), ports)
            assert answer.public and set(ports) <= set(answer.open) and answer.observed.startswith("127.0.0.1:")
            closed = await ask(asker, helper.peer_id.to_base58(), [1])   # nothing listens on port 1
            assert 1 not in closed.open and served.answered == 2
        finally:
            await asker.shutdown()
            await helper.shutdown()
    asyncio.run(main())
