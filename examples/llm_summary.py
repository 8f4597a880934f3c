"""A slow, async call to a language model, run as a non-transactional task.

A model call can take many seconds. Holding a database transaction open for
that long would pin a connection and hold back vacuum, so the task is declared
`transactional=False`: the worker keeps the job's lease alive with heartbeats
while the handler awaits, then records the return value as the job's result.
`timeout` bounds one attempt: a call that hangs is abandoned and retried.

    export PGQUEUE_DSN=postgresql://localhost/mydb
    pgqueue migrate
    python examples/llm_summary.py 20     # enqueue 20 documents
    pgqueue worker examples.llm_summary:app --queue llm --concurrency 20 --until-empty
    psql "$PGQUEUE_DSN" -c "select id, result from pgqueue.jobs_overview
                            where task = 'summarize' and state = 'succeeded'"
"""

from __future__ import annotations

import asyncio
import sys

import pgqueue

app = pgqueue.App()  # the DSN comes from PGQUEUE_DSN

DOCUMENT = (
    "pgqueue keeps background jobs in PostgreSQL, so a job is enqueued in the "
    "same transaction as the data that caused it and runs at least once."
)


async def call_model(prompt: str) -> str:
    """Stand-in for an HTTP request to a model API."""
    await asyncio.sleep(0.3)  # the network and the model's thinking time
    words = prompt.split()
    return " ".join(words[:10]) + (" ..." if len(words) > 10 else "")


@app.task(
    queue="llm",
    transactional=False,  # ctx.conn is None: no transaction while we wait
    timeout=60,  # give up on an attempt after a minute (it is retried)
    max_attempts=3,
)
async def summarize(
    ctx: pgqueue.JobContext, doc_id: int, text: str
) -> dict[str, object]:
    summary = await call_model(text)
    # Whatever the handler returns must be JSON; it is stored as the result.
    return {
        "doc_id": doc_id,
        "summary": summary,
        "words": len(text.split()),
        "attempt": ctx.attempt,
    }


def main(count: int) -> None:
    docs = [{"doc_id": i, "text": f"Document {i}. {DOCUMENT}"} for i in range(count)]
    with app.connect() as conn, conn.transaction():
        ids = summarize.enqueue_many(conn, docs)  # one round trip for all
    print(f"enqueued {len(ids)} summarize jobs on queue 'llm'")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
