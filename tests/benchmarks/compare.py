"""pgqueue against its peers and the raw-SQL ceiling, in one run, on one server.

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install -r tests/benchmarks/requirements-peers.txt -e .
    .venv-bench/bin/python tests/benchmarks/compare.py --n 20000

Oban for Python needs Python >= 3.12, so it lives in a venv of its own, whose
interpreter runs the oban roles of peers.py (--oban-python); without it the
run skips Oban and says so:

    python3.12 -m venv .venv-bench-oban
    .venv-bench-oban/bin/pip install -r tests/benchmarks/requirements-oban.txt

Every system gets a fresh database per workload on the same server. The raw
baselines are pgbench scripts (tests/benchmarks/BENCHMARKS in ../shared): the
least work per job a SKIP LOCKED queue can do. A system's figure counts only
if every job ran exactly once (handler calls are counted by job id).

Workloads per system: enqueue (one by one, bulk), drains with 1 and 2 worker
processes, latency of an idle worker, and a failure storm (failures_1proc,
higher is better, no raw ceiling): jobs whose handler always raises, not
retried, drained by one worker process with the drain's settings, counted
from the first handler call until the worker returned with every job in its
system's final failed state (pgqueue dead, PgQueuer's log status exception,
procrastinate failed, Oban discarded).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SYSTEMS = ["pgqueue", "pgqueuer", "procrastinate", "oban"]
# The interpreter that runs a system's peers.py roles, if not this one: Oban
# for Python needs >= 3.12, newer than .venv-bench may be (set in main()).
PYTHON: dict[str, str] = {}
OBAN_VENV_HINT = (
    "python3.12 -m venv .venv-bench-oban && .venv-bench-oban/bin/pip install"
    " -r tests/benchmarks/requirements-oban.txt"
)


def peers(system: str) -> list[str]:
    return [PYTHON.get(system, sys.executable), str(HERE / "peers.py")]


def oban_unavailable(python: str) -> str | None:
    """Why `python` cannot run Oban's roles, or None if it can."""
    if not Path(python).exists():
        return f"no {python} (Oban for Python needs Python >= 3.12)"
    check = (
        "import sys, oban; assert sys.version_info >= (3, 12), sys.version;"
        " print(oban.__version__)"
    )
    result = subprocess.run([python, "-c", check], capture_output=True, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["failed"]
        return f"{python} cannot import oban: {lines[-1]}"
    return None


def fresh_db(server: str, name: str) -> str:
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'drop database if exists "{name}" with (force)')
        conn.execute(f'create database "{name}"')
    return make_conninfo(server, dbname=name)


def drop_db(server: str, name: str) -> None:
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'drop database if exists "{name}" with (force)')


def run(*args: str, timeout: float = 900) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def peer(system: str, role: str, dsn: str, *args: str) -> Any:
    out = run(*peers(system), system, role, dsn, *args).strip().splitlines()
    return json.loads(out[-1]) if out else None


# -- server CPU ----------------------------------------------------------------------


class ServerCpu:
    """CPU seconds used by the PostgreSQL server so far, read from /proc: its
    postmaster (with the backends it has reaped) and every live child. Only
    when the server runs on this machine; otherwise ``read()`` gives None."""

    def __init__(self, dsn: str) -> None:
        self.postmaster: int | None = None
        with psycopg.connect(dsn) as conn:
            row = conn.execute("select pg_backend_pid()").fetchone()
            # Read while the connection is open: its backend exits on close.
            try:
                backend = Path(f"/proc/{row[0] if row else 0}/stat").read_text()
            except OSError:
                return  # not this machine's server
        self.postmaster = int(backend[backend.rindex(")") + 2 :].split()[1])
        self.tick = os.sysconf("SC_CLK_TCK")

    def read(self, settle: float = 0.0) -> float | None:
        """``settle``: seconds to wait first, so that backends whose clients
        just disconnected have exited and been reaped: a backend read neither
        alive nor in the postmaster's children's total is missed (a 1-client
        ceiling once read 0 us a job)."""
        if self.postmaster is None:
            return None
        time.sleep(settle)
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text()
            except OSError:
                continue  # exited while we looked
            pid = int(stat.parent.name)
            rest = fields[fields.rindex(")") + 2 :].split()
            if pid == self.postmaster:  # utime, stime, cutime, cstime
                total += sum(int(x) for x in rest[11:15])
            elif int(rest[1]) == self.postmaster:  # utime, stime
                total += int(rest[11]) + int(rest[12])
        return total / self.tick

    @staticmethod
    def used(before: float | None, after: float | None) -> float | None:
        return None if before is None or after is None else after - before


