"""ORM hooks: port events from a SQLAlchemy ``Port`` model, by one call.

Hooks in where the network service's compute notifier does: the ``status``
attribute's ``set`` event records the transition (previous value as loaded,
``NO_VALUE`` for a new row), and ``after_insert``/``after_update`` turn it
into events with the port as it is written. ``after_delete`` adds
``network-vif-deleted``; with ``fixed_ips`` naming a column, a change of it
is ``network-changed``.

One deliberate difference: the network service sends from ``after_update``,
inside the transaction. Here the events wait with the transaction they were
written in and are published only once it committed, so the compute side
never hears of a port state the database does not hold:

- events belong to the innermost transaction boundary at the flush: the
  outermost transaction or the innermost SAVEPOINT (``begin_nested``);
- a released SAVEPOINT hands its events to the boundary around it; one
  rolled back drops them (the rows are back as they were);
- the outermost transaction publishes its events when it committed;
  ending any other way -- rollback, ``Session.close()`` without a commit,
  ``scoped_session.remove()``, a ``with Session()`` block left uncommitted --
  drops them;
- a Session joined to a transaction it does not own (bound to a Connection
  already in one: ``join_transaction_mode`` ``create_savepoint``,
  ``rollback_only``, ``conditional_savepoint``) commits nothing real: its
  events then wait for that transaction (network/orm_outer.py) and are
  published only when the Connection's own transaction commits.

The decision is made in one place, ``after_transaction_end``, with
``after_commit`` only noting which transaction committed. The publish
callable blocks until the event is safe (see network.publisher), so
``session.commit()`` returns only after that; when publishing fails the
commit has happened and the error propagates from ``commit()`` (loud,
rather than an event silently lost).

Message ids: these events are produced once, in the process that committed,
so there is no redelivery to make them stable against; the publisher keeps
an event's id across its own retries and the spool. A transition alone is
not an identity (a port goes DOWN -> ACTIVE again after every unplug), and a
generic model has no commit-stable counter to add to it.
"""

import logging
from dataclasses import dataclass
from typing import Optional

from sqlalchemy import event, inspect
from sqlalchemy.orm import Session, attributes, object_session

from network import transitions
from network.orm_outer import OuterTransactions

LOG = logging.getLogger(__name__)

_PENDING = "evrouter.network.pending"        # {transaction: [events]}
_COMMITTED = "evrouter.network.committed"    # {transactions that committed}
_CONNECTIONS = "evrouter.network.connections"  # {root transaction: [Connection]}
_UNSET = {attributes.NO_VALUE, attributes.NEVER_SET, None}


@dataclass(frozen=True)
class PortColumns:
    """Attribute names of the model, in network API terms."""
    id: str = "id"
    device_id: str = "device_id"
    device_owner: str = "device_owner"
    status: str = "status"
    host: Optional[str] = "host"    # the binding host; None: not on the model
    fixed_ips: Optional[str] = None  # e.g. a JSON column; None: not tracked
    revision: Optional[str] = None   # a counter bumped on every change; None: none


def port_view(port, columns):
    """A mapped port as the dict the pure core reads."""
    view = {"id": getattr(port, columns.id),
            "device_id": getattr(port, columns.device_id),
            "device_owner": getattr(port, columns.device_owner),
            "status": getattr(port, columns.status)}
    if columns.host:
        view[transitions.HOST_KEY] = getattr(port, columns.host)
    if columns.revision:
        view["revision_number"] = getattr(port, columns.revision)
    return view


