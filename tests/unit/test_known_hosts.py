"""KnownHosts: whether a host's exchange exists, cached, with a budget on
the broker round trips a sender's host hints can make the routing loop do
(hostile review 2, R3: 200 distinct unknown hints a second saturated it)."""

import collections

from router.observer import KnownHosts
from tests.unit.clock import Clock


class Broker:
    """The passive declare, counted: host -> exists."""

    def __init__(self, *existing):
        self.existing = set(existing)
        self.asked = collections.Counter()

    def __call__(self, host):
        self.asked[host] += 1
        return host in self.existing


def hosts(broker, clock, **kw):
    kw.setdefault("rate", 10.0)
    return KnownHosts(None, None, clock, stats=collections.Counter(),
                      check=broker, **kw)


def test_a_flood_of_unknown_hints_asks_the_broker_within_the_budget():
    clock, broker = Clock(), Broker("real")
    known = hosts(broker, clock, rate=10.0)
    # 1,000 distinct unknown hints in two seconds, 50 a tick
    for tick in range(20):
        for i in range(50):
            assert known(f"ghost-{tick}-{i}") is False
        clock.now += 0.1
    asked = sum(broker.asked.values())
    assert asked <= 50 + 2 * 10, "a burst of 5 s' budget, then the rate"
    assert known.stats["host_checks"] == asked
    assert known.stats["host_checks_deferred"] == 1000 - asked
    # Under a steady flood the loop is asked at the rate, no more.
    for tick in range(100):
        for i in range(50):
            known(f"more-{tick}-{i}")
        clock.now += 0.1
    assert sum(broker.asked.values()) - asked <= 10 * 10 + 1
    # A deferred host is not remembered as missing: asked once the budget allows.
    clock.now += 1.0
    assert known("ghost-19-49") is False
    assert broker.asked["ghost-19-49"] == 1


def test_a_hit_is_not_charged_and_never_asks_again_within_its_ttl():
    clock, broker = Clock(), Broker("real")
    known = hosts(broker, clock, rate=1.0)
    assert known("real") is True
    for _ in range(1000):
        assert known("real") is True
        clock.now += 0.01
    assert broker.asked["real"] == 1
    assert known.stats["host_checks_deferred"] == 0


def test_a_missing_host_is_not_asked_again_in_its_events_first_rounds():
    """The retry tiers bring an event back after 0.5, 1, 2, 4, 8, 16, 16... s
    until no_host_timeout (120 s): before, every round asked the broker."""
    clock, broker = Clock(), Broker()
    known = hosts(broker, clock, rate=100.0)
    start = clock.now
    for delay in (0, 0.5, 1, 2, 4, 8) + (16,) * 7:
        clock.now += delay
        if clock.now - start <= 120:
            assert known("ghost") is False
    assert broker.asked["ghost"] <= 7, broker.asked
    assert broker.asked["ghost"] < 12


def test_a_host_whose_exchange_appears_after_its_first_event_is_found_soon():
    clock, broker = Clock(), Broker()
    known = hosts(broker, clock, rate=100.0)
    assert known("late") is False           # its consumer not started yet
    clock.now += 0.5
    assert known("late") is False
    broker.existing.add("late")             # declared 1 s after the event
    clock.now += 1.0
    known("late")
    clock.now += 2.0                        # the round 3.5 s after the event
    assert known("late") is True


def test_an_existing_host_whose_answer_is_due_stays_known_over_budget():
    clock, broker = Clock(), Broker("real")
    known = hosts(broker, clock, rate=1.0)
    assert known("real") is True
    clock.now += 61                         # its positive answer is due again
    for i in range(5):
        assert known(f"ghost-{i}") is False  # the budget spent by a sender
    assert known("real") is True, "known, not asked: no token left"
    assert broker.asked["real"] == 1
    assert known.stats["host_checks_deferred"] == 0
    clock.now += 1
    assert known("real") is True
    assert broker.asked["real"] == 2        # asked once the budget allows


def test_a_host_its_agent_speaks_for_is_checked_at_once_whatever_the_budget():
    clock, broker = Clock(), Broker()
    known = hosts(broker, clock, rate=1.0)
    assert known("new") is False            # missing: remembered for a while
    broker.existing.add("new")              # its consumer declares its exchange
    clock.now += 1
    assert known("new") is False            # still the cached answer
    for i in range(10):                     # a sender spends the budget
        known(f"ghost-{i}")
    assert known.stats["host_checks_deferred"] > 0
    known.seen("new")                       # its agent's lifecycle message
    assert known("new") is True
    assert broker.asked["new"] == 2
    # Owed one check only: speaking again for a known host owes nothing.
    known.seen("new")
    assert not known._owed


def test_a_host_a_delivery_found_gone_is_missing_only_for_a_moment():
    clock, broker = Clock(), Broker("flap")
    known = hosts(broker, clock, rate=10.0)
    assert known("flap") is True
    known.forget("flap")                    # a copy returned, or a 404
    assert known("flap") is False
    clock.now += 0.6
    assert known("flap") is True            # declared again meanwhile
    assert broker.asked["flap"] == 2


def test_the_cache_is_bounded_each_way_and_missing_hosts_never_evict_real_ones():
    clock, broker = Clock(), Broker(*(f"real-{i}" for i in range(50)))
    known = hosts(broker, clock, rate=1e9, max_present=100, max_absent=100)
    for i in range(50):
        assert known(f"real-{i}") is True
    for i in range(10_000):
        known(f"ghost-{i}")
    assert len(known._absent) == 100
    assert "ghost-0" not in known._absent, "the oldest answer goes first"
    assert "ghost-9999" in known._absent
    assert len(known._present) == 50
    asked = sum(broker.asked.values())
    for i in range(50):
        assert known(f"real-{i}") is True
    assert sum(broker.asked.values()) == asked, "real hosts still hit"
    for i in range(200):
        broker.existing.add(f"more-{i}")
        known(f"more-{i}")
    assert len(known._present) == 100
    known._owed.update(f"x-{i}" for i in range(100))
    known.seen("y")
    assert len(known._owed) == 100, "owed checks are bounded too"


def test_a_host_its_agent_spoke_for_is_asked_again_sooner_when_missing():
    """Its consumer may declare its exchange after the agent spoke: such a
    host is the deployment's, not a sender's, and is asked again after 2 s."""
    clock, broker = Clock(), Broker()
    known = hosts(broker, clock, rate=10.0)
    known.seen("late")
    assert known("late") is False           # the owed check: missing
    broker.existing.add("late")
    clock.now += 1.5
    assert known("late") is False
    clock.now += 1.0
    assert known("late") is True
    assert broker.asked["late"] == 2


def test_a_host_found_gone_is_asked_again_every_half_second_while_gone():
    """It existed (a delivery found it gone): the deployment's host, its
    exchange deleted and maybe declared again. Doubled like a made-up
    hint's, one deleted and declared again 3 s later stayed unknown for
    4-8 s more (the chaos test's 2 s resume bound broke on it)."""
    clock, broker = Clock(), Broker("h2")
    known = hosts(broker, clock)
    assert known("h2") is True
    broker.existing.discard("h2")
    known.forget("h2")                  # a copy to it came back 404
    for _ in range(6):                  # 3 s gone, asked every 0.5 s
        assert known("h2") is False
        clock.now += 0.5
    broker.existing.add("h2")           # declared again
    clock.now += 0.5
    assert known("h2") is True, "found within half a second"