def per_job_us(seconds: float | None, n: int) -> float | None:
    return None if seconds is None else seconds / n * 1e6


# -- raw SQL ceilings (pgbench) ---------------------------------------------------

RAW_TABLE = """
create table jobs (
    id bigserial primary key,
    queue text not null default 'default',
    priority int not null default 0,
    run_at timestamptz not null default now(),
    args jsonb not null default '{}'
);
create index jobs_fetch on jobs (priority, id);
create table business (job_id bigint);
"""
TAKE = "select id from jobs order by priority, id for update skip locked limit {n}"
SCRIPTS = {
    "insert_one": "insert into jobs (args) values ('{}');",
    "insert_bulk": "insert into jobs (args) select '{}' from generate_series(1, 1000);",
    "take_one": f"delete from jobs where id = ({TAKE.format(n=1)}) returning *;",
    "take_batch": f"delete from jobs where id in ({TAKE.format(n=100)}) returning *;",
    "take_one_business": (
        f"with d as (delete from jobs where id = ({TAKE.format(n=1)}) returning id)"
        " insert into business select id from d;"
    ),
}


def pgbench(dsn: str, script: str, clients: int, transactions: int) -> float:
    info = conninfo_to_dict(dsn)
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
    try:
        out = run(
            "pgbench", "-n", "-h", str(info.get("host", "127.0.0.1")),
            "-p", str(info.get("port", 5432)), "-U", str(info.get("user", "postgres")),
            "-c", str(clients), "-j", str(clients), "-t", str(transactions),
            "-f", f.name, str(info["dbname"]),
        )  # fmt: skip
    finally:
        os.unlink(f.name)
    match = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    if not match:
        raise RuntimeError(f"no tps in pgbench output:\n{out}")
    return float(match.group(1))


