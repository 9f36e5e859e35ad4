"""Reconciliation end to end: the simulator's settlement bill, our PostgreSQL, the payment
workflows. One difference of each class is made on purpose; each is classified and
repaired through the workflows, and a second run of the day repairs nothing again."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

import httpx
import pytest
from temporalio.client import WorkflowExecutionStatus

from tests.conftest import OPERATOR_HEADERS, Stack, new_order
from tests.helpers import mails_to, script, sim_trade, start_payment, wait_for, wait_status
from workflows.reconcile import RECONCILE_SCHEDULE_ID

TZ = ZoneInfo("Asia/Shanghai")  # PAYSENTINEL_SETTLEMENT_TIMEZONE (default)


@pytest.fixture
async def finance(stack: Stack):
    async with httpx.AsyncClient(base_url=stack.api_url, headers=OPERATOR_HEADERS, timeout=60) as http:
        yield http


async def reconcile(finance: httpx.AsyncClient, day, passes: int) -> dict:
    """Start the day's reconciliation and wait for its report (the ``passes``-th run)."""
    response = await finance.post(f"/operator/reconciliations/{day}")
    assert response.status_code == 202, response.text

    async def done():
        view = await finance.get(f"/operator/reconciliations/{day}")
        if view.status_code != 200:
            return None
        body = view.json()
        return body if body["report"]["status"] == "DONE" and body["report"]["passes"] == passes else None

    return await wait_for(done, timeout=90, what=f"reconciliation {day} pass {passes}")


async def ledger(sim: httpx.AsyncClient, order: str) -> dict:
    return (await sim.get(f"/control/ledger/{order}")).json()


async def paid_now(api, sim, prefix: str, **behaviour) -> tuple[str, str]:
    order = new_order(prefix)
    await script(sim, order, pay="immediately", **behaviour)
    payment_id = (await start_payment(api, order)).json()["payment_id"]
    await wait_status(api, payment_id, "SUCCEEDED")
    return order, payment_id


