"""Benchmark: history events per payment scenario.

Runs each scenario once through the checkout API with the simulator scripted as
tests/scenarios.py does, waits until the payment has its final status and its history has
stopped growing (short timings, so the late-callback window ends in seconds; the workflow
then stays open for refunds), and counts the events of its history (every run, if it
continued as new) and the most frequent event types.

- happy path: the payer pays at once, the callback arrives;
- lost callback: the payer pays at once, the callback is dropped: a query finds the payment;
- never pays: the payer never pays; the trade is closed at the provider when it expires.

    python benchmarks/history_size_system.py [--layout ...] [--sqlite]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter

from system import settings_env, add_options, header, infrastructure, new_order, post_payment, script, system

import httpx
from temporalio.client import WorkflowExecutionStatus

from paysentinel import db

# Short timings, as the tests use, so each scenario's workflow closes within a minute.
TIMINGS = {
    "PAYSENTINEL_CALLBACK_TIMEOUT_SECONDS": "1.5",
    "PAYSENTINEL_QUERY_BACKOFF_SECONDS": "0.5,1,1",
    "PAYSENTINEL_RESEND_WINDOW_SECONDS": "6",
    "PAYSENTINEL_CLOSE_ATTEMPTS": "2",
    "PAYSENTINEL_PROVIDER_RETRY_INITIAL_SECONDS": "0.2",
}
FINAL = ("SUCCEEDED", "FAILED", "CLOSED")
QUIET_SECONDS = 10  # past the 6 s late-callback window: no more events until a refund
SCENARIOS = {
    "happy path": ({"pay": "immediately"}, {}),
    "lost callback": ({"pay": "immediately", "callback": "drop"}, {}),
    "never pays": ({"pay": "never"}, {"expires_in_seconds": 5}),
}


async def events_of(client, sessions, payment_id: str, timeout: float = 120) -> tuple[int, int, Counter, str]:
    """(events over all runs, runs, event types, workflow status) once the payment has its final
    status and its history has stopped growing (a paid payment's workflow stays open for refunds)."""
    deadline = time.monotonic() + timeout
    while True:
        async with sessions() as session:
            row = await session.get(db.Payment, payment_id)
        if row is not None and row.status in FINAL:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{payment_id} not final after {timeout}s")
        await asyncio.sleep(0.5)
    last, stable_since = -1, time.monotonic()
    while True:
        total, runs, kinds, status = await _history(client, payment_id)
        if total != last:
            last, stable_since = total, time.monotonic()
        elif time.monotonic() - stable_since >= QUIET_SECONDS or status != "RUNNING":
            return total, runs, kinds, status
        if time.monotonic() > deadline:
            raise TimeoutError(f"{payment_id}'s history still growing after {timeout}s")
        await asyncio.sleep(1)


async def _history(client, workflow_id: str) -> tuple[int, int, Counter, str]:
    total, runs, kinds, statuses = 0, 0, Counter(), set()
    async for execution in client.list_workflows(f'WorkflowId = "{workflow_id}"'):
        history = await client.get_workflow_handle(workflow_id, run_id=execution.run_id).fetch_history()
        runs += 1
        total += len(history.events)
        kinds.update(type_name(e) for e in history.events)
        statuses.add(execution.status)
    closed = statuses - {WorkflowExecutionStatus.CONTINUED_AS_NEW}
    status = "RUNNING" if WorkflowExecutionStatus.RUNNING in statuses or not closed else closed.pop().name
    return total, runs, kinds, status


def type_name(event) -> str:
    from temporalio.api.enums.v1 import EventType

    return EventType.Name(event.event_type).removeprefix("EVENT_TYPE_")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(parser)
    args = parser.parse_args()
    extra_env = settings_env(args)
    header("history size: events per payment scenario", extra_env)
    async with infrastructure(args) as infra:
        client = await infra.client()
        async with system(infra, args.layout if args.layout != "both" else "one-process", {**TIMINGS, **extra_env}) as s:
            async with (
                httpx.AsyncClient(base_url=s.simulator_url, timeout=30) as sim,
                httpx.AsyncClient(base_url=s.api_url, headers=s.headers, timeout=60) as api,
            ):
                started = {}
                for name, (behaviour, extra) in SCENARIOS.items():
                    order = new_order("hist")
                    await script(sim, order, **behaviour)
                    response, _ = await post_payment(api, order, retries=10, **extra)
                    response.raise_for_status()
                    started[name] = response.json()["payment_id"]
                results = await asyncio.gather(*(events_of(client, infra.sessions, p) for p in started.values()))
        async with infra.sessions() as session:
            final = {p: (await session.get(db.Payment, p)).status for p in started.values()}
    for (name, payment_id), (total, runs, kinds, status) in zip(started.items(), results):
        common = ", ".join(f"{kind} {count}" for kind, count in kinds.most_common(4))
        print(f"{name}: {total} events in {runs} run(s); payment {final[payment_id]}, workflow {status.lower()} (most: {common})")


if __name__ == "__main__":
    asyncio.run(main())
