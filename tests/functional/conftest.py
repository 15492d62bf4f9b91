"""Fixtures shared by the functional suites (the broker ones are in tests/conftest.py)."""

import pytest

from tests.functional.waiter_harness import HostEvents, Publisher


@pytest.fixture
def publisher(bus):
    """Publishes to the test's bus the way other services do; closed afterwards."""
    p = Publisher(bus)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def host(bus):
    """A test host's registry fed by its running HostConsumer, with the
    central topology declared (the dead-letter queue, as the router does)."""
    bus.declare_central()
    h = HostEvents(bus)
    try:
        yield h
    finally:
        h.stop()
