"""Reconciliation end to end: the simulator's settlement bill, our PostgreSQL, the payment
workflows. One difference of each class is made on purpose; each is classified and
repaired through the workflows, resolved once our database shows the money agreeing, and
a second run of the day repairs nothing again."""

from __future__ import annotations

import asyncio
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

import httpx
import pytest
from temporalio.client import WorkflowExecutionStatus

from sqlalchemy import select
from temporalio.testing import ActivityEnvironment

from paysentinel import db
from tests.conftest import new_order
from tests.helpers import events, mails_to, reconcile, payment_row, provider_order, script, start_payment, wait_for, wait_status
from workflows.reconcile import RECONCILE_SCHEDULE_ID

TZ = ZoneInfo("Asia/Shanghai")  # PAYSENTINEL_SETTLEMENT_TIMEZONE (default)


async def ledger(sim: httpx.AsyncClient, order: str) -> dict:
    return (await sim.get(f"/control/ledger/{order}")).json()


async def paid_now(api, sim, prefix: str, **behaviour) -> tuple[str, str]:
    """A payment of merchant A paid now: (its internal order number, as the provider and reconciliation
    know it, and its payment id)."""
    order = new_order(prefix)
    await script(sim, order, pay="immediately", **behaviour)
    payment_id = (await start_payment(api, order)).json()["payment_id"]
    await wait_status(api, payment_id, "SUCCEEDED")
    return provider_order(order), payment_id


