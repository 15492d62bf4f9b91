"""Port events waiting for a transaction the Session does not own.

A Session bound to a Connection that is already in a transaction (the
pattern test suites and some applications use: ``outer = conn.begin()``,
``Session(bind=conn, join_transaction_mode="create_savepoint")``) does not
commit anything real: its commit releases a SAVEPOINT, or (``rollback_only``,
the default for a Connection in a plain transaction) nothing at all. Whether
its writes last is decided by whoever owns the Connection's transaction
(issue 19, item 7).

So when such a Session's transaction has committed, network/orm.py hands its
events here, to the innermost transaction still open on the Connection, and
SQLAlchemy's Core events settle them as the database would:

- RELEASE SAVEPOINT: they go to the transaction around it;
- ROLLBACK TO SAVEPOINT: they are dropped (with those of any savepoint
  released into it);
- ROLLBACK (or the Connection closed with the transaction open): dropped;
- COMMIT of the Connection's own transaction: published, with those of any
  savepoint still open then (a COMMIT commits them too).

Core has no event after a COMMIT, only before it, so events are published
while the COMMIT is being issued, and nothing here may change what the
database does: an exception raised from that event would leave the
Connection believing its transaction over while the database still holds it
open (and the pool would hand it on). So a publish that fails is logged at
ERROR per event ("committed but not published") and the COMMIT goes on; and
if the database refuses the COMMIT itself (a deferred constraint, a lost
connection), the events are out already -- the one case where a port state
the database does not hold is published; the caller gets the error from
``commit()``.

Which transaction a released savepoint's events go to is read from the
Connection at the next Core event (any change of transaction fires one): by
then the released savepoint is no longer the innermost, its parent is.
"""

import weakref

from sqlalchemy import event
from sqlalchemy.engine import Engine

_RELEASED = object()    # released; the transaction around it is read later


class OuterTransactions:
    """Events held per Core transaction of each Connection; Engine-wide hooks."""

    def __init__(self, publish_all):
        self._publish_all = publish_all
        # Connection -> [[transaction or _RELEASED, event], ...] in order
        self._held = weakref.WeakKeyDictionary()
        self._listeners = [("savepoint", self._savepoint),
                           ("release_savepoint", self._release),
                           ("rollback_savepoint", self._rollback_savepoint),
                           ("commit", self._commit),
                           ("rollback", self._rollback)]
        for name, fn in self._listeners:
            event.listen(Engine, name, fn)

    def detach(self):
        for name, fn in self._listeners:
            event.remove(Engine, name, fn)

    @staticmethod
    def open_transaction(connection):
        """The innermost transaction open on `connection`, or None."""
        if connection.closed or not connection.in_transaction():
            return None
        return connection.get_nested_transaction() or connection.get_transaction()

    def hold(self, connection, events):
        """Keep `events` until `connection`'s open transactions decide."""
        transaction = self.open_transaction(connection)
        self._held.setdefault(connection, []).extend(
            [transaction, ev] for ev in events)

    # --- Core events: all before the statement they announce -----------------
    def _settle(self, conn):
        held = self._held.get(conn)
        if held:
            parent = None
            for entry in held:
                if entry[0] is _RELEASED:
                    parent = parent or self.open_transaction(conn)
                    entry[0] = parent
        return held

    def _savepoint(self, conn, name):
        self._settle(conn)

    def _release(self, conn, name, context=None):
        held = self._settle(conn)
        if held:
            released = conn.get_nested_transaction()
            for entry in held:
                if entry[0] is released:
                    entry[0] = _RELEASED

    def _rollback_savepoint(self, conn, name, context=None):
        held = self._settle(conn)
        if held:
            undone = conn.get_nested_transaction()
            held[:] = [e for e in held if e[0] is not undone]

    def _rollback(self, conn):
        self._held.pop(conn, None)

    def _commit(self, conn):
        held = self._settle(conn)
        self._held.pop(conn, None)
        if held:
            # Savepoints still open commit with it; cancelled ones do not.
            self._publish_all([ev for t, ev in held
                               if t is not None and t.is_active])
