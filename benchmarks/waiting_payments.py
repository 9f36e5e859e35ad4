"""Benchmark: many payments waiting at once, and a happy-path payment while they wait.

Starts N payments (time to live one hour, the payer never pays) at once from many clients
(each retrying a 429/503 after its Retry-After, up to ``--retries`` times, as a merchant's
checkout would), then prints: failed starts
(and refusals retried), how many are left CREATED (a started payment reaches PENDING once
its trade is created), the worker's resident memory, the Temporal SDK's workflow cache and
its forced evictions, and POST -> SUCCEEDED of happy-path payments one after another while
the N wait (their query timers fire meanwhile). The target is 10,000 waiting payments with
the worker under 1 GiB.

    python benchmarks/waiting_payments.py [--waiting 1000] [--clients 64] [--happy 20]
        [--cache N] [--layout ...] [--sqlite]
"""

from __future__ import annotations

import argparse
import asyncio
import time

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
from sqlalchemy import func, select

from paysentinel import db


async def start_waiting(s, count: int, clients: int, retries: int) -> tuple[list[str], int, int, dict[int, int], float]:
    """(payment ids, failed starts, refusals retried, final answers, seconds)."""
    orders = [new_order("wait") for _ in range(count)]
    ids: list[str] = []
    failed = retried = 0
    answers: dict[int, int] = {}

    async def client(api: httpx.AsyncClient, mine: list[str]) -> None:
        nonlocal failed, retried
        for order in mine:
            try:
                response, refusals = await post_payment(api, order, retries=retries, expires_in_seconds=3600)
            except httpx.HTTPError:
                failed += 1
                continue
            retried += refusals
            answers[response.status_code] = answers.get(response.status_code, 0) + 1
            if response.status_code in (200, 201):
                ids.append(response.json()["payment_id"])
            else:
                failed += 1

    limits = httpx.Limits(max_connections=clients + 4)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=s.api_url, headers=s.headers, timeout=120, limits=limits) as api:
        await asyncio.gather(*(client(api, orders[i::clients]) for i in range(clients)))
    return ids, failed, retried, answers, time.perf_counter() - started


async def count_status(sessions, prefix: str, status: str) -> int:
    async with sessions() as session:
        return await session.scalar(
            select(func.count())
            .select_from(db.Payment)
            .where(db.Payment.order_id.startswith(prefix), db.Payment.status == status)
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waiting", type=int, default=1000, help="payments waiting at once (the target: 10000)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--happy", type=int, default=20, help="happy-path payments timed while they wait")
    parser.add_argument("--settle", type=float, default=300, help="longest wait for none to be CREATED (s)")
    parser.add_argument("--happy-timeout", type=float, default=120, help="longest wait for a happy payment (s)")
    parser.add_argument("--retries", type=int, default=100, help="how often a client retries a 429/503 (after Retry-After)")
    parser.add_argument("--cache", type=int, help="the worker's workflow cache (PAYSENTINEL_WORKER_MAX_CACHED_WORKFLOWS)")
    add_options(parser)
    args = parser.parse_args()
    extra_env = settings_env(args)
    header(f"waiting payments: {args.waiting} with a one-hour time to live, started at once by {args.clients} clients", extra_env)
    extra = {"PAYSENTINEL_WORKER_MAX_CACHED_WORKFLOWS": str(args.cache)} if args.cache is not None else {}
    print(
        f"database: {'SQLite' if args.sqlite else 'PostgreSQL'}; worker workflow cache: "
        f"{args.cache if args.cache is not None else 'default'}"
    )
    async with infrastructure(args) as infra:
        watch = StatusWatch(infra.sessions, interval=0.02)
        for layout in layouts(args.layout):
            async with system(infra, layout, {**extra, **extra_env}, workers=args.workers) as s:
                rss_idle = sum(current for current, _ in s.worker_rss_mib())
                ids, failed, retried, answers, took = await start_waiting(s, args.waiting, args.clients, args.retries)
                print(
                    f"[{layout}] started {len(ids)} in {took:.0f}s ({len(ids) / took:.1f}/s); failed starts "
                    f"{failed}; 429/503 answers retried {retried}; final answers {dict(sorted(answers.items()))}",
                    flush=True,
                )
                prefix = "bench-wait-"
                deadline = time.monotonic() + args.settle
                created = await count_status(infra.sessions, prefix, "CREATED")
                while created and time.monotonic() < deadline:
                    await asyncio.sleep(2)
                    created = await count_status(infra.sessions, prefix, "CREATED")
                pending = await count_status(infra.sessions, prefix, "PENDING")
                settled = time.perf_counter()
                print(f"[{layout}] left CREATED: {created}; PENDING: {pending}", flush=True)
                memory(s, layout, rss_idle, len(ids), "once started")
                latencies, late = [], 0
                async with (
                    httpx.AsyncClient(base_url=s.simulator_url, timeout=30) as sim,
                    httpx.AsyncClient(base_url=s.api_url, headers=s.headers, timeout=60) as api,
                ):
                    for _ in range(args.happy):
                        order = new_order("happy")
                        await script(sim, order, pay="immediately")
                        started = time.perf_counter()
                        response, _ = await post_payment(api, order, retries=10)
                        response.raise_for_status()
                        try:
                            latencies.append(
                                await watch.until(response.json()["payment_id"], {"SUCCEEDED"}, timeout=args.happy_timeout)
                                - started
                            )
                        except asyncio.TimeoutError:
                            late += 1
                print(
                    f"[{layout}] happy path while {len(ids)} wait: POST -> SUCCEEDED p50 {ms(median(latencies))}, "
                    f"p99 {ms(pct(latencies, 99))}; {late} of {args.happy} not SUCCEEDED within "
                    f"{args.happy_timeout:g}s (over {time.perf_counter() - settled:.0f}s)"
                )
                memory(s, layout, rss_idle, len(ids), "after the happy path")


def memory(s, layout: str, rss_idle: float, waiting: int, when: str) -> None:
    """The workers' memory (each process, and above their idle size per waiting payment) and cache."""
    sizes = s.worker_rss_mib()
    rss = sum(current for current, _ in sizes)
    each = ", ".join(f"{current:.0f} (peak {peak:.0f})" for current, peak in sizes)
    cached = s.sdk_metric("temporal_sticky_cache_size")
    evicted = s.sdk_metric("temporal_sticky_cache_total_forced_eviction")
    print(
        f"[{layout}] {when}: worker RSS {each} MiB in {len(sizes)} process(es), {rss_idle:.0f} MiB before; "
        f"{(rss - rss_idle) * 1024 / max(1, waiting):.0f} KiB per waiting payment; workflow cache "
        f"{cached:.0f}, forced evictions {evicted:.0f} (all workers)",
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main())