async def test_each_class_of_difference_is_found_and_repaired_once(api, sim, finance, mailbox, sessions, client):
    today = datetime.now(TZ).date()
    orders: dict[str, str] = {}

    # Paid at the provider, still open with us (callbacks lost, queries failing).
    orders["open_payment"] = new_order("rc-open")
    await script(
        sim, orders["open_payment"], pay="immediately", callback="drop", faults={"query": {"mode": "error", "times": -1}}
    )
    open_id = (await start_payment(api, orders["open_payment"], expires_in_seconds=300)).json()["payment_id"]
    orders["open_payment"] = provider_order(orders["open_payment"])  # from here on: internal order numbers
    # Paid at the provider for an order we never had.
    orders["unknown_order"] = new_order("rc-orphan")
    assert (
        await sim.post("/control/orphans", json={"out_trade_no": orders["unknown_order"], "total_amount": "12.30"})
    ).status_code == 200
    # Paid after we closed the order; its callback lost.
    orders["closed_order_paid"] = new_order("rc-closed")
    await script(sim, orders["closed_order_paid"], pay="never", after_close="pay", after_close_delay_seconds=0.5, callback="drop")
    closed_id = (await start_payment(api, orders["closed_order_paid"], expires_in_seconds=5)).json()["payment_id"]
    orders["closed_order_paid"] = provider_order(orders["closed_order_paid"])
    # Paid twice; the second charge's callback lost.
    orders["duplicate_charge"], duplicate_id = await paid_now(
        api, sim, "rc-dup", callback="drop", second_charge=True, second_charge_delay_seconds=4
    )
    # The bill reports another amount / leaves a payment out / a refund amount differs.
    orders["amount_differs"], amount_id = await paid_now(api, sim, "rc-amount")
    orders["missing_at_provider"], missing_id = await paid_now(api, sim, "rc-missing")
    orders["refund_differs"], refunded_id = await paid_now(api, sim, "rc-refund")
    refund = await api.post(
        f"/payments/{refunded_id}/refunds", json={"amount_minor": 2000, "reason": "returned"}, headers={"Idempotency-Key": "r1"}
    )
    assert refund.status_code == 202, refund.text
    await wait_for(lambda: _refund_done(api, refunded_id), what="the merchant refund")
    orders["refund_missing_at_provider"], refunded2_id = await paid_now(api, sim, "rc-refund-gone")
    refund2 = await api.post(
        f"/payments/{refunded2_id}/refunds", json={"amount_minor": 990, "reason": "returned"}, headers={"Idempotency-Key": "r1"}
    )
    await wait_for(lambda: _refund_done(api, refunded2_id), what="the second merchant refund")
    # Paid just before midnight at the provider, just after it with us.
    orders["day_boundary"], _ = await paid_now(api, sim, "rc-edge")
    last_second = datetime.combine(today, time(), TZ) - timedelta(seconds=1)
    assert (
        await sim.post(f"/control/trades/{orders['day_boundary']}/paid-at", json={"paid_at": last_second.isoformat()})
    ).status_code == 200

    await wait_status(api, closed_id, "CLOSED")
    await wait_for(lambda: _paid_at_provider(sim, orders["closed_order_paid"]), what="the late payment")
    await wait_for(lambda: _second_charge(sim, orders["duplicate_charge"]), what="the second charge")
    assert (await api.get(f"/payments/{open_id}")).json()["status"] == "PENDING"
    adjust = {
        "amounts": {orders["amount_differs"]: "1.00"},
        "drop_orders": [orders["missing_at_provider"]],
        "refund_amounts": {refund.json()["refund_id"]: "10.00"},
        "drop_refunds": [refund2.json()["refund_id"]],
    }
    assert (await sim.put(f"/control/bills/{today}/adjustments", json=adjust)).status_code == 200

    first = await reconcile(finance, client, today, passes=1)
    mine = {d["order_id"]: d for d in first["discrepancies"] if d["order_id"] in orders.values()}
    assert {kind: mine[order]["kind"] for kind, order in orders.items() if order in mine} == {kind: kind for kind in orders}, (
        first["discrepancies"]
    )
    # Acted on, and resolved only once our database shows the money agreeing: the run waits
    # (PAYSENTINEL_RECONCILE_VERIFY_WAIT_SECONDS) for its refunds and payment workflows.
    for kind in ("open_payment", "unknown_order", "closed_order_paid", "duplicate_charge"):
        item = mine[orders[kind]]
        assert "waiting for the money to agree" in item["resolution"] and item["resolved"], item
        assert "; verified: " in item["resolution"], item
    item = mine[orders["amount_differs"]]
    assert "waiting for the money to agree" in item["resolution"] and not item["resolved"], item  # a review
    # decides; our record still differs
    assert mine[orders["day_boundary"]]["resolved"]
    assert not mine[orders["missing_at_provider"]]["resolved"]  # a settlement_mismatch review: a person decides
    for kind in ("refund_differs", "refund_missing_at_provider"):
        assert not mine[orders[kind]]["resolved"] and "needs an operator" in mine[orders[kind]]["resolution"]
    report = first["report"]
    assert report["status"] == "PROVISIONAL"  # today is not over: the schedule reconciles it again
    assert report["rows"] >= len(orders) and report["unresolved"] >= 4
    assert report["classes"]["day_boundary"]["count"] >= 1

    # What the repairs did, seen from the payment, the provider's books and the reviews.
    view = await wait_status(api, open_id, "SUCCEEDED")
    assert any(e["event"] == "settlement" for e in view["timeline"])
    for order in (orders["unknown_order"], orders["closed_order_paid"]):
        await wait_for(lambda o=order: _net(sim, o, 0), what=f"{order} refunded at the provider")
    await wait_for(lambda: _net(sim, orders["duplicate_charge"], 9990), what="the second charge refunded")
    for kind in ("unknown_order", "closed_order_paid", "duplicate_charge"):
        await wait_for(lambda o=orders[kind]: _refund_recorded(sessions, o), what=f"our refund of {kind}")
    for payment_id in (amount_id, missing_id):
        view = (await api.get(f"/payments/{payment_id}")).json()
        assert view["review_reason"] == "settlement_mismatch" and events(view, "review opened"), view
    await wait_status(api, duplicate_id, "SUCCEEDED")  # the extra charge refunded, the order still paid
    [alert] = await mails_to(mailbox, "ops@paysentinel.test", 1) and [
        m for m in mailbox.to("ops@paysentinel.test") if f"reconciliation {today} (simulator)" in m["Subject"]
    ]
    assert "need a person" in alert["Subject"]

    # The same day again: what was resolved stays resolved, the others stay as they were, and
    # nothing is repaired a second time.
    books = {order: await ledger(sim, order) for order in orders.values()}
    second = await reconcile(finance, client, today, passes=2)
    again = {d["order_id"]: d for d in second["discrepancies"] if d["order_id"] in orders.values()}
    assert {o: d["kind"] for o, d in again.items()} == {o: d["kind"] for o, d in mine.items()}
    for kind in ("open_payment", "unknown_order", "closed_order_paid", "duplicate_charge"):
        item = again[orders[kind]]
        assert item["resolved"] and "; verified: " in item["resolution"], item
        assert item["resolution"].startswith(mine[orders[kind]]["resolution"].split("; verified: ")[0]), item
    for kind in ("amount_differs", "missing_at_provider", "refund_differs", "refund_missing_at_provider"):
        assert again[orders[kind]] == mine[orders[kind]]
    assert second["report"]["unresolved"] <= first["report"]["unresolved"]
    await asyncio.sleep(2)
    assert {order: await ledger(sim, order) for order in orders.values()} == books
    assert len([m for m in mailbox.to("ops@paysentinel.test") if f"reconciliation {today} (simulator)" in m["Subject"]]) == 1


