"""The connections a worker lends its transactional handlers as ``ctx.conn``.

A transactional job's writes commit with its fenced completion, which the
worker sends after the handler returns; in a transaction batch, after its
batch mates' handlers too. A handler that ended that transaction itself would
commit writes whose jobs are not completed (they run again and write twice)
or roll back its mates' writes. So while a handler holds one of these
connections, ``commit()``, ``rollback()`` and ``close()`` raise
:class:`~pgqueue.errors.TransactionOwnedByWorker` and change nothing, and so
does ``with ctx.conn:`` (it commits or rolls back, and closes). The handler's
job fails, even if it caught the refusal and returned (it would believe its
writes committed or rolled back); its writes roll back, and its batch mates
run again without it. A COMMIT sent as
SQL (``ctx.conn.execute("commit")``) cannot be refused; the worker finds it
after the handler returns and fails the job, but what it committed stays.

The worker's own calls go through: it lends a connection with :func:`lent`,
which takes the guard off again when the handler is done, and closes one a
handler may still hold with :func:`close_anyway`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import psycopg
from psycopg.rows import TupleRow

from pgqueue.errors import TransactionOwnedByWorker

# How the worker opens every transaction it lends a handler. A completion
# deletes the row that the heartbeat updates: at REPEATABLE READ or
# SERIALIZABLE (a database's or a role's default), a handler's transaction
# that outlived one heartbeat could never complete (could not serialize access
# due to concurrent update). Per transaction, not per session: behind a pooler
# in transaction mode a session setting would land on whichever server
# connection ran it, and stay there for other clients.
BEGIN = "begin isolation level read committed"


class HandlerConnection(psycopg.Connection[TupleRow]):
    """A worker connection that refuses to end a transaction it lent out."""

    lent_to_handler = False
    refused: TransactionOwnedByWorker | None = None  # while lent, see lent()

    def commit(self) -> None:
        _refuse_if_lent(self, "commit")
        super().commit()

    def rollback(self) -> None:
        _refuse_if_lent(self, "rollback")
        super().rollback()

    def close(self) -> None:
        _refuse_if_lent(self, "close")
        super().close()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        # 'with ctx.conn:' would commit (or roll back) and close: refused
        # either way, the block's own error as the cause. Letting that error
        # through alone would leave the block's writes in the transaction
        # for a handler that catches it outside the block.
        _refuse_if_lent(self, "__exit__", exc_val)
        super().__exit__(exc_type, exc_val, exc_tb)


class AsyncHandlerConnection(psycopg.AsyncConnection[TupleRow]):
    """The asyncio twin of :class:`HandlerConnection`."""

    lent_to_handler = False
    refused: TransactionOwnedByWorker | None = None  # while lent, see lent()

    async def commit(self) -> None:
        _refuse_if_lent(self, "commit")
        await super().commit()

    async def rollback(self) -> None:
        _refuse_if_lent(self, "rollback")
        await super().rollback()

    async def close(self) -> None:
        _refuse_if_lent(self, "close")
        await super().close()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        _refuse_if_lent(self, "__aexit__", exc_val)  # see __exit__ above
        await super().__aexit__(exc_type, exc_val, exc_tb)


def _refuse_if_lent(
    conn: HandlerConnection | AsyncHandlerConnection,
    what: str,
    cause: BaseException | None = None,
) -> None:
    if not conn.lent_to_handler:
        return
    conn.refused = TransactionOwnedByWorker(
        f"ctx.conn.{what}() refused (it would end the transaction): the "
        "worker commits a transactional job's writes together with its "
        "completion (nothing was changed; this job fails and its writes "
        "roll back)"
    )
    raise conn.refused from cause


@contextlib.contextmanager
def lent(conn: Any) -> Iterator[None]:
    """Guard ``conn`` while a handler holds it (a plain connection: no guard)."""
    if not isinstance(conn, HandlerConnection | AsyncHandlerConnection):
        yield
        return
    conn.lent_to_handler = True
    conn.refused = None
    try:
        yield
    finally:
        conn.lent_to_handler = False
    # Reached when the handler returned: one that caught the refusal (and
    # went on as if its commit or rollback had happened) fails all the same.
    if conn.refused is not None:
        raise TransactionOwnedByWorker(
            f"{conn.refused} [the handler caught this refusal and returned]"
        ) from conn.refused


def close_anyway(conn: psycopg.Connection[Any]) -> None:
    """Close ``conn`` even while an abandoned handler still holds it.

    The guard stays up meanwhile: a handler thread's commit() between the two
    would commit the writes of a job that was handed back.
    """
    psycopg.Connection.close(conn)
