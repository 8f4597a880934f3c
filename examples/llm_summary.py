"""An async, non-transactional task that simulates a slow LLM call.

Non-transactional tasks hold no database transaction while they wait on the
network; the worker's heartbeats keep their leases alive, and the return value
is stored as the job's result (pgqueue.finished_jobs.result).

    export PGQUEUE_DSN=postgresql://localhost/mydb
    pgqueue migrate
    python examples/llm_summary.py 20              # enqueue 20 documents
    pgqueue worker examples.llm_summary:app --queue llm --concurrency 20 --until-empty
    psql "$PGQUEUE_DSN" -c "select result from pgqueue.finished_jobs"
"""

from __future__ import annotations

import asyncio
import random
import sys

import pgqueue

app = pgqueue.App()


async def fake_llm(prompt: str) -> str:
    # Stands in for an HTTP call to a model: slow, and sometimes flaky.
    await asyncio.sleep(random.uniform(0.2, 0.6))
    if random.random() < 0.1:
        raise ConnectionError("model endpoint timed out")
    words = prompt.split()
    return " ".join(words[:8]) + ("..." if len(words) > 8 else "")


@app.task(
    queue="llm",
    transactional=False,  # no transaction held open during the call
    timeout=30,  # an attempt that hangs is abandoned and retried
    max_attempts=5,
    retry=pgqueue.ExponentialBackoff(base=0.5, max_delay=10),
)
async def summarize(
    ctx: pgqueue.JobContext, doc_id: int, text: str
) -> dict[str, object]:
    summary = await fake_llm(text)
    return {"doc_id": doc_id, "summary": summary, "attempt": ctx.attempt}


def main(count: int) -> None:
    text = (
        "pgqueue keeps background jobs inside PostgreSQL so they commit with your data"
    )
    with app.connect() as conn, conn.transaction():
        ids = summarize.enqueue_many(
            conn,
            [{"doc_id": i, "text": f"{text} (document {i})"} for i in range(count)],
        )
    print(f"enqueued {len(ids)} summaries")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
