"""ORM hooks under a Session joined to a transaction it does not own
(issue 19, item 7): only the Connection's own COMMIT publishes.

The pattern test suites and some applications use: ``outer = conn.begin()``,
``Session(bind=conn, join_transaction_mode=...)``. SQLite, publishing into a
list; a hypothesis state machine walks begin/savepoint/commit/rollback at
both levels against a model of what the database keeps.
"""

import pytest

sqlalchemy = pytest.importorskip("sqlalchemy")

from hypothesis import settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import (  # noqa: E402
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from sqlalchemy import create_engine, event  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from network import orm, transitions  # noqa: E402
from tests.unit.test_network_orm import Base, Port, ev, new_port  # noqa: E402

PLUGGED = ev("network-vif-plugged")
PORTS = ("port-1", "port-2")


def sqlite_engine():
    """SQLite whose transactions and savepoints do what they say.

    pysqlite emits BEGIN only before DML, so a SAVEPOINT first opens the
    transaction and its RELEASE commits everything: SQLAlchemy's recipe
    takes BEGIN out of the driver's hands.
    """
    engine = create_engine("sqlite://")

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, record):
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN")

    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([new_port("DOWN", id=p) for p in PORTS])
        session.commit()
    return engine


@pytest.fixture
def engine():
    engine = sqlite_engine()
    yield engine
    engine.dispose()


@pytest.fixture
def published():
    events = []
    hooks = orm.attach(Port, events.append)
    yield events
    hooks.detach()


def joined(engine, mode="create_savepoint"):
    conn = engine.connect()
    return conn, conn.begin(), Session(bind=conn, join_transaction_mode=mode)


def plug(session, port_id="port-1"):
    session.get(Port, port_id).status = "ACTIVE"
    session.commit()


@pytest.mark.parametrize("mode", ["create_savepoint", "conditional_savepoint",
                                  "rollback_only"])
def test_outer_rollback_publishes_nothing(engine, published, mode):
    conn, outer, session = joined(engine, mode)
    plug(session)
    session.close()
    outer.rollback()
    conn.close()
    assert published == []


@pytest.mark.parametrize("mode", ["create_savepoint", "conditional_savepoint",
                                  "rollback_only"])
def test_outer_commit_publishes_once(engine, published, mode):
    conn, outer, session = joined(engine, mode)
    plug(session)
    assert published == []              # the Session's commit is not real
    session.close()
    outer.commit()
    assert published == [PLUGGED]
    conn.close()
    assert published == [PLUGGED]


def test_closing_the_connection_with_the_outer_open_publishes_nothing(
        engine, published):
    conn, outer, session = joined(engine)
    plug(session)
    session.close()
    conn.close()                        # rolls the outer back
    assert published == []


def test_a_rolled_back_core_savepoint_drops_its_part_of_a_committed_outer(
        engine, published):
    conn, outer, session = joined(engine)
    plug(session, "port-1")
    savepoint = conn.begin_nested()
    plug(session, "port-2")
    savepoint.rollback()
    outer.commit()
    assert published == [PLUGGED]


def test_a_released_core_savepoint_publishes_with_the_outer(engine, published):
    conn, outer, session = joined(engine)
    with conn.begin_nested():
        with conn.begin_nested():
            plug(session, "port-1")
        plug(session, "port-2")
    assert published == []
    outer.commit()
    assert published == [PLUGGED, ev("network-vif-plugged", tag="port-2")]


def test_a_rolled_back_session_savepoint_drops_its_part(engine, published):
    conn, outer, session = joined(engine)
    session.get(Port, "port-1").status = "ACTIVE"
    nested = session.begin_nested()
    session.get(Port, "port-2").status = "ACTIVE"
    session.flush()
    nested.rollback()
    session.commit()
    outer.commit()
    assert published == [PLUGGED]


def test_control_fully_commits_the_outer_so_its_commit_publishes(
        engine, published):
    conn, outer, session = joined(engine, "control_fully")
    plug(session)
    assert published == [PLUGGED] and not conn.in_transaction()


def test_a_session_of_its_own_still_publishes_at_its_commit(engine, published):
    with Session(engine) as session:
        plug(session)
        assert published == [PLUGGED]


def test_a_failed_publish_is_loud_and_leaves_the_commit_alone(engine, caplog):
    # An exception out of Core's before-COMMIT event would leave the
    # database's transaction open behind SQLAlchemy's back.
    def refuse(event):
        raise ConnectionError("broker away")
    hooks = orm.attach(Port, refuse)
    try:
        conn, outer, session = joined(engine)
        plug(session)
        session.close()
        outer.commit()
        conn.close()
    finally:
        hooks.detach()
    assert "committed but not published: broker away" in caplog.text
    with Session(engine) as session:
        assert session.get(Port, "port-1").status == "ACTIVE"
        plug(session, "port-2")         # the pooled connection is sane


# --- the state machine ----------------------------------------------------------

MODES = ["create_savepoint", "conditional_savepoint", "rollback_only",
         "control_fully"]


