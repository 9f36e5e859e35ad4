"""Benchmark: reconcile a settlement day of N rows (default 100,000) end to end.

Real parts: a Temporal dev server, the provider simulator (HTTP, streaming the bill),
the worker as its own process, and PostgreSQL (PAYSENTINEL_BENCH_DATABASE_URL, default
the test server from scripts/ensure-postgres.sh) or SQLite (--sqlite). Our side gets N
matching paid payments; the simulator's bill for the day has the same N rows.

Prints the wall time of the reconciliation, rows per second, the worker's peak memory
(VmHWM) for a small and a large day, and how often the workflow continued as new.

    python benchmarks/reconcile_large_day.py [--rows 100000] [--small 10000] [--sqlite]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
from sqlalchemy import insert

from paysentinel import db
from paysentinel.codec import format_keys
from paysentinel.config import DEFAULT_CACHE_DIR, Settings
from paysentinel.devserver import DevServer, ensure_temporal_cli, free_port
from paysentinel.models import ReconcileInput, ReconcileReport
from paysentinel.simulator.bills import synthetic_row
from paysentinel.temporal import connect
from workflows.reconcile import ReconciliationWorkflow

TZ = ZoneInfo("Asia/Shanghai")
PG = "postgresql+asyncpg://paysentinel:paysentinel@127.0.0.1:5432/paysentinel_test"


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def fresh_database(sqlite: bool, workdir: Path) -> tuple[str, object]:
    if sqlite:
        return f"sqlite+aiosqlite:///{workdir / 'bench.db'}", None
    import asyncpg
    from sqlalchemy.engine import make_url

    base = make_url(os.environ.get("PAYSENTINEL_BENCH_DATABASE_URL", PG))
    admin = await asyncpg.connect(base.set(drivername="postgresql").render_as_string(hide_password=False))
    name = f"paysentinel_bench_{uuid.uuid4().hex[:8]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    return base.set(database=name).render_as_string(hide_password=False), (admin, name)


async def our_payments(url: str, day, prefix: str, rows: int) -> float:
    """N paid payments matching the simulator's synthetic rows, bulk inserted."""
    engine = db.make_engine(url)
    started = time.perf_counter()
    now = datetime.now(timezone.utc)
    async with engine.begin() as conn:
        for first in range(1, rows + 1, 10_000):
            batch = []
            for i in range(first, min(first + 10_000, rows + 1)):
                trade_no, order, amount, paid = synthetic_row(prefix, i, day)
                minor = int(round(float(amount) * 100))
                batch.append(
                    {
                        "payment_id": f"payment-{order}",
                        "order_id": order,
                        "provider": "simulator",
                        "amount_minor": minor,
                        "currency": "CNY",
                        "subject": "synthetic",
                        "status": "SUCCEEDED",
                        "status_seq": 5,
                        "trade_no": trade_no,
                        "paid_amount_minor": minor,
                        "refunded_minor": 0,
                        "provider_retries": 0,
                        "outcome": "SUCCEEDED",
                        "finished_at": now,
                        "paid_at": paid.replace(tzinfo=TZ).astimezone(timezone.utc),
                        "created_at": now,
                        "updated_at": now,
                    }
                )
            await conn.execute(insert(db.Payment.__table__), batch)
    await engine.dispose()
    return time.perf_counter() - started


