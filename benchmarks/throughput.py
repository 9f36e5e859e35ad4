"""Benchmark: happy-path payments per second against a no-op workflow per second, and the
latency of POST /payments at 8 and 64 concurrent clients.

A happy-path payment is checkout (POST /payments), the simulator's payer paying at once, its
callback, until the payment is SUCCEEDED in our database. The baseline is a workflow running
one no-op activity, on the same Temporal server in the same run (its worker in this process).
Both run at each concurrency level (that many at once, each starting the next when one ends);
the ratio is payments per second over no-op workflows per second.

    python benchmarks/throughput.py [--payments 60] [--concurrency 8,32] [--posts 256]
        [--layout one-process|processes|both] [--sqlite] [--temporal-address H:P] [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

from system import (
    StatusWatch,
    add_options,
    header,
    infrastructure,
    layouts,
    median,
    ms,
    new_order,
    pct,
    post_payment,
    script,
    settings_env,
    system,
)

import httpx
from temporalio.worker import Worker

from benchmarks.baseline import NoopWorkflow, noop_activity

DONE = frozenset({"SUCCEEDED"})
OVER = frozenset({"SUCCEEDED", "FAILED", "CLOSED", "IN_REVIEW"})


async def happy_rate(s, watch: StatusWatch, concurrency: int, count: int) -> tuple[float, list[float], int]:
    """(payments per second, POST -> SUCCEEDED seconds of each, failed) for ``count`` payments."""
    orders = [new_order("tp") for _ in range(count)]
    async with httpx.AsyncClient(base_url=s.simulator_url, timeout=30) as sim:
        await asyncio.gather(*(script(sim, order, pay="immediately") for order in orders))
    queue: asyncio.Queue[str] = asyncio.Queue()
    for order in orders:
        queue.put_nowait(order)
    latencies: list[float] = []
    failed = 0

    async def client(api: httpx.AsyncClient) -> None:
        nonlocal failed
        while not queue.empty():
            order = queue.get_nowait()
            started = time.perf_counter()
            response, _ = await post_payment(api, order, retries=10)
            if response.status_code not in (200, 201):
                failed += 1
                continue
            try:
                latencies.append(await watch.until(response.json()["payment_id"], DONE, timeout=120) - started)
            except asyncio.TimeoutError:
                failed += 1

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=s.api_url, headers=s.headers, timeout=60, limits=limits) as api:
        started = time.perf_counter()
        await asyncio.gather(*(client(api) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return len(latencies) / wall, latencies, failed


def cpu_per_payment(before: dict[str, float], after: dict[str, float], payments: int, what: str = "payment") -> str:
    """CPU milliseconds per payment of each process (the benchmark's clients and watcher included;
    for the no-op workflows, the benchmark process runs their worker)."""
    used = {name: (after[name] - before.get(name, 0.0)) * 1000 / max(payments, 1) for name in after}
    parts = ", ".join(f"{name} {value:.0f}" for name, value in sorted(used.items(), key=lambda item: -item[1]))
    return f"CPU per {what} {sum(used.values()):.0f} ms ({parts})"


async def noop_rate(client, task_queue: str, concurrency: int, count: int) -> float:
    remaining = list(range(count))

    async def one_at_a_time() -> None:
        while remaining:
            remaining.pop()
            await client.execute_workflow(NoopWorkflow.run, id=f"noop-{uuid.uuid4().hex}", task_queue=task_queue)

    started = time.perf_counter()
    await asyncio.gather(*(one_at_a_time() for _ in range(concurrency)))
    return count / (time.perf_counter() - started)


async def post_latency(s, watch: StatusWatch, clients: int, total: int) -> dict:
    """Each of ``clients`` POSTs its share of ``total`` checkouts one after another (no retries)."""
    orders = [new_order("post") for _ in range(total)]
    async with httpx.AsyncClient(base_url=s.simulator_url, timeout=30) as sim:
        await asyncio.gather(*(script(sim, order, pay="immediately") for order in orders))
    times: list[float] = []
    codes: dict[int, int] = {}
    accepted: list[str] = []
    missing_retry_after = 0

    async def client(api: httpx.AsyncClient, mine: list[str]) -> None:
        nonlocal missing_retry_after
        for order in mine:
            started = time.perf_counter()
            response, _ = await post_payment(api, order)
            times.append(time.perf_counter() - started)
            codes[response.status_code] = codes.get(response.status_code, 0) + 1
            if response.status_code in (429, 503) and "Retry-After" not in response.headers:
                missing_retry_after += 1
            if response.status_code in (200, 201):
                accepted.append(response.json()["payment_id"])

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=s.api_url, headers=s.headers, timeout=60, limits=limits) as api:
        await asyncio.gather(*(client(api, orders[i::clients]) for i in range(clients)))
    # Let them finish before the next measurement.
    await asyncio.gather(*(watch.until(p, OVER, timeout=300) for p in accepted), return_exceptions=True)
    return {
        "p50": pct(times, 50),
        "p99": pct(times, 99),
        "codes": codes,
        "5xx": sum(n for code, n in codes.items() if code >= 500 and code != 503),
        "refused": codes.get(429, 0) + codes.get(503, 0),
        "missing_retry_after": missing_retry_after,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payments", type=int, default=60, help="payments (and no-op workflows) per level")
    parser.add_argument("--concurrency", default="8,32", help="comma-separated concurrency levels")
    parser.add_argument("--posts", type=int, default=256, help="POST /payments per client count (8 and 64)")
    add_options(parser)
    args = parser.parse_args()
    extra_env = settings_env(args)
    levels = [int(c) for c in args.concurrency.split(",")]
    header("throughput: happy-path payments per second vs a no-op one-activity workflow per second", extra_env)
    print(
        f"database: {'SQLite' if args.sqlite else 'PostgreSQL'}; {args.payments} per level; "
        f"POST latency over {args.posts} checkouts"
    )
    rows = []
    async with infrastructure(args) as infra:
        client = await infra.client()
        noop_queue = f"bench-noop-{uuid.uuid4().hex[:6]}"
        async with Worker(client, task_queue=noop_queue, workflows=[NoopWorkflow], activities=[noop_activity]):
            watch = StatusWatch(infra.sessions)
            for layout in layouts(args.layout):
                async with system(infra, layout, extra_env, workers=args.workers) as s:
                    await happy_rate(s, watch, 4, 8)  # warm up
                    for level in levels:
                        before = {**s.cpu_seconds(), **infra.cpu_seconds()}
                        rate, latencies, failed = await happy_rate(s, watch, level, args.payments)
                        after = {**s.cpu_seconds(), **infra.cpu_seconds()}
                        noop_before = infra.cpu_seconds()
                        base = await noop_rate(client, noop_queue, level, args.payments)
                        noop_cpu = cpu_per_payment(noop_before, infra.cpu_seconds(), args.payments, "no-op workflow")
                        rows.append((layout, level, rate, base, latencies, failed))
                        print(
                            f"[{layout}] concurrency {level}: {rate:.1f} payments/s (POST -> SUCCEEDED p50 "
                            f"{ms(median(latencies))}, p99 {ms(pct(latencies, 99))}, {failed} failed); no-op "
                            f"{base:.1f} workflows/s; ratio {rate / base:.2f}",
                            flush=True,
                        )
                        print(f"[{layout}] concurrency {level}: {cpu_per_payment(before, after, len(latencies))}", flush=True)
                        print(f"[{layout}] concurrency {level}: {noop_cpu}", flush=True)
                    for clients in (8, 64):
                        figures = await post_latency(s, watch, clients, args.posts)
                        print(
                            f"[{layout}] POST /payments at {clients} clients: p50 {ms(figures['p50'])}, p99 "
                            f"{ms(figures['p99'])}; answers {dict(sorted(figures['codes'].items()))}; "
                            f"5xx other than 503: {figures['5xx']}; 429/503 without Retry-After: "
                            f"{figures['missing_retry_after']}",
                            flush=True,
                        )
    if len(layouts(args.layout)) == 2:
        for level in levels:
            one = next(r for r in rows if r[0] == "one-process" and r[1] == level)
            apart = next(r for r in rows if r[0] == "processes" and r[1] == level)
            print(f"concurrency {level}: processes/one-process payments per second x{apart[2] / one[2]:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
