"""Fixtures shared by the functional suites (the broker ones are in tests/conftest.py)."""

import pytest

from tests.functional.waiter_harness import Publisher


@pytest.fixture
def publisher(bus):
    """Publishes to the test's bus the way other services do; closed afterwards."""
    p = Publisher(bus)
    try:
        yield p
    finally:
        p.close()
