"""An orders table with transactional enqueue.

The order row and its receipt job are written in one transaction: if the order
is rolled back, no receipt job exists, and no worker is woken.

    export PGQUEUE_DSN=postgresql://localhost/mydb
    pgqueue migrate
    python examples/orders.py                     # places two orders, rolls one back
    pgqueue worker examples.orders:app --queue emails --until-empty
"""

from __future__ import annotations

from typing import Any

import psycopg

import pgqueue

app = pgqueue.App()


@app.task(queue="emails", max_attempts=5)
def send_receipt(ctx: pgqueue.JobContext, order_id: int) -> None:
    # Written in the job's own transaction, committed together with the job's
    # completion: a receipt row exists once per order, even if this ran twice.
    ctx.conn.execute(
        "insert into receipts (order_id, sent_at) values (%s, now())"
        " on conflict (order_id) do nothing",
        [order_id],
    )


def create_tables(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        "create table if not exists orders"
        " (id bigint generated always as identity primary key, item text not null)"
    )
    conn.execute(
        "create table if not exists receipts"
        " (order_id bigint primary key references orders (id), sent_at timestamptz)"
    )


def place_order(conn: psycopg.Connection[Any], item: str) -> int:
    """Insert an order and enqueue its receipt in the caller's transaction."""
    row = conn.execute(
        "insert into orders (item) values (%s) returning id", [item]
    ).fetchone()
    assert row is not None
    send_receipt.enqueue(conn, order_id=row[0])
    return int(row[0])


def main() -> None:
    with app.connect() as conn:
        with conn.transaction():
            create_tables(conn)
        with conn.transaction():
            kept = place_order(conn, "teapot")
        try:
            with conn.transaction():
                place_order(conn, "broken vase")
                raise RuntimeError("payment declined")  # rolls back order and job
        except RuntimeError:
            pass
    print(f"order {kept} placed with its receipt job; the declined one left nothing")


if __name__ == "__main__":
    main()