async def test_each_class_of_difference_is_found_and_repaired_once(api, sim, finance, mailbox):
    today = datetime.now(TZ).date()
    orders: dict[str, str] = {}

    # Paid at the provider, still open with us (callbacks lost, queries failing).
    orders["open_payment"] = new_order("rc-open")
    await script(sim, orders["open_payment"], pay="immediately", callback="drop",
                 faults={"query": {"mode": "error", "times": -1}})
    open_id = (await start_payment(api, orders["open_payment"], expires_in_seconds=300)).json()["payment_id"]
    # Paid at the provider for an order we never had.
    orders["unknown_order"] = new_order("rc-orphan")
    assert (await sim.post("/control/orphans", json={"out_trade_no": orders["unknown_order"],
                                                      "total_amount": "12.30"})).status_code == 200
    # Paid after we closed the order; its callback lost.
    orders["closed_order_paid"] = new_order("rc-closed")
    await script(sim, orders["closed_order_paid"], pay="never", after_close="pay", after_close_delay_seconds=0.5,
                 callback="drop")
    closed_id = (await start_payment(api, orders["closed_order_paid"], expires_in_seconds=5)).json()["payment_id"]
    # Paid twice; the second charge's callback lost.
    orders["duplicate_charge"], duplicate_id = await paid_now(
        api, sim, "rc-dup", callback="drop", second_charge=True, second_charge_delay_seconds=4)
    # The bill reports another amount / leaves a payment out / a refund amount differs.
    orders["amount_differs"], amount_id = await paid_now(api, sim, "rc-amount")
    orders["missing_at_provider"], missing_id = await paid_now(api, sim, "rc-missing")
    orders["refund_differs"], refunded_id = await paid_now(api, sim, "rc-refund")
    refund = await api.post(f"/payments/{refunded_id}/refunds", json={"amount_minor": 2000, "reason": "returned"},
                            headers={"Idempotency-Key": "r1"})
    assert refund.status_code == 202, refund.text
    await wait_for(lambda: _refund_done(api, refunded_id), what="the merchant refund")
    orders["refund_missing_at_provider"], refunded2_id = await paid_now(api, sim, "rc-refund-gone")
    refund2 = await api.post(f"/payments/{refunded2_id}/refunds", json={"amount_minor": 990, "reason": "returned"},
                             headers={"Idempotency-Key": "r1"})
    await wait_for(lambda: _refund_done(api, refunded2_id), what="the second merchant refund")
    # Paid just before midnight at the provider, just after it with us.
    orders["day_boundary"], _ = await paid_now(api, sim, "rc-edge")
    last_second = datetime.combine(today, time(), TZ) - timedelta(seconds=1)
    assert (await sim.post(f"/control/trades/{orders['day_boundary']}/paid-at",
                           json={"paid_at": last_second.isoformat()})).status_code == 200

    await wait_status(api, closed_id, "CLOSED")
    await wait_for(lambda: _paid_at_provider(sim, orders["closed_order_paid"]), what="the late payment")
    await wait_for(lambda: _second_charge(sim, orders["duplicate_charge"]), what="the second charge")
    assert (await api.get(f"/payments/{open_id}")).json()["status"] == "PENDING"
    adjust = {"amounts": {orders["amount_differs"]: "1.00"}, "drop_orders": [orders["missing_at_provider"]],
              "refund_amounts": {refund.json()["refund_id"]: "10.00"}, "drop_refunds": [refund2.json()["refund_id"]]}
    assert (await sim.put(f"/control/bills/{today}/adjustments", json=adjust)).status_code == 200

    first = await reconcile(finance, today, passes=1)
    mine = {d["order_id"]: d for d in first["discrepancies"] if d["order_id"] in orders.values()}
    assert {kind: mine[order]["kind"] for kind, order in orders.items() if order in mine} == {
        kind: kind for kind in orders}, first["discrepancies"]
    for kind in ("open_payment", "unknown_order", "closed_order_paid", "duplicate_charge", "amount_differs",
                 "missing_at_provider", "day_boundary"):
        assert mine[orders[kind]]["resolved"], mine[orders[kind]]
    for kind in ("refund_differs", "refund_missing_at_provider"):
        assert not mine[orders[kind]]["resolved"] and "needs an operator" in mine[orders[kind]]["resolution"]
    report = first["report"]
    assert report["rows"] >= len(orders) and report["unresolved"] >= 1
    assert report["classes"]["day_boundary"]["count"] >= 1

    # What the repairs did, seen from the payment, the provider's books and the reviews.
    view = await wait_status(api, open_id, "SUCCEEDED")
    assert any(e["event"] == "settlement" for e in view["timeline"])
    for order in (orders["unknown_order"], orders["closed_order_paid"]):
        await wait_for(lambda o=order: _net(sim, o, 0), what=f"{order} refunded at the provider")
    await wait_for(lambda: _net(sim, orders["duplicate_charge"], 9990), what="the second charge refunded")
    for payment_id in (amount_id, missing_id):
        view = await wait_status(api, payment_id, "IN_REVIEW")
        assert view["review_reason"] == "settlement_mismatch"
    await wait_status(api, duplicate_id, "SUCCEEDED")  # the extra charge refunded, the order still paid
    [alert] = await mails_to(mailbox, "ops@paysentinel.test", 1) and [
        m for m in mailbox.to("ops@paysentinel.test") if f"reconciliation {today}" in m["Subject"]]
    assert "need a person" in alert["Subject"]

    # The same day again: the same differences, nothing repaired a second time.
    books = {order: await ledger(sim, order) for order in orders.values()}
    second = await reconcile(finance, today, passes=2)
    again = {d["order_id"]: d for d in second["discrepancies"] if d["order_id"] in orders.values()}
    assert {o: (d["kind"], d["resolution"]) for o, d in again.items()} == {
        o: (d["kind"], d["resolution"]) for o, d in mine.items()}
    await asyncio.sleep(2)
    assert {order: await ledger(sim, order) for order in orders.values()} == books
    assert len([m for m in mailbox.to("ops@paysentinel.test") if f"reconciliation {today}" in m["Subject"]]) == 1