class PortHooks:
    """The listeners `attach` registered; `detach()` removes them."""

    def __init__(self, model, publish, columns, session_class):
        self.model = model
        self.publish = publish
        self.columns = columns
        self.session_class = session_class
        self._status = getattr(model, columns.status)
        # Per attachment, so two attachments (two publishers) both see all.
        self._pending_key = f"{_PENDING}.{id(self)}"
        self._committed_key = f"{_COMMITTED}.{id(self)}"
        self._connections_key = f"{_CONNECTIONS}.{id(self)}"
        self._outer = OuterTransactions(
            lambda events: self._publish_all(events, raise_failure=False))
        self._transition_attr = f"_evrouter_transition_{id(self)}"
        self._listeners = [
            (self._status, "set", self._record_status, {"active_history": True}),
            (model, "after_insert", self._after_write, {}),
            (model, "after_update", self._after_write, {}),
            (model, "after_delete", self._after_delete, {}),
            (session_class, "after_begin", self._after_begin, {}),
            (session_class, "after_commit", self._after_commit, {}),
            (session_class, "after_transaction_end", self._after_end, {}),
        ]
        for target, name, fn, kw in self._listeners:
            event.listen(target, name, fn, **kw)

    def detach(self):
        for target, name, fn, _ in self._listeners:
            event.remove(target, name, fn)
        self._outer.detach()

    # --- mapper and attribute events (inside the flush) -------------------
    def _record_status(self, port, value, oldvalue, initiator):
        # Like the notifier: each set replaces the recorded transition, so
        # DOWN -> BUILD -> ACTIVE within one flush is judged as BUILD -> ACTIVE.
        previous = None if oldvalue in _UNSET else oldvalue
        port.__dict__[self._transition_attr] = (previous, value)

    def _after_write(self, mapper, connection, port):
        transition = port.__dict__.pop(self._transition_attr, None)
        if transition is not None and not \
                inspect(port).attrs[self.columns.status].history.has_changes():
            # Recorded by a set that a refresh or rollback undid before any
            # flush (the stash outlives them): this
            # write does not change the status.
            transition = None
        view = port_view(port, self.columns)
        events = []
        if transition is not None:
            events += transitions.status_changed(view, *transition)
        if self.columns.fixed_ips:
            # Still the flush's history here: what was loaded, what is written.
            history = inspect(port).attrs[self.columns.fixed_ips].history
            if history.deleted and history.added and \
                    transitions.addresses_changed(
                        {"fixed_ips": history.deleted[0] or []},
                        {"fixed_ips": history.added[0] or []}):
                events += transitions.network_changed(view)
        self._hold(port, events)

    def _after_delete(self, mapper, connection, port):
        self._hold(port, transitions.port_deleted(port_view(port, self.columns)))

    def _hold(self, port, events):
        if not events:
            return
        session = object_session(port)
        boundary = _boundary(session.get_nested_transaction()
                             or session.get_transaction())
        pending = session.info.setdefault(self._pending_key, {})
        pending.setdefault(boundary, []).extend(events)

    # --- session events (after the transaction) ---------------------------
    def _after_begin(self, session, transaction, connection):
        if transaction.parent is None:
            # Whose transaction the root's commit really is: read at its end.
            session.info.setdefault(self._connections_key, {}).setdefault(
                transaction, []).append(connection)

    def _after_commit(self, session):
        # Fired for the outermost transaction and for a released SAVEPOINT,
        # while the committing one is still the innermost boundary.
        committed = session.get_nested_transaction() or session.get_transaction()
        session.info.setdefault(self._committed_key, set()).add(committed)

    def _after_end(self, session, transaction):
        committed = session.info.get(self._committed_key, set())
        was_committed = transaction in committed
        committed.discard(transaction)
        connections = ()
        if transaction.parent is None:
            connections = session.info.get(self._connections_key, {}).pop(
                transaction, ())
        pending = session.info.get(self._pending_key)
        events = pending.pop(transaction, None) if pending else None
        if not events:
            return
        if not was_committed:
            LOG.debug("transaction ended without a commit: %d port event(s) "
                      "not sent", len(events))
        elif transaction.parent is not None:
            # A released SAVEPOINT: its events now stand or fall with the
            # transaction around it.
            pending.setdefault(_boundary(transaction.parent), []).extend(events)
        else:
            for connection in connections:
                if OuterTransactions.open_transaction(connection) is not None:
                    # Still in a transaction the Session did not own (it
                    # closes its own): that one decides.
                    self._outer.hold(connection, events)
                    return
            self._publish_all(events)

    def _publish_all(self, events, raise_failure=True):
        failed = None
        for ev in events:
            try:
                self.publish(ev)
            except Exception as exc:
                LOG.error("port %s: %s for %s committed but not published: %s",
                          ev.tag, ev.name, ev.server_uuid, exc)
                failed = failed or exc
        if failed is not None and raise_failure:
            raise failed


def _boundary(transaction):
    """The transaction whose commit or rollback decides `transaction`'s
    writes: itself if outermost or a SAVEPOINT, else the nearest such
    parent (SQLAlchemy wraps each flush in a subtransaction)."""
    while transaction.parent is not None and not transaction.nested:
        transaction = transaction.parent
    return transaction


def attach(model, publish, *, columns=PortColumns(), session_class=Session):
    """Publish port events for `model` through `publish(InstanceEvent)`.

    `publish` is typically ``InstanceEventPublisher.publish``; tests pass a
    list's ``append``. Listens on every session of `session_class`.
    """
    return PortHooks(model, publish, columns, session_class)
