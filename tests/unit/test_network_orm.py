"""ORM hooks on a SQLAlchemy Port model (SQLite), publishing into a list."""

import pytest

sqlalchemy = pytest.importorskip("sqlalchemy")

from sqlalchemy import JSON, Column, String, create_engine  # noqa: E402
from sqlalchemy.orm import Session, declarative_base  # noqa: E402

from network import orm, transitions  # noqa: E402
from router.bus.contract import InstanceEvent  # noqa: E402

SERVER = "8d5f3a1e-4c2b-4f6a-9e7d-1a2b3c4d5e6f"
Base = declarative_base()


class Port(Base):
    __tablename__ = "ports"
    id = Column(String(36), primary_key=True)
    device_id = Column(String(255))
    device_owner = Column(String(255))
    status = Column(String(16))
    host = Column(String(255))
    fixed_ips = Column(JSON)


@pytest.fixture
def db():
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    published = []
    hooks = orm.attach(Port, published.append,
                       columns=orm.PortColumns(fixed_ips="fixed_ips"))
    try:
        yield Session(engine), published
    finally:
        hooks.detach()
        engine.dispose()


def new_port(status="DOWN", **kw):
    values = dict(id="port-1", device_id=SERVER, device_owner="compute:nova",
                  status=status, host="compute-1",
                  fixed_ips=[{"subnet_id": "s", "ip_address": "10.0.0.2"}])
    values.update(kw)
    return Port(**values)


def ev(name, status="completed", tag="port-1"):
    return InstanceEvent(name, SERVER, tag, status, "compute-1")


def test_create_down_then_flip_to_active(db):
    session, published = db
    session.add(new_port("DOWN"))
    session.commit()
    assert published == []
    port = session.get(Port, "port-1")
    port.status = "ACTIVE"
    session.commit()
    assert published == [ev("network-vif-plugged")]


def test_created_active_is_plugged_like_from_unset(db):
    session, published = db
    session.add(new_port("ACTIVE"))
    session.commit()
    assert published == [ev("network-vif-plugged")]


def test_error_unplug_and_nothing_for_the_rest(db):
    session, published = db
    session.add(new_port("BUILD"))
    session.commit()
    port = session.get(Port, "port-1")
    port.status = "ERROR"
    session.commit()
    port.status = "DOWN"            # ERROR -> DOWN: nothing
    session.commit()
    port.status = "DOWN"            # DOWN -> DOWN: nothing
    session.commit()
    port.status = "ACTIVE"
    session.commit()
    port.status = "DOWN"
    session.commit()
    assert published == [ev("network-vif-plugged", "failed"),
                         ev("network-vif-plugged"),
                         ev("network-vif-unplugged")]


def test_nothing_before_commit_and_nothing_after_rollback(db):
    session, published = db
    session.add(new_port("DOWN"))
    session.commit()
    port = session.get(Port, "port-1")
    port.status = "ACTIVE"
    session.flush()
    assert published == []
    session.rollback()
    assert published == []
    assert session.get(Port, "port-1").status == "DOWN"
    session.commit()
    assert published == []


def test_a_savepoint_waits_for_the_real_commit(db):
    session, published = db
    session.add(new_port("DOWN"))
    session.commit()
    with session.begin_nested():
        session.get(Port, "port-1").status = "ACTIVE"
    assert published == []
    session.commit()
    assert published == [ev("network-vif-plugged")]


def test_deleted_and_address_change(db):
    session, published = db
    session.add(new_port("ACTIVE"))
    session.commit()
    published.clear()
    port = session.get(Port, "port-1")
    port.fixed_ips = [{"subnet_id": "s", "ip_address": "10.0.0.3"}]
    session.commit()
    assert published == [ev("network-changed")]
    session.delete(port)
    session.commit()
    assert published == [ev("network-changed"), ev("network-vif-deleted")]


def test_ports_of_others_are_ignored(db):
    session, published = db
    session.add_all([new_port("DOWN", id="dhcp", device_owner="network:dhcp"),
                     new_port("DOWN", id="odd", device_id="not-a-uuid")])
    session.commit()
    for port in session.query(Port):
        port.status = "ACTIVE"
    session.commit()
    assert published == []


def test_a_failed_publish_surfaces_from_commit_after_the_commit(db):
    session, _ = db
    engine = session.get_bind()
    failing = orm.attach(Port, _raise)
    try:
        session.add(new_port("ACTIVE", id="port-2"))
        with pytest.raises(RuntimeError, match="spool full"):
            session.commit()
    finally:
        failing.detach()
    assert Session(engine).get(Port, "port-2") is not None


def test_detach_stops_events(db):
    session, published = db
    extra = []
    hooks = orm.attach(Port, extra.append)
    hooks.detach()
    session.add(new_port("ACTIVE"))
    session.commit()
    assert extra == [] and published == [ev("network-vif-plugged")]


def _raise(event):
    raise RuntimeError("spool full")


def test_a_revision_column_becomes_the_events_revision():
    port = new_port("DOWN")
    port.fixed_ips = None
    port.status = "ACTIVE"
    port.rev = 7                # a plain attribute stands in for the column
    view = orm.port_view(port, orm.PortColumns(revision="rev"))
    [event] = transitions.status_changed(view, "DOWN", "ACTIVE")
    assert event.revision == 7
    assert "revision_number" not in orm.port_view(port, orm.PortColumns())