async def _refund_done(api, payment_id: str) -> bool:
    view = (await api.get(f"/payments/{payment_id}")).json()
    return bool(view["refunds"]) and view["refunds"][0]["status"] == "SUCCEEDED"


async def _paid_at_provider(sim, order: str) -> bool:
    return (await sim_trade(sim, order))["trade"]["trade_status"] == "TRADE_SUCCESS"


async def _second_charge(sim, order: str) -> bool:
    return bool((await sim_trade(sim, order))["extra_trades"])


async def _net(sim, order: str, expected: int) -> bool:
    books = await ledger(sim, order)
    return books["net_minor"] == expected and not any(r["refund_status"] == "REFUND_PROCESSING" for r in books["refunds"])


async def test_missed_days_are_caught_up_by_the_schedule(client, finance):
    handle = client.get_schedule_handle(RECONCILE_SCHEDULE_ID)
    described = await handle.describe()
    [calendar] = described.schedule.spec.calendars
    assert (calendar.hour[0].start, calendar.minute[0].start) == (3, 0)
    assert described.schedule.spec.time_zone_name == "Asia/Shanghai"

    today = datetime.now(TZ).date()
    missed = [today - timedelta(days=n) for n in (1, 2, 3)]  # PAYSENTINEL_RECONCILE_CATCHUP_DAYS=2
    await handle.trigger()

    async def caught_up():
        runs = [(await finance.get(f"/operator/reconciliations/{day}")) for day in missed]
        return all(r.status_code == 200 and r.json()["report"]["status"] == "DONE" for r in runs)

    await wait_for(caught_up, timeout=90, what=f"reconciliations of {missed}")

    def scheduled_runs_done(count: int):
        async def done():
            runs = [e async for e in client.list_workflows('WorkflowId STARTS_WITH "reconcile-daily"')]
            return len(runs) >= count and all(e.status == WorkflowExecutionStatus.COMPLETED for e in runs)
        return done

    await wait_for(scheduled_runs_done(1), timeout=60, what="the scheduled run to complete")
    # Once caught up, the next scheduled run finds nothing to do.
    await handle.trigger()
    await wait_for(scheduled_runs_done(2), timeout=60, what="the second scheduled run")
    for day in missed:
        assert (await finance.get(f"/operator/reconciliations/{day}")).json()["report"]["passes"] == 1


async def test_bad_reconciliation_requests_change_nothing(finance, stack):
    future = datetime.now(TZ).date() + timedelta(days=2)
    response = await finance.post(f"/operator/reconciliations/{future}")
    assert response.status_code == 422 and "has not started yet" in response.json()["error"]
    response = await finance.get("/operator/reconciliations/2001-01-01")
    assert response.status_code == 404 and "paysentinel reconcile run --date 2001-01-01" in response.json()["error"]
    assert (await finance.post("/operator/reconciliations/not-a-day")).status_code == 422
    assert (await finance.post("/operator/reconciliations/2001-01-01", params={"provider": "nope"})).status_code == 422
    async with httpx.AsyncClient(base_url=stack.api_url) as anonymous:
        assert (await anonymous.post("/operator/reconciliations/2001-01-01")).status_code == 401


async def test_finance_cli_runs_and_shows_a_day(stack):
    from tests.test_refunds_reviews_e2e import run_cli

    day = (datetime.now(TZ).date() - timedelta(days=9)).isoformat()
    ran = await asyncio.to_thread(run_cli, stack, "reconcile", "--date", day)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert f"reconciliation {day} (simulator)  DONE" in ran.stdout and "no differences" in ran.stdout
    again = await asyncio.to_thread(run_cli, stack, "reconcile", "run", "--date", day)
    assert again.returncode == 0 and "reconciled 2 time(s)" in again.stdout, again.stdout
    listed = await asyncio.to_thread(run_cli, stack, "reconcile", "list")
    assert listed.returncode == 0 and day in listed.stdout
    missing = await asyncio.to_thread(run_cli, stack, "reconcile", "show", "--date", "2001-01-01")
    assert missing.returncode == 1 and "paysentinel reconcile run --date 2001-01-01" in missing.stdout