async def _refund_done(api, payment_id: str) -> bool:
    view = (await api.get(f"/payments/{payment_id}")).json()
    return bool(view["refunds"]) and view["refunds"][0]["status"] == "SUCCEEDED"


async def _refund_recorded(sessions, order: str) -> bool:
    async with sessions() as session:
        return bool(
            (await session.scalars(select(db.Refund).where(db.Refund.order_id == order, db.Refund.status == "SUCCEEDED"))).all()
        )


async def _trade(sim, order: str) -> dict:
    """The simulator's trade of an internal order number."""
    response = await sim.get(f"/control/trades/{order}")
    assert response.status_code == 200, response.text
    return response.json()


async def _paid_at_provider(sim, order: str) -> bool:
    return (await _trade(sim, order))["trade"]["trade_status"] == "TRADE_SUCCESS"


async def _second_charge(sim, order: str) -> bool:
    return bool((await _trade(sim, order))["extra_trades"])


async def _net(sim, order: str, expected: int) -> bool:
    books = await ledger(sim, order)
    return books["net_minor"] == expected and not any(r["refund_status"] == "REFUND_PROCESSING" for r in books["refunds"])


async def test_missed_days_are_caught_up_by_the_schedule_and_a_failed_day_blocks_none(client, finance, sim):
    handle = client.get_schedule_handle(RECONCILE_SCHEDULE_ID)
    described = await handle.describe()
    [calendar] = described.schedule.spec.calendars
    assert (calendar.hour[0].start, calendar.minute[0].start) == (3, 0)
    assert described.schedule.spec.time_zone_name == "Asia/Shanghai"

    today = datetime.now(TZ).date()
    missed = [today - timedelta(days=n) for n in (1, 2, 3)]  # PAYSENTINEL_RECONCILE_CATCHUP_DAYS=2
    # The middle day's bill cannot be read: that day fails, the days before and after it do not wait.
    broken = {"extra_lines": ["2026112322009998,broken-order,交易,x,2026-01-01 00:00:00,yesterday,CNY,1.00,1.00,,"]}
    assert (await sim.put(f"/control/bills/{missed[1]}/adjustments", json=broken)).status_code == 200
    await handle.trigger()

    async def statuses():
        runs = [(await finance.get(f"/operator/reconciliations/{day}")) for day in missed]
        return [r.json()["report"]["status"] if r.status_code == 200 else None for r in runs]

    async def caught_up_but_one():
        return await statuses() == ["DONE", "FAILED", "DONE"]

    await wait_for(caught_up_but_one, timeout=90, what=f"reconciliations of {missed}")

    async def scheduled_run():
        return [e async for e in client.list_workflows('WorkflowId STARTS_WITH "reconcile-daily"')]

    [scheduled] = await wait_for(scheduled_run, what="the scheduled run in the workflow list")
    result = await client.get_workflow_handle(scheduled.id, run_id=scheduled.run_id).result()
    assert [line.split(":")[0] for line in result] == [str(day) for day in reversed(missed)]
    assert f"{missed[1]}: failed: " in result[1] and "cannot be read" in result[1], result

    # The provider corrects the bill: the next scheduled run reconciles the failed day only.
    assert (await sim.put(f"/control/bills/{missed[1]}/adjustments", json={})).status_code == 200
    await handle.trigger()

    async def caught_up():
        return await statuses() == ["DONE", "DONE", "DONE"]

    await wait_for(caught_up, timeout=90, what=f"reconciliation of {missed[1]} once its bill is readable")

    def scheduled_runs_done(count: int):
        async def done():
            runs = [e async for e in client.list_workflows('WorkflowId STARTS_WITH "reconcile-daily"')]
            return len(runs) >= count and all(e.status == WorkflowExecutionStatus.COMPLETED for e in runs)

        return done

    await wait_for(scheduled_runs_done(2), timeout=60, what="the scheduled runs to complete")
    # Once caught up, the next scheduled run finds nothing to do.
    await handle.trigger()
    await wait_for(scheduled_runs_done(3), timeout=60, what="the third scheduled run")
    passes = [(await finance.get(f"/operator/reconciliations/{day}")).json()["report"]["passes"] for day in missed]
    assert passes == [1, 2, 1]


