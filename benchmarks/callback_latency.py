"""Benchmark: from the payer paying to SUCCEEDED in our database, against its floor.

Each payment is started and left PENDING (the simulator's payer does not pay); then, one at
a time, the payer pays (POST /control/trades/{order}/pay on the simulator, which sends the
signed callback to the webhook receiver at once) and we time until the row is SUCCEEDED.

The floor, measured in the same run: one HTTP round trip to the webhook receiver, one signal
to a waiting workflow, and one row write (an UPDATE committed) on the same database — what
a callback cannot do without. Prints p50/p99 of each and the ratio of the medians.

    python benchmarks/callback_latency.py [--payments 40] [--layout ...] [--sqlite]
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
from sqlalchemy import select, update
from temporalio.worker import Worker

from benchmarks.baseline import SignalWaitWorkflow
from paysentinel import db


async def floor(s, infra, client, samples: int) -> dict[str, list[float]]:
    queue = f"bench-signal-{uuid.uuid4().hex[:6]}"
    figures: dict[str, list[float]] = {"http": [], "signal": [], "write": []}
    async with Worker(client, task_queue=queue, workflows=[SignalWaitWorkflow]):
        handle = await client.start_workflow(
            SignalWaitWorkflow.run, samples, id=f"bench-wait-{uuid.uuid4().hex}", task_queue=queue
        )
        async with httpx.AsyncClient(base_url=s.webhook_url, timeout=10) as http:
            await http.get("/health")
            for _ in range(samples):
                started = time.perf_counter()
                (await http.get("/health")).raise_for_status()
                figures["http"].append(time.perf_counter() - started)
                started = time.perf_counter()
                await handle.signal(SignalWaitWorkflow.poke)
                figures["signal"].append(time.perf_counter() - started)
        # A row write: what the worker does to record the new status.
        async with infra.sessions() as session:
            payment_id = await session.scalar(select(db.Payment.payment_id).limit(1))
        for _ in range(samples):
            started = time.perf_counter()
            async with infra.sessions() as session:
                await session.execute(
                    update(db.Payment).where(db.Payment.payment_id == payment_id).values(updated_at=db.utcnow())
                )
                await session.commit()
            figures["write"].append(time.perf_counter() - started)
        await handle.result()
    return figures


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payments", type=int, default=40)
    add_options(parser)
    args = parser.parse_args()
    extra_env = settings_env(args)
    header("callback latency: the payer pays -> SUCCEEDED in the database, and its floor", extra_env)
    print(f"database: {'SQLite' if args.sqlite else 'PostgreSQL'}; {args.payments} payments, one at a time")
    async with infrastructure(args) as infra:
        client = await infra.client()
        watch = StatusWatch(infra.sessions, interval=0.005)
        for layout in layouts(args.layout):
            async with system(infra, layout, extra_env, workers=args.workers) as s:
                orders = [new_order("cb") for _ in range(args.payments)]
                ids = {}
                async with (
                    httpx.AsyncClient(base_url=s.simulator_url, timeout=30) as sim,
                    httpx.AsyncClient(base_url=s.api_url, headers=s.headers, timeout=60) as api,
                ):
                    for order in orders:
                        await script(sim, order, pay="never")
                        response, _ = await post_payment(api, order, retries=10)
                        response.raise_for_status()
                        ids[order] = response.json()["payment_id"]
                    await asyncio.gather(*(watch.until(p, {"PENDING"}) for p in ids.values()))
                    await asyncio.sleep(1)
                    latencies = []
                    for order, payment_id in ids.items():
                        started = time.perf_counter()
                        (await sim.post(f"/control/trades/bench-{order}/pay")).raise_for_status()
                        latencies.append(await watch.until(payment_id, {"SUCCEEDED"}, timeout=60) - started)
                parts = await floor(s, infra, client, args.payments)
            base = sum(median(v) for v in parts.values())
            print(f"[{layout}] pay -> SUCCEEDED: p50 {ms(median(latencies))}, p99 {ms(pct(latencies, 99))}")
            print(
                f"[{layout}] floor: HTTP round trip p50 {ms(median(parts['http']))}, signal p50 "
                f"{ms(median(parts['signal']))}, row write p50 {ms(median(parts['write']))}; sum of medians "
                f"{ms(base)}"
            )
            print(f"[{layout}] ratio (pay -> SUCCEEDED p50) / floor: {median(latencies) / base:.1f}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
