"""What operators see: Prometheus metrics, the monitor's alerts, logs with payment ids."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from datetime import timedelta

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from temporalio.client import WorkflowExecutionStatus

from paysentinel import db
from paysentinel.models import MonitorInput
from tests.conftest import new_order
from tests.helpers import provider_order, script, start_payment, wait_for, wait_status
from workflows.monitor import MONITOR_SCHEDULE_ID, MonitorWorkflow

OPS = "ops@paysentinel.test"  # PAYSENTINEL_ALERT_EMAIL of the test stack


async def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a /metrics page."""
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(url)
    assert response.status_code == 200, response.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_move_as_payments_complete(api, sim, stack):
    before = await scrape(f"{stack.api_url}/metrics")
    paid, down = new_order("m-paid"), new_order("m-down")
    await script(sim, paid, pay="immediately")
    await script(sim, down, faults={"create": {"mode": "error", "times": -1}})
    paid_id = (await start_payment(api, paid)).json()["payment_id"]
    down_id = (await start_payment(api, down)).json()["payment_id"]
    await wait_status(api, paid_id, "SUCCEEDED")
    await wait_status(api, down_id, "FAILED")

    async def counted():
        after = await scrape(f"{stack.api_url}/metrics")
        moved = value(after, "paysentinel_payments_final_total", status="FAILED", provider="simulator") - value(
            before, "paysentinel_payments_final_total", status="FAILED", provider="simulator"
        )
        return after if moved >= 1 else None

    after = await wait_for(counted, what="the FAILED payment to be counted")

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("paysentinel_payments_final_total", status="SUCCEEDED", provider="simulator") >= 1
    assert delta("paysentinel_payments_final_total", status="FAILED", provider="simulator") >= 1
    assert delta("paysentinel_time_to_final_seconds_count", status="SUCCEEDED") >= 1
    assert delta("paysentinel_callback_to_status_seconds_count") >= 1  # the paid callback became SUCCEEDED
    assert delta("paysentinel_callbacks_total", provider="simulator", result="delivered") >= 1
    # The failed create was retried (PAYSENTINEL_PROVIDER_MAX_ATTEMPTS=3): two retries.
    assert delta("paysentinel_provider_retries_total", provider="simulator", operation="create_trade") >= 2
    for gauge in ("paysentinel_open_reviews", "paysentinel_pending_payments", "paysentinel_oldest_open_review_seconds"):
        assert (gauge, ()) in after, f"{gauge} missing from /metrics"
    assert ("paysentinel_stuck_payments", (("kind", "open_past_ttl"),)) in after
    assert value(after, "paysentinel_stuck_payments", kind="open_past_ttl") == 0

    # A rejected callback is counted as such, on the receiver's own /metrics.
    async with httpx.AsyncClient(base_url=stack.webhook_url) as http:
        assert (await http.post("/webhooks/simulator", content=b"{}")).status_code == 401
    receiver = await scrape(f"{stack.webhook_url}/metrics")
    assert value(receiver, "paysentinel_callbacks_total", provider="simulator", result="rejected_signature") >= 1


async def test_temporal_sdk_worker_metrics_are_served(stack):
    samples = await scrape(stack.sdk_metrics_url)
    names = {name for name, _ in samples}
    assert any(name.startswith("temporal_") for name in names), sorted(names)[:20]
    assert any("workflow_task" in name or "worker_task_slots" in name for name in names), sorted(names)[:40]


async def _finished_failures(api, sim, count: int) -> None:
    orders = [new_order("mon") for _ in range(count)]
    for order in orders:
        await script(sim, order, faults={"create": {"mode": "error", "times": -1}})
    ids = [(await start_payment(api, order)).json()["payment_id"] for order in orders]
    await asyncio.gather(*(wait_status(api, payment_id, "FAILED") for payment_id in ids))


async def _run_monitor(client, stack, monitor: MonitorInput) -> list[str]:
    """The run's news, without incident numbers ("failure_rate: incident opened")."""
    news = await client.execute_workflow(
        MonitorWorkflow.run,
        monitor,
        id=f"monitor-test-{uuid.uuid4().hex[:8]}",
        task_queue=stack.task_queue,
        execution_timeout=timedelta(seconds=60),
    )
    return [re.sub(r"incident \d+ ", "incident ", line) for line in news]


async def _incidents(sessions, name: str) -> list[db.Alert]:
    async with sessions() as session:
        return list((await session.scalars(select(db.Alert).where(db.Alert.monitor == name).order_by(db.Alert.id))).all())


def _alerts(mailbox, name: str) -> list:
    return [m for m in mailbox.to(OPS) if f"(monitor {name})" in m["Subject"]]


