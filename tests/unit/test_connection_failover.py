"""Failover order and dead-peer settings of broker connections (pure)."""

import socket

from router.bus import connection


def test_each_attempt_begins_after_the_host_that_last_worked():
    hosts = ["a", "b", "c"]
    rotation = connection.HostRotation()
    assert rotation.order(hosts) == ["a", "b", "c"]
    rotation.connected(hosts, "a")
    assert rotation.order(hosts) == ["b", "c", "a"]
    rotation.connected(hosts, "c")
    assert rotation.order(hosts) == ["a", "b", "c"]
    # a list that no longer names the remembered host starts from the top
    assert rotation.order(["x", "y"]) == ["x", "y"]


def test_kombu_gets_a_round_robin_over_the_hosts():
    cycle = connection.HostRotation()(["a", "b"])
    assert [next(cycle) for _ in range(5)] == ["a", "b", "a", "b", "a"]


def test_dead_peer_settings_notice_a_silent_broker_in_the_timeout():
    settings = connection.keepalive_settings(2.0)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        assert settings[socket.TCP_USER_TIMEOUT] == 2000
    if hasattr(socket, "TCP_KEEPIDLE"):
        assert settings[socket.TCP_KEEPIDLE] == 1
        assert settings[socket.TCP_KEEPINTVL] == 1
        assert settings[socket.TCP_KEEPCNT] == 2


def test_every_host_of_an_openstack_url_keeps_evrouters_transport():
    url = connection.kombu_url("rabbit://u:p@h1:5672,u:p@h2:5673/vh")
    hosts = url.split(";")
    assert len(hosts) == 2
    assert all(h.startswith("evamqp://") and h.endswith("/vh") for h in hosts)