async def reconcile_day(client, task_queue: str, day, batch_rows: int) -> tuple[ReconcileReport, float, int]:
    workflow_id = f"bench-reconcile-{day}-{uuid.uuid4().hex[:6]}"
    started = time.perf_counter()
    report = await client.execute_workflow(
        ReconciliationWorkflow.run,
        ReconcileInput(provider="simulator", day=day, batch_rows=batch_rows),
        id=workflow_id,
        task_queue=task_queue,
        result_type=ReconcileReport,
    )
    elapsed = time.perf_counter() - started
    runs = len([e async for e in client.list_workflows(f'WorkflowId = "{workflow_id}"')])
    return report, elapsed, runs


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--batch-rows", type=int, default=5000)
    parser.add_argument("--sqlite", action="store_true", help="SQLite instead of PostgreSQL")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="paysentinel-bench-"))
    cli = ensure_temporal_cli(Path(os.environ.get("PAYSENTINEL_CACHE_DIR", DEFAULT_CACHE_DIR)))
    server = DevServer(cli, log_file=workdir / "temporal.log", port=free_port())
    url, cleanup = await fresh_database(args.sqlite, workdir)
    await asyncio.to_thread(db.upgrade, url)
    sim_port, task_queue = free_port(), f"bench-{uuid.uuid4().hex[:6]}"
    processes = []
    try:
        async with server:
            env = {
                **os.environ,
                "TEMPORAL_ADDRESS": server.address,
                "PAYSENTINEL_DATABASE_URL": url,
                "PAYSENTINEL_TASK_QUEUE": task_queue,
                "PAYSENTINEL_SIMULATOR_PORT": str(sim_port),
                "PAYSENTINEL_DATA_DIR": str(workdir),
                "PAYSENTINEL_SDK_METRICS_PORT": "0",
                "PAYSENTINEL_MONITOR_INTERVAL_SECONDS": "0",
                "PAYSENTINEL_RECONCILE_ENABLED": "false",
                "PAYSENTINEL_PAYLOAD_KEYS": format_keys([("bench", os.urandom(32))]),
            }
            log = open(workdir / "paysentinel.log", "ab")
            for part in ("simulator", "worker"):
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "paysentinel.cli", "up", "--parts", part],
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
            sim = f"http://127.0.0.1:{sim_port}"
            for _ in range(100):
                try:
                    httpx.get(sim + "/health", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.2)
            worker = processes[1]
            client = await connect(Settings(TEMPORAL_ADDRESS=server.address, payload_keys=env["PAYSENTINEL_PAYLOAD_KEYS"]))
            today = datetime.now(TZ).date()
            await asyncio.sleep(3)  # the worker is up and polling
            print(
                f"database: {'SQLite' if args.sqlite else 'PostgreSQL'}; batches of {args.batch_rows} rows; "
                f"worker peak RSS before any reconciliation {peak_rss_mib(worker.pid):.0f} MiB"
            )
            results = []
            for label, rows, day in (
                ("small", args.small, today - timedelta(days=40)),
                ("large", args.rows, today - timedelta(days=41)),
            ):
                prefix = f"b{label[0]}{uuid.uuid4().hex[:4]}"
                inserted = await our_payments(url, day, prefix, rows)
                httpx.put(f"{sim}/control/bills/{day}/synthetic", json={"rows": rows, "prefix": prefix}).raise_for_status()
                report, elapsed, runs = await reconcile_day(client, task_queue, day, args.batch_rows)
                peak = peak_rss_mib(worker.pid)
                assert report.rows == rows and report.matched == rows and report.unresolved == 0, report
                results.append((label, rows, elapsed, peak, runs))
                print(
                    f"{label}: {rows} rows ({inserted:.1f}s to create our side): reconciled in {elapsed:.1f}s "
                    f"({rows / elapsed:,.0f} rows/s), {report.matched} matched, {report.unresolved} unresolved, "
                    f"worker peak RSS {peak:.0f} MiB, {runs} workflow run(s) (continue-as-new)"
                )
            (_, small_rows, small_s, small_peak, _), (_, big_rows, big_s, big_peak, _) = results
            print(
                f"ratio large/small: rows x{big_rows / small_rows:.0f}, time x{big_s / small_s:.1f}, "
                f"peak memory x{big_peak / small_peak:.2f}"
            )
    finally:
        for process in processes:
            process.terminate()
            process.wait(20)
        if cleanup is not None:
            admin, name = cleanup
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