async def test_bad_reconciliation_requests_change_nothing(finance, stack):
    future = datetime.now(TZ).date() + timedelta(days=2)
    response = await finance.post(f"/operator/reconciliations/{future}")
    assert response.status_code == 422 and "has not started yet" in response.json()["error"]
    response = await finance.get("/operator/reconciliations/2001-01-01")
    assert response.status_code == 404 and "paysentinel reconcile run --date 2001-01-01" in response.json()["error"]
    assert (await finance.post("/operator/reconciliations/not-a-day")).status_code == 422
    assert (await finance.post("/operator/reconciliations/2001-01-01", params={"provider": "nope"})).status_code == 422
    async with httpx.AsyncClient(base_url=stack.operator_url) as anonymous:
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


async def test_a_bill_that_cannot_be_read_fails_the_run_and_says_why(sim, finance, mailbox, client):
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

    async def failure_alert():
        return [m for m in mailbox.to("ops@paysentinel.test") if f"reconciliation {day} (simulator): failed" in m["Subject"]]

    [alert] = await wait_for(failure_alert, what=f"the alert about {day}")
    assert "reconcile run --date" in alert.get_content()

    # The provider sends a corrected bill: the day reconciles, and the failure is declared over once.
    assert (await sim.put(f"/control/bills/{day}/adjustments", json={})).status_code == 200
    assert (await reconcile(finance, client, day, passes=2))["report"]["error"] is None

    def about_the_day() -> list:
        return [m["Subject"] for m in mailbox.to("ops@paysentinel.test") if f"reconciliation {day} (simulator)" in m["Subject"]]

    await wait_for(lambda: asyncio.sleep(0, len(about_the_day()) == 2), what="the all-clear")
    assert about_the_day()[1].endswith("resolved, no longer failing")


async def reconcile_again(finance: httpx.AsyncClient, client, day) -> dict:
    """Run the day once more and wait for that run's report."""
    before = await finance.get(f"/operator/reconciliations/{day}")
    passes = before.json()["report"]["passes"] if before.status_code == 200 else 0
    return await reconcile(finance, client, day, passes + 1)


async def paid_on(api, sim, prefix: str, at: datetime, **payment) -> str:
    """An order paid now, which the provider's bill counts at ``at``."""
    order = new_order(prefix)
    await script(sim, order, pay="immediately")
    payment_id = (await start_payment(api, order, **payment)).json()["payment_id"]
    await wait_status(api, payment_id, "SUCCEEDED")
    await move_paid_at(sim, provider_order(order), at)
    return provider_order(order)  # what the provider's bill and the reconciliation report show


async def move_paid_at(sim, order: str, at: datetime) -> None:
    response = await sim.post(f"/control/trades/{order}/paid-at", json={"paid_at": at.isoformat()})
    assert response.status_code == 200, response.text


def of_order(view: dict, order: str, kind: str | None = None) -> dict:
    [item] = [d for d in view["discrepancies"] if d["order_id"] == order and kind in (None, d["kind"])]
    return item