def psycopg_inserts(dsn: str, n: int) -> float:
    """One INSERT per transaction (autocommit) from Python, jobs/s."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        started = time.perf_counter()
        for _ in range(n):
            conn.execute(SCRIPTS["insert_one"])
        return n / (time.perf_counter() - started)


def raw_db(server: str, preload: int = 0) -> str:
    """A fresh database with the raw jobs table, holding ``preload`` jobs."""
    dsn = fresh_db(server, "pqbench_raw")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(RAW_TABLE)
        if preload:
            conn.execute(
                "insert into jobs (args) select '{}' from generate_series(1, %s)",
                [preload],
            )
            conn.execute("vacuum analyze jobs")
    return dsn


def take_batch(server: str, clients: int, n: int) -> tuple[float, float | None]:
    """One run of the batched ceiling: jobs/s taking ``n`` jobs 100 a
    transaction with ``clients`` clients, and the server's CPU a job (us)."""
    dsn = raw_db(server, n)
    cpu = ServerCpu(server)
    before = cpu.read(settle=0.5)
    rate = pgbench(dsn, SCRIPTS["take_batch"], clients, n // (100 * clients))
    used = ServerCpu.used(before, cpu.read(settle=0.5))
    drop_db(server, "pqbench_raw")
    return rate * 100, per_job_us(used, n)


def raw_ceilings(server: str, n: int, fast_n: int, repeat: int) -> dict[str, float]:
    """pgbench ceilings; the batched take uses ``fast_n`` jobs, the median of
    ``repeat`` runs, as the fast drains it is compared with do."""
    res: dict[str, float] = {}

    def fresh(preload: int = 0) -> str:
        return raw_db(server, preload)

    # Medians of `repeat` runs, as the systems' enqueue rates are.
    res["insert_one"] = statistics.median(
        pgbench(fresh(), SCRIPTS["insert_one"], 1, n) for _ in range(repeat)
    )
    # Context, not a ceiling: the same INSERT sent by psycopg, the driver every
    # Python queue here uses, shows what the client alone costs per job.
    res["insert_one_psycopg"] = statistics.median(
        psycopg_inserts(fresh(), n) for _ in range(repeat)
    )
    # Many producers at once (pgqueue's `producers` workload: 8 connections).
    res["insert_one_8c"] = pgbench(fresh(), SCRIPTS["insert_one"], 8, n // 8)
    res["insert_bulk"] = statistics.median(
        pgbench(fresh(), SCRIPTS["insert_bulk"], 1, max(1, n // 1000)) * 1000
        for _ in range(repeat)
    )
    for clients in (1, 2, 8):
        res[f"take_one_{clients}c"] = pgbench(
            fresh(n), SCRIPTS["take_one"], clients, n // clients
        )
        res[f"take_one_business_{clients}c"] = pgbench(
            fresh(n), SCRIPTS["take_one_business"], clients, n // clients
        )
    for clients in (1, 2):
        runs = [take_batch(server, clients, fast_n) for _ in range(repeat)]
        res[f"take_batch_{clients}c"] = statistics.median(r[0] for r in runs)
        cpus = [r[1] for r in runs if r[1] is not None]
        if cpus:
            res[f"take_batch_{clients}c_server_cpu_us"] = statistics.median(cpus)
    drop_db(server, "pqbench_raw")
    return res


# -- peers -------------------------------------------------------------------------


def cpu_per_call(calls: list[list[Any]]) -> float:
    """A worker process's CPU seconds per handler call, between the first and
    the last of its calls that read the CPU clock (peers.py reads it every
    CPU_EVERY-th call)."""
    read = [(i, c[2]) for i, c in enumerate(calls) if c[2] is not None]
    if len(read) < 2:
        return 0.0
    (first, start), (last, end) = read[0], read[-1]
    return float(end - start) / (last - first)


def drain(
    server: str, system: str, n: int, processes: int, setup: str = "-"
) -> dict[str, float]:
    """Jobs/s from the first handler call to the last, and CPU per job: of the
    worker processes over the same span, and of the server over the whole run."""
    name = f"pqbench_{system}"
    dsn = fresh_db(server, name)
    peer(system, "setup", dsn, setup)
    peer(system, "fill", dsn, str(n))
    cpu = ServerCpu(dsn)
    server_before = cpu.read(settle=0.5)
    with tempfile.TemporaryDirectory() as tmp:
        outs = [str(Path(tmp) / f"calls{i}.json") for i in range(processes)]
        procs = [
            subprocess.Popen([*peers(system), system, "drain", dsn, out])
            for out in outs
        ]
        for proc in procs:
            if proc.wait(timeout=1800) != 0:
                raise RuntimeError(f"{system} drain worker failed")
        server_after = cpu.read(settle=0.5)
        per_process = [json.loads(Path(out).read_text()) for out in outs]
    drop_db(server, name)
    calls = [c for process_calls in per_process for c in process_calls]
    ids = {c[0] for c in calls}
    if len(calls) != n or len(ids) != n:
        raise RuntimeError(
            f"{system}: {len(calls)} handler calls for {len(ids)} of {n} jobs"
        )
    times = [c[1] for c in calls]
    worker_cpu = sum(cpu_per_call(p) * len(p) for p in per_process)
    res = {"rate": n / (max(times) - min(times)), "worker_cpu_us": worker_cpu / n * 1e6}
    server_cpu = per_job_us(ServerCpu.used(server_before, server_after), n)
    if server_cpu is not None:
        res["server_cpu_us"] = server_cpu
    return res


def failing_drain(server: str, system: str, n: int) -> dict[str, float]:
    """Failures/s of a failure storm: n jobs whose handler raises, not retried,
    drained by one worker process with the drain's settings; from the first
    handler call until the worker returned with all n jobs in the system's
    final failed state."""
    name = f"pqbench_{system}"
    dsn = fresh_db(server, name)
    try:
        peer(system, "setup", dsn, "-")
        peer(system, "fill_failing", dsn, str(n))
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "failing.json")
            proc = subprocess.Popen([*peers(system), system, "drain_failing", dsn, out])
            if proc.wait(timeout=1800) != 0:
                raise RuntimeError(f"{system} failing drain worker failed")
            result = json.loads(Path(out).read_text())
    finally:
        drop_db(server, name)
    calls = result["calls"]
    ids = {c[0] for c in calls}
    if len(calls) != n or len(ids) != n:
        raise RuntimeError(
            f"{system}: {len(calls)} handler calls for {len(ids)} of {n} failing jobs"
        )
    if result["failed"] != n:
        raise RuntimeError(f"{system}: {result['failed']} of {n} jobs failed finally")
    first = min(c[1] for c in calls)
    return {"failures_1proc": n / (result["end"] - first)}


def latency(server: str, system: str, jobs: int) -> dict[str, float]:
    name = f"pqbench_{system}"
    dsn = fresh_db(server, name)
    peer(system, "setup", dsn, "-")
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "calls.json")
        worker = subprocess.Popen(
            [*peers(system), system, "listen", dsn, out, str(jobs)]
        )
        time.sleep(3)  # started, listening, idle
        committed = peer(system, "produce", dsn, str(jobs))
        if worker.wait(timeout=120) != 0:
            raise RuntimeError(f"{system} listen worker failed")
        calls = json.loads(Path(out).read_text())
    drop_db(server, name)
    waits = sorted(
        (start - committed[str(job_id)]) * 1000 for job_id, start, _ in calls
    )
    if len(waits) != jobs:
        raise RuntimeError(f"{system}: {len(waits)} of {jobs} latency jobs ran")
    cuts = statistics.quantiles(waits, n=100, method="inclusive")
    return {
        "latency_p50_ms": cuts[49],
        "latency_p95_ms": cuts[94],
        "latency_p99_ms": cuts[98],
    }


def drain_figures(
    server: str,
    system: str,
    n: int,
    processes: int,
    repeat: int,
    setup: str = "-",
    suffix: str = "",
    paired: bool = False,
) -> dict[str, float]:
    """Median of `repeat` drains (a fast drain varies +-15 % run to run) of the
    rate and the CPU per job, as drain_{processes}proc{suffix}[_worker_cpu_us...].

    ``paired``: each drain comes right after a run of the batched ceiling with
    as many clients as processes, on the same number of jobs; the median of
    the drain/ceiling ratios is ..._paired_ratio. The machine's speed drifts
    over a run (the ceiling measured at its start moved 115k-158k jobs/s from
    one run to another here), and a ratio of two figures taken seconds apart
    is not moved by that drift."""
    runs = []
    ratios = []
    ceilings = []
    for _ in range(repeat):
        ceiling = take_batch(server, processes, n)[0] if paired else None
        runs.append(drain(server, system, n, processes, setup))
        if ceiling is not None:
            ceilings.append(ceiling)
            ratios.append(runs[-1]["rate"] / ceiling)
    key = f"drain_{processes}proc{suffix}"
    res = {}
    for figure, name in (("rate", key), ("worker_cpu_us", f"{key}_worker_cpu_us"),
                         ("server_cpu_us", f"{key}_server_cpu_us")):  # fmt: skip
        values = [r[figure] for r in runs if figure in r]
        if values:
            res[name] = statistics.median(values)
    if ratios:
        res[f"{key}_paired_ceiling"] = statistics.median(ceilings)
        res[f"{key}_paired_ratio"] = statistics.median(ratios)
    return res


def measure(
    server: str, system: str, n: int, drain_n: dict[str, int], repeat: int
) -> dict[str, float]:
    name = f"pqbench_{system}"
    # Enqueue rates move +-12 % from one 20,000-job run to the next on this
    # machine: the median of `repeat` runs, each in a fresh database.
    runs = []
    for _ in range(repeat):
        dsn = fresh_db(server, name)
        peer(system, "setup", dsn, "-")
        runs.append(peer(system, "enqueue", dsn, str(n)))
        drop_db(server, name)
    res: dict[str, float] = {
        key: statistics.median(run[key] for run in runs) for key in runs[0]
    }
    size = drain_n.get(system, n)
    for processes in (1, 2):
        res.update(
            drain_figures(
                server, system, size, processes, repeat, paired=system == "pgqueue"
            )
        )
    res.update(failing_drain(server, system, size))
    res.update(latency(server, system, 300))
    return res


def pgqueue_extra(server: str, n: int) -> dict[str, float]:
    """pgqueue-only workloads from `pgqueue bench` (concurrent producers, business
    rows, backlog, RSS)."""
    dsn = fresh_db(server, "pqbench_pgqueue_extra")
    out = run(
        sys.executable, "-m", "pgqueue", "--dsn", dsn, "bench", "--jobs", str(n),
        "--workload", "producers", "--workload", "business", "--workload", "backlog",
        "--workload", "memory", "--json",
    )  # fmt: skip
    drop_db(server, "pqbench_pgqueue_extra")
    return dict(json.loads(out)["figures"])


# -- report ------------------------------------------------------------------------

CEILING = {
    "enqueue_one": "insert_one",
    "enqueue_bulk": "insert_bulk",
    "enqueue_8_producers": "insert_one_8c",
    "enqueue_8_producers_busy": "insert_one_8c",
    "enqueue_8_producers_quiet": "insert_one_8c",
    "drain_1proc": "take_batch_1c",
    "drain_2proc": "take_batch_2c",
    "drain_1proc_discard": "take_batch_1c",
    "drain_2proc_discard": "take_batch_2c",
    "drain_1proc_server_cpu_us": "take_batch_1c_server_cpu_us",
    "drain_2proc_server_cpu_us": "take_batch_2c_server_cpu_us",
    "drain_1proc_discard_server_cpu_us": "take_batch_1c_server_cpu_us",
    "drain_2proc_discard_server_cpu_us": "take_batch_2c_server_cpu_us",
    "business_1proc": "take_one_business_8c",
    "business_2proc": "take_one_business_8c",
    "business_async_1proc": "take_one_business_8c",
    "business_async_2proc": "take_one_business_8c",
    "business_batched_1proc": "take_one_business_8c",
    "business_batched_2proc": "take_one_business_8c",
    "business_async_batched_1proc": "take_one_business_8c",
    "business_async_batched_2proc": "take_one_business_8c",
}
LOWER_IS_BETTER = {
    "latency_p50_ms", "latency_p95_ms", "latency_p99_ms",
    "drain_1proc_worker_cpu_us", "drain_1proc_server_cpu_us",
    "drain_2proc_worker_cpu_us", "drain_2proc_server_cpu_us",
    "drain_1proc_discard_worker_cpu_us", "drain_1proc_discard_server_cpu_us",
    "drain_2proc_discard_worker_cpu_us", "drain_2proc_discard_server_cpu_us",
}  # fmt: skip


def report(raw: dict[str, float], systems: dict[str, dict[str, float]]) -> str:
    lines = [
        "| workload | "
        + " | ".join(systems)
        + " | raw ceiling | pgqueue / ceiling | pgqueue / best peer |"
    ]
    lines.append("|" + " --- |" * (len(systems) + 4))
    keys = list(dict.fromkeys(k for figures in systems.values() for k in figures))
    for key in keys:
        row = [key]
        for figures in systems.values():
            value = figures.get(key)
            if value is None:
                row.append("-")
            elif key.endswith("_paired_ratio"):  # a share of a ceiling
                row.append(f"{value:.0%}")
            else:
                row.append(f"{value:,.1f}")
        ceiling = raw.get(CEILING.get(key, ""))
        ours = systems.get("pgqueue", {}).get(key)
        row.append("-" if ceiling is None else f"{ceiling:,.0f} ({CEILING[key]})")
        row.append("-" if ceiling is None or ours is None else f"{ours / ceiling:.0%}")
        peers = [f[key] for s, f in systems.items() if s != "pgqueue" and key in f]
        if peers and ours is not None:
            best = min(peers) if key in LOWER_IS_BETTER else max(peers)
            ratio = best / ours if key in LOWER_IS_BETTER else ours / best
            row.append(f"{ratio:.2f}x")
        else:
            row.append("-")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append(
        "Raw ceilings (pgbench, jobs/s): "
        + ", ".join(f"{k} {v:,.0f}" for k, v in raw.items())
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dsn",
        default=os.environ.get(
            "PGQUEUE_BENCH_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    parser.add_argument(
        "--slow-n", type=int, default=5000,
        help="jobs for the drains and the failure storm of systems below 5k jobs/s"
        " (procrastinate)",
    )  # fmt: skip
    parser.add_argument(
        "--fast-n", type=int, default=100_000,
        help="jobs for the drains and the failure storms of pgqueue and PgQueuer"
        " and the batched raw ceiling (a 20k-job drain of a fast queue lasts"
        " under a second)",
    )  # fmt: skip
    parser.add_argument(
        "--repeat", type=int, default=3,
        help="drains (and batched ceilings) per figure; the median is reported",
    )  # fmt: skip
    parser.add_argument(
        "--oban-python",
        default=str(ROOT / ".venv-bench-oban" / "bin" / "python"),
        help="Python >= 3.12 with oban installed, for the oban system's processes",
    )
    args = parser.parse_args()
    systems = args.systems.split(",")
    if "oban" in systems:
        problem = oban_unavailable(args.oban_python)
        if problem:
            print(
                f"oban: skipped: {problem}; to include it: {OBAN_VENV_HINT}", flush=True
            )
            systems.remove("oban")
        else:
            PYTHON["oban"] = args.oban_python
    with psycopg.connect(args.dsn) as conn:
        version = conn.execute("show server_version").fetchone()
    print(
        f"server {version[0] if version else '?'}, {os.cpu_count()} CPUs,"
        f" n={args.n}, fast drains {args.fast_n}, median of {args.repeat}",
        flush=True,
    )
    raw = raw_ceilings(args.dsn, args.n, args.fast_n, args.repeat)
    print("raw:", json.dumps({k: round(v) for k, v in raw.items()}), flush=True)
    results: dict[str, dict[str, float]] = {}
    for system in systems:
        try:
            results[system] = measure(
                args.dsn,
                system,
                args.n,
                {
                    "procrastinate": args.slow_n,
                    "pgqueue": args.fast_n,
                    "pgqueuer": args.fast_n,
                },
                args.repeat,
            )
            if system == "pgqueue":
                results[system].update(pgqueue_extra(args.dsn, args.n))
                # A queue that keeps no succeeded jobs (README: Run workers).
                for processes in (1, 2):
                    results[system].update(
                        drain_figures(
                            args.dsn,
                            "pgqueue",
                            args.fast_n,
                            processes,
                            args.repeat,
                            setup="discard",
                            suffix="_discard",
                        )
                    )
        except Exception as exc:  # report the others even if one system fails
            print(f"{system}: FAILED: {exc}", flush=True)
            continue
        print(
            system,
            json.dumps({k: round(v, 2) for k, v in results[system].items()}),
            flush=True,
        )
    table = report(raw, results)
    print()
    print(table)
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "raw": raw,
                    "systems": results,
                    "n": args.n,
                    "fast_n": args.fast_n,
                    "repeat": args.repeat,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
