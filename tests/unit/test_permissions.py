"""Per-host permissions against the names the agent really declares."""

import re
import uuid

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from compute import agent_main
from compute.host_consumer import HostConsumer, HostConsumerSettings
from router import topology_cmd
from router.bus.topology import Topology
from router.permissions import Deployment, grants

# Host names as Nova sees them: short names and FQDNs, dots included.
hosts = st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}", fullmatch=True)
sessions = st.uuids().map(lambda u: u.hex)


def _compute_grants(prefix, host, other):
    d = Deployment(prefix=prefix, hosts=(host, other))
    by_user = {g[0]: g[1:4] for g in grants(d)}
    return by_user[d.compute_user(host)]


@given(hosts, hosts, sessions, st.sampled_from(["evrouter", "p", "a.b"]))
def test_each_agent_session_may_declare_bind_and_read_only_its_own_control_queue(
        host, other, session, prefix):
    """Every control queue an agent of `host` declares (one per session,
    Topology.agent_control_queue) is within host's grants, and no other
    host's ever is, whatever the host names (dots and all)."""
    topo = Topology(prefix=prefix)
    own = topo.agent_control_queue(host, session).name
    for pattern in _compute_grants(prefix, host, other):
        assert re.search(pattern, own), (pattern, own)
        if other != host:
            theirs = topo.agent_control_queue(other, session).name
            assert not re.search(pattern, theirs), (pattern, theirs)


def test_a_control_queue_name_outside_the_session_form_is_refused():
    configure, write, read = _compute_grants("p", "a", "b")
    names = ["p.agent.a.control." + "0" * 31, "p.agent.a.control." + "g" * 32,
             "p.agent.a.control." + uuid.uuid4().hex + ".x",
             "p.agent.a.controlX" + uuid.uuid4().hex]
    for name in names:
        for pattern in (configure, write, read):
            assert not re.search(pattern, name), (pattern, name)
    # the name agents declared before one queue per session: still allowed,
    # so the permissions can be applied before the agents are upgraded
    assert all(re.search(p, "p.agent.a.control") for p in (configure, write, read))


@given(prefix=st.from_regex(r"[a-z][a-z0-9.-]{0,12}", fullmatch=True), host=hosts)
def test_the_bounding_policy_matches_the_dead_letter_queue_and_nothing_else(
        prefix, host):
    import json

    from router.permissions import definitions, plan
    d = Deployment(prefix=prefix, hosts=(host,))
    topo = Topology(prefix=prefix)
    [cmd] = [c for c in plan(d) if c[0] == "set_policy"]
    pattern = re.compile(cmd[4])
    names = [topo.router_queue_name, topo.probation_queue_name,
             topo.host_queue_name(host), topo.dead_letter_exchange_name + "x",
             topo.retry_queue_name(500)]
    assert pattern.match(topo.dead_letter_queue_name)
    assert not [n for n in names if pattern.match(n)]
    assert json.loads(cmd[5])["overflow"] == "drop-head"
    [policy] = definitions(d, "pw")["policies"]
    assert policy["pattern"] == cmd[4] and policy["apply-to"] == "queues"


@given(st.text(st.characters(codec="ascii", categories=("L", "N", "P")),
               min_size=1, max_size=30),
       st.sampled_from(["", "-"]))
def test_every_planned_command_ends_its_options_before_names_and_passwords(
        password, dash):
    """rabbitmqctl parses any argument that begins with '-' as an option: a
    random password starting with one failed add_user in a CI run. Every
    command of every plan has `--` after its options, and nothing after it
    is one of ours."""
    from router.permissions import plan
    from router.permissions_cmd import ctl_args
    d = Deployment(prefix="p", hosts=("a",), x509_hosts=True)
    for args in plan(d, password=dash + password):
        cmd = ctl_args(args)
        assert cmd[0] == args[0]
        end = cmd.index("--")
        options = cmd[1:end]
        assert options[::2] in ([], ["-p"], ["-p", "--apply-to"]), cmd
        assert sorted(map(str, cmd[1:end] + cmd[end + 1:])) == sorted(
            map(str, args[1:]))


# Every name the contract lets a host have (contract.HOST_PATTERN).
contract_hosts = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,40}", fullmatch=True)


