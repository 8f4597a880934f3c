"""Quickstart: a transactional task, bulk enqueue, and a worker that drains it.

export PGQUEUE_DSN=postgresql://localhost/mydb
pgqueue migrate
python examples/quickstart.py 5000          # create the table, enqueue jobs
pgqueue worker examples.quickstart:app --until-empty
pgqueue stats
"""

from __future__ import annotations

import sys

import pgqueue

app = pgqueue.App()  # DSN from PGQUEUE_DSN / DATABASE_URL / PG* variables


@app.task(max_attempts=5)
def add(ctx: pgqueue.JobContext, a: int, b: int) -> int:
    # ctx.conn is the job's own transaction: this row and the job's completion
    # commit together, so each job adds exactly one row even if it ran twice.
    ctx.conn.execute(
        "insert into quickstart_sums (job_id, total) values (%s, %s)",
        [ctx.job.id, a + b],
    )
    return a + b


def main(count: int) -> None:
    with app.connect() as conn, conn.transaction():
        conn.execute(
            "create table if not exists quickstart_sums"
            " (job_id bigint primary key, total int not null)"
        )
        ids = add.enqueue_many(conn, ({"a": i, "b": 2 * i} for i in range(count)))
    print(f"enqueued {len(ids)} jobs")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
