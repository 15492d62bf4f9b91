"""ORM hooks end to end: a port table on SQLite, events on the real broker."""

import uuid

import pytest

pytest.importorskip("sqlalchemy")

from sqlalchemy import Column, String, create_engine  # noqa: E402
from sqlalchemy.orm import Session, declarative_base  # noqa: E402

from network import orm  # noqa: E402
from network.publisher import InstanceEventPublisher, PublisherSettings  # noqa: E402
from router.bus import contract  # noqa: E402
from tests.functional.test_network_publisher import host_events  # noqa: E402

Base = declarative_base()
HOST = "compute-orm"


class Port(Base):
    """A service's own port table, named its own way."""
    __tablename__ = "ports"
    uuid = Column(String(36), primary_key=True)
    instance = Column(String(36))
    owner = Column(String(64))
    state = Column(String(16))
    bound_host = Column(String(255))


COLUMNS = orm.PortColumns(id="uuid", device_id="instance", device_owner="owner",
                          status="state", host="bound_host")


def test_create_a_port_flip_it_active_see_the_event_on_the_host(bus, router):
    bus.declare_host(HOST)
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    server = str(uuid.uuid4())
    with InstanceEventPublisher(PublisherSettings(
            transport_url=bus.url, topology=bus.topology)) as publisher:
        hooks = orm.attach(Port, publisher.publish, columns=COLUMNS)
        try:
            with Session(engine) as session:
                session.add(Port(uuid="port-a", instance=server,
                                 owner="compute:az1", state="DOWN",
                                 bound_host=HOST))
                session.commit()
                session.get(Port, "port-a").state = "ACTIVE"
                session.commit()
                session.delete(session.get(Port, "port-a"))
                session.commit()
        finally:
            hooks.detach()
    events = host_events(bus, 2, HOST)
    assert [env.payload for _, env in events] == [
        contract.InstanceEvent("network-vif-plugged", server, "port-a",
                               "completed", HOST),
        contract.InstanceEvent("network-vif-deleted", server, "port-a",
                               "completed", HOST)]
    assert all(m.headers[contract.HEADER_PUBLISHER] == "guest"
               for m, _ in events)