async def test_a_bill_that_cannot_be_read_fails_the_run_and_says_why(sim, finance, mailbox):
    day = (datetime.now(TZ).date() - timedelta(days=12)).isoformat()
    broken = {"extra_lines": ["2026112322009999,broken-order,交易,x,2026-01-01 00:00:00,yesterday,CNY,1.00,1.00,,"]}
    assert (await sim.put(f"/control/bills/{day}/adjustments", json=broken)).status_code == 200
    assert (await finance.post(f"/operator/reconciliations/{day}")).status_code == 202

    async def failed():
        view = await finance.get(f"/operator/reconciliations/{day}")
        return view.json() if view.status_code == 200 and view.json()["report"]["status"] == "FAILED" else None

    view = await wait_for(failed, timeout=60, what=f"the run of {day} to fail")
    assert "cannot be read" in view["report"]["error"] and "line 6" in view["report"]["error"]
    assert view["discrepancies"] == []
    [alert] = [m for m in await mails_to(mailbox, "ops@paysentinel.test", 1)
               if f"reconciliation {day} (simulator): failed" in m["Subject"]] or [None]
    assert alert is not None and "reconcile run --date" in alert.get_content()

    # The provider sends a corrected bill: the day reconciles, and the failure is declared over once.
    assert (await sim.put(f"/control/bills/{day}/adjustments", json={})).status_code == 200
    assert (await reconcile(finance, day, passes=2))["report"]["error"] is None

    def about_the_day() -> list:
        return [m["Subject"] for m in mailbox.to("ops@paysentinel.test") if f"reconciliation {day} " in m["Subject"]]

    await wait_for(lambda: asyncio.sleep(0, len(about_the_day()) == 2), what="the all-clear")
    assert about_the_day()[1].endswith("resolved, no longer failing")


def test_bill_parser_reads_rows_and_refuses_bad_lines():
    from paysentinel.settlement import BillFormatError, parse_bill

    async def lines(*items: str):
        for item in items:
            yield item

    header = "支付宝交易号,商户订单号,业务类型,商品名称,创建时间,完成时间,币种,订单金额（元）,商家实收（元）,退款批次号/请求号,备注"

    async def read(*items: str):
        return [row async for row in parse_bill(lines(*items), TZ)]

    rows = asyncio.run(read("#支付宝业务明细查询", header,
                            "T1,o-1,交易,s,2026-11-22 23:59:59,2026-11-23 00:00:01,CNY,99.90,99.90,,",
                            "T1,o-1,退款,s,2026-11-22 23:59:59,2026-11-23 08:00:00,CNY,-20.00,-20.00,rf1,", "#end"))
    assert [(r.kind, r.amount_minor, r.refund_no, r.at.isoformat()) for r in rows] == [
        ("payment", 9990, "", "2026-11-22T16:00:01+00:00"), ("refund", 2000, "rf1", "2026-11-23T00:00:00+00:00")]
    with pytest.raises(BillFormatError, match="line 2: .*not-a-time"):
        asyncio.run(read(header, "T1,o-1,交易,s,x,not-a-time,CNY,1.00,1.00,,"))
    with pytest.raises(BillFormatError, match="column row lacks 商户订单号"):
        asyncio.run(read("支付宝交易号,业务类型,完成时间,币种,订单金额（元）,退款批次号/请求号"))
    with pytest.raises(BillFormatError, match="line 2"):
        asyncio.run(read(header, "T1,o-1,转账,s,x,2026-11-23 00:00:01,CNY,1.00,1.00,,"))