@given(contract_hosts, contract_hosts, st.sampled_from(["evrouter", "p", "a.b"]))
def test_a_host_may_bind_the_hosts_exchange_with_its_own_name_only(
        host, other, prefix):
    """The routers publish each host's copies to <prefix>.hosts with the
    host's name as routing key; a compromised host that could bind
    another's name, or a wildcard, would take that host's copies. Its topic
    read permission there admits its own name and nothing else, and the
    key its queue binds with is that name (so the permission is enough)."""
    d = Deployment(prefix=prefix, hosts=(host, other))
    topics = {g[0]: g[4] for g in grants(d)}[d.compute_user(host)]
    [(exchange, write, read)] = topics
    topo = Topology(prefix=prefix)
    assert exchange == topo.hosts_exchange_name
    assert not re.search(write, host), "nobody but the router writes there"
    [key] = [b.routing_key for b in topo.host_queue(host).bindings
             if b.exchange.name == topo.hosts_exchange_name]
    assert key == host and re.search(read, key)
    for theirs in {other, "#", "*", f"{host}.#", f"{host}.*", f"*.{host}",
                   f"#.{host}", host + "x", "x" + host} - {host}:
        assert not re.search(read, theirs), (read, theirs)


@given(contract_hosts)
def test_only_the_router_may_write_the_hosts_exchange(host):
    d = Deployment(hosts=(host,))
    name = Topology().hosts_exchange_name
    writers = {g[0] for g in grants(d) if re.search(g[2], name)}
    assert writers == {d.router_user}


def test_a_host_name_that_could_be_a_wildcard_binding_is_refused():
    for bad in ("a.*", "#", "a.#.b", "a b", "", "-a"):
        try:
            Deployment(hosts=("ok", bad))
        except ValueError as exc:
            assert repr(bad) in str(exc)
        else:
            raise AssertionError(f"{bad!r} was accepted")


@given(contract_hosts, contract_hosts, sessions)
@example("b", "b.events", "0" * 32)
@example("b.events", "b", "0" * 32)
def test_no_host_is_granted_a_name_of_another_host(host, other, session):
    """Every name host `other` owns (its exchange, its queue, its control
    queues) is outside host's grants, whatever the two names are: a host
    named "b.events" once got host b's queue as its own exchange (the
    review). Names the plan refuses are refused, not granted."""
    topo = Topology(prefix="p")
    try:
        grants_of_host = _compute_grants("p", host, other)
    except ValueError as exc:
        assert host.endswith(".events") or other.endswith(".events"), exc
        return
    if host == other:
        return
    theirs = [topo.host_exchange_name(other), topo.host_queue_name(other),
              topo.agent_control_queue(other, session).name]
    for pattern in grants_of_host:
        for name in theirs:
            assert not re.search(pattern, name), (host, other, pattern, name)


@pytest.mark.parametrize("bad", ["a.*", "#", "a.#.b", "a b", "", "-a", "a" * 200])
def test_no_topology_for_a_host_that_cannot_have_one(bad, capsys):
    """A name the routers never route to (`evrouter topology --declare
    --host '#'` made a queue bound to every host's copies), or one whose
    agent control queue passes 255 bytes with the prefix (200 characters:
    the agent's declare failed in every session): refused by the topology
    command, the host consumer and the agent, before anything is made."""
    with pytest.raises(ValueError, match="host name"):
        Topology().for_host(bad)
    assert topology_cmd.main([f"--host={bad}"]) == 2
    assert "--host:" in capsys.readouterr().err
    with pytest.raises(ValueError, match="host name"):
        HostConsumer(HostConsumerSettings(host=bad), lambda *a: None)
    assert agent_main.main([f"--host={bad}", "--libvirt-uri=test:///default"]) == 2
    assert "--host:" in capsys.readouterr().err


@pytest.mark.parametrize("host", ["compute-1.acme.events", "a" * 190, "Cmp_1.example.org."])
def test_a_host_that_can_be_routed_to_has_a_topology(host):
    """Only least-privilege users are refused a name ending in .events
    (its queue would be another host's exchange, for the permissions'
    patterns); the topology, the host consumer and the agent take it."""
    Topology().for_host(host)
    HostConsumer(HostConsumerSettings(host=host), lambda *a: None)
    if host.endswith(".events"):
        with pytest.raises(ValueError, match="may not end in"):
            Deployment(hosts=(host,))
    else:
        Deployment(hosts=(host,))


def test_an_empty_vhost_is_refused_not_printed(capsys):
    from router import permissions_cmd
    assert permissions_cmd.main(["--vhost="]) == 2
    captured = capsys.readouterr()
    assert "--vhost:" in captured.err and "rabbitmqctl" not in captured.out