async def test_monitor_alerts_once_per_incident(api, sim, stack, client, sessions, mailbox):
    name = f"m{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    await _finished_failures(api, sim, 4)

    def monitor(window: float) -> MonitorInput:
        return MonitorInput(name=name, window_seconds=window, failure_threshold=0.5, timeout_threshold=1.0, min_payments=3)

    def since_start() -> float:  # a window holding this test's payments (other tests' add a few at most)
        return time.monotonic() - started + 1

    assert await _run_monitor(client, stack, monitor(since_start())) == ["failure_rate: incident opened"]
    [opened] = await wait_for(lambda: asyncio.sleep(0, _alerts(mailbox, name) or None), what="the alert e-mail")
    assert "payment failure rate" in opened["Subject"] and "is above 50.0%" in opened["Subject"]
    body = opened.get_content()
    assert "payments finished in the last" in body and "What to do:" in body and "PaymentStatus" in body

    # The same incident again: nothing new is sent.
    assert await _run_monitor(client, stack, monitor(since_start())) == []
    [incident] = await _incidents(sessions, name)
    assert (incident.kind, incident.status) == ("failure_rate", "OPEN")

    # The failures leave the window: the incident is over, and that is said once.
    await asyncio.sleep(1)
    assert await _run_monitor(client, stack, monitor(0.5)) == ["failure_rate: incident resolved"]
    assert await _run_monitor(client, stack, monitor(0.5)) == []
    mails = await wait_for(
        lambda: asyncio.sleep(0, m if len(m := _alerts(mailbox, name)) >= 2 else None), what="the all-clear e-mail"
    )
    assert len(mails) == 2 and mails[1]["Subject"].startswith("[paysentinel] resolved: payment failure rate")
    [incident] = await _incidents(sessions, name)
    assert incident.status == "RESOLVED" and incident.resolved_at is not None

    # A new breach is a new incident, with its own alert.
    assert await _run_monitor(client, stack, monitor(since_start())) == ["failure_rate: incident opened"]
    assert [i.status for i in await _incidents(sessions, name)] == ["RESOLVED", "OPEN"]
    await wait_for(lambda: asyncio.sleep(0, len(_alerts(mailbox, name)) == 3), what="the second incident's alert")


async def test_monitor_runs_on_a_schedule(client, stack):
    handle = client.get_schedule_handle(MONITOR_SCHEDULE_ID)
    described = await handle.describe()
    [interval] = described.schedule.spec.intervals
    assert interval.every.total_seconds() == 3600  # PAYSENTINEL_MONITOR_INTERVAL_SECONDS
    assert described.schedule.action.workflow == "MonitorWorkflow"
    await handle.trigger()

    async def completed():
        async for execution in client.list_workflows(
            'WorkflowType = "MonitorWorkflow" AND WorkflowId STARTS_WITH "monitor-default"'
        ):
            if execution.status == WorkflowExecutionStatus.COMPLETED:
                return execution
        return None

    await wait_for(completed, timeout=30, what="a scheduled monitor run to complete")


async def test_log_lines_carry_payment_and_workflow_ids(api, sim, stack):
    order = new_order("logs")
    await script(sim, order, pay="immediately")
    payment_id = (await start_payment(api, order)).json()["payment_id"]
    await wait_status(api, payment_id, "SUCCEEDED")
    await asyncio.sleep(0.5)
    lines = [json.loads(line) for line in stack.log_file.read_text().splitlines() if line.startswith("{")]
    assert lines and all({"ts", "level", "logger", "message", "payment_id", "workflow_id"} <= set(line) for line in lines)
    mine = [line for line in lines if line["payment_id"] == payment_id]
    loggers = {line["logger"] for line in mine}
    assert {"temporalio.activity", "paysentinel.webhooks"} <= loggers, loggers
    assert all(line["workflow_id"] and line["workflow_id"].startswith(payment_id) for line in mine)
    # Lines that name the payment in their text carry its id as a field too.
    for line in lines:
        if payment_id in line["message"] and line["logger"] != "paysentinel.simulator":
            assert line["payment_id"] == payment_id, line


async def test_one_trace_from_checkout_through_the_workflow_to_the_provider(api, sim, stack):
    order = new_order("trace")
    await script(sim, order, pay="immediately")
    payment_id = (await start_payment(api, order)).json()["payment_id"]
    await wait_status(api, payment_id, "SUCCEEDED")

    def spans() -> list[dict]:
        return [json.loads(line) for line in stack.spans_file.read_text().splitlines()] if stack.spans_file.exists() else []

    [checkout] = [
        s for s in spans() if s["name"] == "checkout" and s["attributes"].get("paysentinel.order_id") == provider_order(order)
    ]
    expected = {
        "checkout",
        "StartUpdateWithStartWorkflow:PaymentWorkflow",  # the checkout starts it and waits in one request
        "RunWorkflow:PaymentWorkflow",
        "StartActivity:create_trade",
        "RunActivity:create_trade",
        "provider create_trade",
    }

    async def whole_trace():
        trace = [s for s in spans() if s["trace_id"] == checkout["trace_id"]]
        return trace if expected <= {s["name"] for s in trace} else None

    trace = await wait_for(whole_trace, what=f"the spans {sorted(expected)} in one trace")
    by_id = {s["span_id"]: s for s in trace}
    provider = next(s for s in trace if s["name"] == "provider create_trade")
    assert provider["attributes"]["paysentinel.order_id"] == provider_order(order)  # the internal order number
    # The provider call's ancestry leads back to the checkout span.
    chain, span = [], provider
    while span["parent_id"] in by_id:
        span = by_id[span["parent_id"]]
        chain.append(span["name"])
    assert "checkout" in chain and "RunActivity:create_trade" in chain, chain