class JoinedSessions(RuleBasedStateMachine):
    """A Connection with Core transactions and savepoints of the test's own,
    and a Session bound to it, interleaved as the API allows: Core
    savepoints begin and end only while the Session is between transactions
    (they enclose whole Session transactions).

    The model: `core` is the stack of the Connection's open transactions
    (root first), each with the events it holds; `session` the stack of the
    Session's transaction and savepoints; `joined` which Core transaction
    the Session's transaction is (None: one of its own). Invariant after
    every step: published == what the model says reached a real COMMIT.
    """

    @initialize(mode=st.sampled_from(MODES))
    def start(self, mode):
        self.engine = sqlite_engine()
        self.published = []
        self.hooks = orm.attach(Port, self.published.append)
        self.mode = mode
        self.conn = self.engine.connect()
        self.db = Session(bind=self.conn, join_transaction_mode=mode)
        self.core = []          # [[Transaction, [events]], ...], root first
        self.session = []       # [[events], ...], the Session's root first
        self.how = None         # how the Session's root joined: see _begin
        self.expected = []

    def teardown(self):
        if hasattr(self, "hooks"):
            self.db.close()
            self.conn.close()
            self.hooks.detach()
            self.engine.dispose()

    # --- the Connection's own transactions (Session between transactions) ---
    def idle(self):
        return not self.session

    @precondition(lambda self: self.idle() and not self.core)
    @rule()
    def outer_begin(self):
        self.core.append([self.conn.begin(), []])

    @precondition(lambda self: self.idle() and self.core)
    @rule()
    def core_savepoint(self):
        self.core.append([self.conn.begin_nested(), []])

    @precondition(lambda self: self.idle() and len(self.core) > 1)
    @rule(release=st.booleans())
    def core_savepoint_end(self, release):
        transaction, events = self.core.pop()
        if release:
            transaction.commit()
            self.core[-1][1].extend(events)
        else:
            transaction.rollback()

    @precondition(lambda self: self.idle() and self.core)
    @rule(commit=st.booleans())
    def outer_end(self, commit):
        root = self.core[0][0]
        if commit:
            root.commit()
            for _, events in self.core:
                self.expected.extend(events)
        else:
            root.rollback()
        self.core = []

    # --- the Session ------------------------------------------------------
    def _begin(self):
        """What the Session's autobegin joins (SQLAlchemy's rules)."""
        if self.session:
            return
        if not self.core:
            self.how = "own"
        else:
            mode = self.mode
            if mode == "conditional_savepoint":
                mode = ("create_savepoint" if len(self.core) > 1
                        else "rollback_only")
            self.how = mode
        self.session.append([])

    @rule(port_id=st.sampled_from(PORTS),
          status=st.sampled_from(["ACTIVE", "DOWN", "ERROR", "BUILD"]))
    def change(self, port_id, status):
        self._begin()
        port = self.db.get(Port, port_id)
        before = port.status
        port.status = status
        self.db.flush()
        view = orm.port_view(port, orm.PortColumns())
        self.session[-1].extend(transitions.status_changed(view, before, status))

    @rule()
    def session_savepoint(self):
        self._begin()
        self.db.begin_nested()
        self.session.append([])

    @precondition(lambda self: len(self.session) > 1)
    @rule(release=st.booleans())
    def session_savepoint_end(self, release):
        nested = self.db.get_nested_transaction()
        events = self.session.pop()
        if release:
            nested.commit()
            self.session[-1].extend(events)
        else:
            nested.rollback()

    @precondition(lambda self: len(self.session) == 1)
    @rule()
    def session_commit(self):
        self.db.commit()
        events = self.session.pop()
        if self.how == "own":
            self.expected.extend(events)
        elif self.how in ("create_savepoint", "rollback_only"):
            self.core[-1][1].extend(events)
        elif self.core[-1][0].is_active:
            # control_fully, yet SQLAlchemy left the Core transaction open
            # (a Session whose first act was a savepoint, rolled back): no
            # COMMIT or RELEASE happened, the events wait in it
            self.core[-1][1].extend(events)
        elif len(self.core) == 1:        # control_fully of the root: COMMIT
            for _, held in self.core:
                self.expected.extend(held)
            self.expected.extend(events)
            self.core = []
        else:                            # control_fully of a savepoint: RELEASE
            _, held = self.core.pop()
            self.core[-1][1].extend(held + events)

    @precondition(lambda self: self.session)
    @rule()
    def session_rollback(self):
        self.db.rollback()
        self.session = []
        if self.how in ("rollback_only", "control_fully"):
            # It rolled back the Core transaction it joined, which its owner
            # still has to end.
            transaction, _ = self.core.pop()
            if transaction in (self.conn.get_nested_transaction(),
                               self.conn.get_transaction()):
                transaction.rollback()

    @invariant()
    def published_is_what_reached_a_real_commit(self):
        if hasattr(self, "hooks"):
            assert self.published == self.expected


JoinedSessions.TestCase.settings = settings(max_examples=150,
                                            stateful_step_count=30,
                                            deadline=None)
test_joined_sessions = JoinedSessions.TestCase