async def test_a_corrected_bill_replaces_the_loaded_rows_and_a_subject_may_hold_line_breaks(api, sim, finance, sessions, client):
    day = datetime.now(TZ).date() - timedelta(days=20)
    noon = datetime.combine(day, time(12), TZ)
    two_lines = await paid_on(api, sim, "rc-lines", noon, subject='Coffee beans\n2 x 500 g, "dark"')
    corrected = await paid_on(api, sim, "rc-fixed", noon)
    assert (await sim.put(f"/control/bills/{day}/adjustments", json={"amounts": {corrected: "1.00"}})).status_code == 200

    first = await reconcile_again(finance, client, day)
    assert first["report"]["status"] == "DONE" and first["report"]["error"] is None
    assert of_order(first, two_lines)["kind"] == "day_boundary"  # read, and matched (we recorded it today)
    assert of_order(first, corrected)["kind"] == "amount_differs" and not of_order(first, corrected)["resolved"]

    # The provider corrects its bill: the next run loads the bill as it is served now.
    assert (await sim.put(f"/control/bills/{day}/adjustments", json={})).status_code == 200
    second = await reconcile_again(finance, client, day)
    async with sessions() as session:
        amounts = (
            await session.scalars(
                select(db.SettlementRowRecord.amount_minor).where(
                    db.SettlementRowRecord.bill_date == day.isoformat(), db.SettlementRowRecord.order_id == corrected
                )
            )
        ).all()
    assert amounts == [9990]
    item = of_order(second, corrected, "amount_differs")
    assert item["resolved"] and item["resolution"].startswith("no longer a difference"), item
    assert of_order(second, corrected, "day_boundary")["resolved"]  # matched now (we recorded it today)
    assert second["report"]["rows"] == first["report"]["rows"] == 2
    assert second["report"]["classes"]["amount_differs"]["unresolved"] == 0


async def test_unknown_orders_above_the_automatic_refund_limit_wait_for_a_person(sim, finance, client):
    day = datetime.now(TZ).date() - timedelta(days=21)
    order = new_order("rc-big-orphan")  # 20,000.00 CNY: above PAYSENTINEL_RECONCILE_AUTO_REFUND_MAX_MINOR (10,000.00)
    assert (await sim.post("/control/orphans", json={"out_trade_no": order, "total_amount": "20000.00"})).status_code == 200
    await move_paid_at(sim, order, datetime.combine(day, time(12), TZ))

    view = await reconcile_again(finance, client, day)
    item = of_order(view, order)
    assert item["kind"] == "unknown_order" and not item["resolved"], item
    assert item["resolution"].startswith("needs an operator: above the automatic refund limit"), item
    assert "10000.00 CNY a day" in item["resolution"]
    assert view["report"]["classes"]["unknown_order"]["unresolved"] == 1 and view["report"]["unresolved"] >= 1
    await asyncio.sleep(2)
    assert (await ledger(sim, order))["refunded_minor"] == 0


async def test_a_reconciliation_refund_is_verified_and_booked_on_the_finished_payment(api, sim, finance, sessions, client):
    day = datetime.now(TZ).date() - timedelta(days=22)
    order = new_order("rc-late")
    await script(sim, order, pay="never", after_close="pay", after_close_delay_seconds=0.5, callback="drop")
    payment_id = (await start_payment(api, order, expires_in_seconds=5)).json()["payment_id"]
    order = provider_order(order)  # the provider's and reconciliation's order number
    await wait_status(api, payment_id, "CLOSED")
    await wait_for(lambda: _paid_at_provider(sim, order), what="the late payment")

    async def finished():  # its late-callback window is over: nobody else will refund it
        return (await client.get_workflow_handle(payment_id).describe()).status == WorkflowExecutionStatus.COMPLETED

    await wait_for(finished, timeout=30, what=f"{payment_id} to finish")
    await move_paid_at(sim, order, datetime.combine(day, time(12), TZ))

    first = await reconcile_again(finance, client, day)
    item = of_order(first, order)
    assert item["kind"] == "closed_order_paid" and item["resolved"], item  # the run waited for its refund
    assert item["resolution"].startswith(
        f"refund started (reconcile-refund-simulator-{item['trade_no']}), waiting for the money to agree; verified: trade"
    ), item
    assert first["report"]["classes"]["closed_order_paid"]["unresolved"] == 0

    # The refund succeeds: the payment row now shows what was taken and given back.
    await wait_for(lambda: _refund_recorded(sessions, order), what="the reconciliation refund")
    row = await payment_row(sessions, payment_id, "REFUNDED")
    assert (row.status, row.paid_amount_minor, row.refunded_minor) == ("REFUNDED", 9990, 9990)

    second = await reconcile_again(finance, client, day)
    assert of_order(second, order) == item  # nothing refunded again
    assert second["report"]["classes"]["closed_order_paid"]["unresolved"] == 0
    assert (await ledger(sim, order))["refunded_minor"] == 9990


