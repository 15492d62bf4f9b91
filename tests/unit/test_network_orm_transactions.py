"""ORM hooks: only what committed publishes (issue 11, item 5).

A Session closed without a commit, a scoped session removed, a rolled-back
SAVEPOINT: none of them publishes, and nothing of theirs leaks into the next
commit of the same Session.
"""

import pytest

sqlalchemy = pytest.importorskip("sqlalchemy")

from sqlalchemy import create_engine  # noqa: E402
from sqlalchemy.orm import Session, scoped_session, sessionmaker  # noqa: E402

from network import orm  # noqa: E402
from tests.unit.test_network_orm import Base, Port, ev, new_port  # noqa: E402


@pytest.fixture
def engine():
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([new_port("DOWN"), new_port("DOWN", id="port-2")])
        session.commit()
    yield engine
    engine.dispose()


@pytest.fixture
def published():
    events = []
    hooks = orm.attach(Port, events.append,
                       columns=orm.PortColumns(fixed_ips="fixed_ips"))
    yield events
    hooks.detach()


def status_of(engine, port_id="port-1"):
    with Session(engine) as session:
        return session.get(Port, port_id).status


def test_close_without_commit_publishes_nothing_then_or_later(engine, published):
    session = Session(engine)
    session.get(Port, "port-1").status = "ACTIVE"
    session.flush()
    session.close()
    # The same Session, used again: its next commit is about another row.
    session.get(Port, "port-2").host = "compute-2"
    session.commit()
    assert published == []
    assert status_of(engine) == "DOWN"


def test_a_with_block_left_uncommitted_publishes_nothing(engine, published):
    session = Session(engine)
    with session:
        session.get(Port, "port-1").status = "ACTIVE"
        session.flush()
    with session.begin():
        session.get(Port, "port-2").host = "compute-2"
    assert published == []


def test_scoped_session_remove_publishes_nothing(engine, published):
    Scoped = scoped_session(sessionmaker(engine))
    Scoped.get(Port, "port-1").status = "ACTIVE"
    Scoped.flush()
    Scoped.remove()
    Scoped.get(Port, "port-2").host = "compute-2"
    Scoped.commit()
    Scoped.remove()
    assert published == []
    assert status_of(engine) == "DOWN"


def test_a_rolled_back_savepoint_publishes_nothing(engine, published):
    session = Session(engine)
    savepoint = session.begin_nested()
    session.get(Port, "port-1").status = "ACTIVE"
    session.flush()
    savepoint.rollback()
    session.commit()
    assert published == []
    assert status_of(engine) == "DOWN"


def test_a_rolled_back_savepoint_keeps_the_events_around_it(engine, published):
    session = Session(engine)
    session.get(Port, "port-1").status = "ACTIVE"
    session.flush()
    savepoint = session.begin_nested()
    session.get(Port, "port-2").status = "ACTIVE"
    session.flush()
    savepoint.rollback()
    session.commit()
    assert published == [ev("network-vif-plugged")]
    assert status_of(engine, "port-2") == "DOWN"


def test_a_released_savepoint_inside_a_rolled_back_one_publishes_nothing(
        engine, published):
    session = Session(engine)
    outer = session.begin_nested()
    with session.begin_nested():
        session.get(Port, "port-1").status = "ACTIVE"
    outer.rollback()
    session.commit()
    assert published == []


def test_released_savepoints_publish_with_the_commit(engine, published):
    session = Session(engine)
    with session.begin_nested():
        with session.begin_nested():
            session.get(Port, "port-1").status = "ACTIVE"
        session.get(Port, "port-2").status = "ACTIVE"
    assert published == []
    session.commit()
    assert published == [ev("network-vif-plugged"),
                         ev("network-vif-plugged", tag="port-2")]


def test_a_rollback_then_another_change_is_judged_afresh(engine, published):
    session = Session(engine)
    session.get(Port, "port-1").status = "ACTIVE"     # never flushed
    session.rollback()
    session.get(Port, "port-1").host = "compute-2"
    session.commit()
    assert published == []


def test_the_committed_state_still_publishes_after_an_abandoned_one(
        engine, published):
    session = Session(engine)
    session.get(Port, "port-1").status = "ACTIVE"
    session.flush()
    session.close()
    session.get(Port, "port-1").status = "ERROR"
    session.commit()
    assert published == [ev("network-vif-plugged", "failed")]


def test_a_status_refreshed_away_before_the_flush_is_not_published(
        engine, published):
    session = Session(engine)
    port = session.get(Port, "port-1")
    port.status = "ACTIVE"
    session.refresh(port)           # back to what the database holds: DOWN
    port.host = "compute-2"
    session.commit()
    assert published == []
