"""Orders and receipts: the job commits with the order, or not at all.

`place_order` writes an order row and enqueues its `send_receipt` job on the
same connection, inside the caller's transaction. There is no window where the
order exists without its job (or a job points at an order that was never
saved): both commit together or both roll back.

    export PGQUEUE_DSN=postgresql://localhost/shop
    pgqueue migrate
    python examples/orders.py            # one order kept, one rolled back
    pgqueue worker examples.orders:app --queue emails --until-empty
    psql "$PGQUEUE_DSN" -c "select * from receipts"
"""

from __future__ import annotations

from typing import Any

import psycopg

import pgqueue

# No DSN here: App() reads PGQUEUE_DSN (or DATABASE_URL, or libpq's PG* vars),
# so the script and `pgqueue worker` share one setting.
app = pgqueue.App()

Connection = psycopg.Connection[Any]


@app.task(queue="emails", max_attempts=5)
def send_receipt(ctx: pgqueue.JobContext, order_id: int) -> None:
    """Record that the receipt went out (a real app would send an email here).

    The task is transactional (the default): ctx.conn is a transaction that the
    worker commits together with the job's completion. If the worker dies
    before that commit, the row vanishes with it and the rerun writes it again;
    so receipts gets exactly one row per order.
    """
    ctx.conn.execute(
        "insert into receipts (order_id, job_id) values (%s, %s)",
        [order_id, ctx.job.id],
    )


def create_tables(conn: Connection) -> None:
    conn.execute(
        """
        create table if not exists orders (
            id    bigint generated always as identity primary key,
            item  text not null,
            cents integer not null
        );
        create table if not exists receipts (
            order_id bigint primary key references orders (id),
            job_id   bigint not null,
            sent_at  timestamptz not null default now()
        )
        """
    )


def place_order(conn: Connection, item: str, cents: int) -> int:
    """Insert an order and enqueue its receipt, in the caller's transaction.

    Nothing here commits: the caller decides whether both happen.
    """
    row = conn.execute(
        "insert into orders (item, cents) values (%s, %s) returning id", [item, cents]
    ).fetchone()
    assert row is not None
    order_id = int(row[0])
    send_receipt.enqueue(conn, order_id=order_id)
    return order_id


class PaymentDeclined(Exception):
    pass


def main() -> None:
    with app.connect() as conn:
        with conn.transaction():
            create_tables(conn)

        # Commit path: the order and its job become visible together.
        with conn.transaction():
            kept = place_order(conn, "teapot", 2500)
        print(f"order {kept} committed; its send_receipt job is queued")

        # Rollback path: the payment fails after the order was written, so the
        # transaction rolls back and takes the order *and* its job with it.
        try:
            with conn.transaction():
                place_order(conn, "vase", 9900)
                raise PaymentDeclined("card declined")
        except PaymentDeclined:
            print("the declined order rolled back: no order row, no job")


if __name__ == "__main__":
    main()