async def test_find_missing_heartbeats_after_each_provider_query(stack, sessions):
    from activities.reconcile import ReconciliationActivities
    from paysentinel.config import Settings
    from paysentinel.models import ReconcileStep
    from paysentinel.providers import build_providers

    day = datetime.now(TZ).date() - timedelta(days=23)
    orders = [new_order("rc-beat") for _ in range(3)]
    async with sessions() as session:  # paid with us on the day, unknown to the provider
        session.add_all(
            [
                db.Payment(
                    payment_id=f"payment-{o}",
                    order_id=o,
                    provider="simulator",
                    amount_minor=100,
                    currency="CNY",
                    status="SUCCEEDED",
                    trade_no=f"T-{o}",
                    paid_amount_minor=100,
                    paid_at=datetime.combine(day, time(12), TZ),
                )
                for o in orders
            ]
        )
        await session.commit()
    settings = Settings(simulator_url=stack.simulator_url)
    beats: list = []
    environment = ActivityEnvironment()
    environment.on_heartbeat = lambda *details: beats.append(details[0])
    async with httpx.AsyncClient() as http:
        activities = ReconciliationActivities(sessions, build_providers(settings, http), None, settings)
        result = await environment.run(activities.find_missing, ReconcileStep(provider="simulator", day=day, limit=100))
    assert result.handled == 3
    assert beats == [f"{n} of 3 payments queried" for n in (1, 2, 3)]


async def test_a_control_character_in_a_checkout_is_a_readable_422(api):
    response = await api.post(
        "/payments",
        json={"order_id": new_order("rc-nul"), "amount_minor": 100, "currency": "CNY", "subject": "coffee\u0000beans"},
    )
    assert response.status_code == 422, response.text
    problems = response.json()["problems"]
    assert any(p.startswith("subject") and "control characters (found U+0000)" in p for p in problems), problems


def test_bill_parser_reads_rows_and_refuses_bad_lines():
    from paysentinel.settlement import BillFormatError, parse_bill

    async def lines(*items: str):
        for item in items:
            yield item + "\n"

    header = (
        "支付宝交易号,商户订单号,业务类型,商品名称,创建时间,完成时间,币种,订单金额（元）,商家实收（元）,退款批次号/请求号,备注"
    )

    async def read(*items: str):
        return [row async for row in parse_bill(lines(*items), TZ)]

    rows = asyncio.run(
        read(
            "#支付宝业务明细查询",
            header,
            "T1,o-1,交易,s,2026-11-22 23:59:59,2026-11-23 00:00:01,CNY,99.90,99.90,,",
            "T1,o-1,退款,s,2026-11-22 23:59:59,2026-11-23 08:00:00,CNY,-20.00,-20.00,rf1,",
            "#end",
        )
    )
    assert [(r.kind, r.amount_minor, r.refund_no, r.at.isoformat()) for r in rows] == [
        ("payment", 9990, "", "2026-11-22T16:00:01+00:00"),
        ("refund", 2000, "rf1", "2026-11-23T00:00:00+00:00"),
    ]
    with pytest.raises(BillFormatError, match="line 2: .*not-a-time"):
        asyncio.run(read(header, "T1,o-1,交易,s,x,not-a-time,CNY,1.00,1.00,,"))
    with pytest.raises(BillFormatError, match="column row lacks 商户订单号"):
        asyncio.run(read("支付宝交易号,业务类型,完成时间,币种,订单金额（元）,退款批次号/请求号"))
    with pytest.raises(BillFormatError, match="line 2"):
        asyncio.run(read(header, "T1,o-1,转账,s,x,2026-11-23 00:00:01,CNY,1.00,1.00,,"))
