"""Benchmark: the memory a waiting payment holds while it stays in the worker's cache.

Starts N payments that wait for their payer (a long callback timeout, so no query runs while
they are measured) on a worker in this process, with the worker's own sandbox settings, the
real PaymentWorkflow and scripted activities (no provider, no database), on a Temporal dev
server; each sandbox variant in a fresh interpreter. Prints, per cached payment, the growth
of the process's resident memory and, with ``--trace``, of the Python heap (tracemalloc, in a
run of its own; the rest is the Temporal SDK's core, which keeps each cached run's state
machines outside Python, and the allocator). Divide the memory a worker may use by the first figure to size
``PAYSENTINEL_WORKER_MAX_CACHED_WORKFLOWS``.

    python benchmarks/cached_payment_memory.py [--payments 500] [--trace]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import os
import subprocess
import sys
import tempfile
import tracemalloc
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

VARIANTS = ("isolated", "shared")


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def measure(sandbox: str, count: int, trace: bool) -> tuple[float, float | None]:
    import history_size
    from temporalio.worker import Worker

    from paysentinel.config import DEFAULT_CACHE_DIR, Settings
    from paysentinel.devserver import DevServer, ensure_search_attributes, ensure_temporal_cli, free_port
    from paysentinel.models import OrderCustomer, PaymentInput, PaymentOrder
    from paysentinel.temporal import connect
    from workers.main import WORKFLOWS, workflow_runner

    cli = ensure_temporal_cli(Path(os.environ.get("PAYSENTINEL_CACHE_DIR", DEFAULT_CACHE_DIR)), log=lambda _: None)
    server = DevServer(cli, log_file=Path(tempfile.mkdtemp(prefix="cached-memory-")) / "temporal.log", port=free_port())
    server.start()
    try:
        await server.wait_ready()
        key = base64.b64encode(os.urandom(32)).decode()
        client = await connect(Settings(TEMPORAL_ADDRESS=server.address, payload_keys=f"bench:{key}"))
        await ensure_search_attributes(client)
        task_queue = f"cached-memory-{uuid.uuid4().hex[:6]}"
        # The payer never pays and the first query would come after an hour: nothing runs.
        timing = history_size.timing(1.0, 7200).model_copy(update={"callback_timeout_seconds": 3600.0})

        async def start(number: int) -> None:
            order = f"mem{number}-{uuid.uuid4().hex[:6]}"
            payment = PaymentInput(
                payment_id=f"payment-{order}",
                request=PaymentOrder(
                    order_id=order, amount_minor=1000, currency="CNY", customer=OrderCustomer(email="payer@example.com")
                ),
                notify_url="http://127.0.0.1:1/webhooks/simulator",
                timing=timing,
            )
            await history_size.start(client, payment, task_queue, "update-with-start")

        scripted = history_size.Scripted(paid_on_query=False)
        async with Worker(
            client,
            task_queue=task_queue,
            workflows=WORKFLOWS,
            activities=scripted.activities(),
            workflow_runner=workflow_runner(sandbox),
            max_cached_workflows=count + 100,
        ):
            for number in range(20):  # warm up: first imports, pools, caches
                await start(number)
            gc.collect()
            await asyncio.sleep(1)
            before = rss_mib()
            if trace:
                tracemalloc.start()
            heap_before = tracemalloc.get_traced_memory()[0] if trace else 0
            gate = asyncio.Semaphore(16)

            async def limited(number: int) -> None:
                async with gate:
                    await start(number)

            await asyncio.gather(*(limited(20 + n) for n in range(count)))
            gc.collect()
            await asyncio.sleep(2)
            grown = (rss_mib() - before) * 1024 / count
            heap = (tracemalloc.get_traced_memory()[0] - heap_before) / 1024 / count if trace else None
            return grown, heap
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payments", type=int, default=500)
    parser.add_argument("--trace", action="store_true", help="also measure the Python heap (slower)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        grown, heap = asyncio.run(measure(args.child, args.payments, args.trace))
        print(f"{grown:.0f} {heap if heap is not None else -1:.0f}")
        return
    from system import header

    header(f"cached payment memory: {args.payments} waiting payments in the worker's cache, per sandbox")
    for sandbox in VARIANTS:
        grown, _ = child(sandbox, args.payments, trace=False)
        python = ""
        if args.trace:  # tracemalloc's own bookkeeping grows the process: a run of its own
            _, heap = child(sandbox, args.payments, trace=True)
            python = f"; Python heap {heap:.0f} KiB, the rest the SDK's core and the allocator"
        print(f"{sandbox}: {grown:.0f} KiB resident per cached payment{python}", flush=True)


def child(sandbox: str, payments: int, trace: bool) -> tuple[float, float]:
    """One measurement in a fresh interpreter."""
    command = [sys.executable, __file__, "--payments", str(payments), "--child", sandbox, *(["--trace"] if trace else [])]
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{sandbox}: the measurement failed:\n{out.stderr[-3000:]}")
    grown, heap = (float(v) for v in out.stdout.split()[-2:])
    return grown, heap


if __name__ == "__main__":
    main()
