"""The provider simulator over real HTTP: trade semantics, faults, signed callbacks with resend."""

from __future__ import annotations

import asyncio

from tests.conftest import new_order
from tests import helpers
from tests.helpers import SIMULATOR_SECRET, receiver, wait_for


async def script(sim, order: str, **behaviour) -> None:
    """Script the simulator for its own order number (no merchant: the simulator alone)."""
    await helpers.script(sim, order, merchant=None, **behaviour)


async def sim_trade(sim, order: str) -> dict:
    return await helpers.sim_trade(sim, order, merchant=None)


def trade_body(order: str, amount: str = "12.30", **extra) -> dict:
    return {"out_trade_no": order, "total_amount": amount, "currency": "CNY", "subject": "sim test", **extra}


async def test_create_is_idempotent_by_order_number(sim):
    order = new_order("sim-create")
    first = await sim.post("/v1/trades", json=trade_body(order), headers={"Idempotency-Key": "k1"})
    again = await sim.post("/v1/trades", json=trade_body(order, "12.3"), headers={"Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 200
    assert first.json()["trade"]["trade_no"] == again.json()["trade"]["trade_no"]
    assert first.json()["trade"]["trade_status"] == "WAIT_BUYER_PAY"
    assert first.json()["trade"]["pay_url"].endswith("/pay/" + first.json()["trade"]["trade_no"])

    other = await sim.post("/v1/trades", json=trade_body(order, "99.00"))
    assert other.status_code == 400 and other.json()["sub_code"] == "ACQ.CONTEXT_INCONSISTENT"
    invalid = await sim.post("/v1/trades", json=trade_body("bad order!", "-1"))
    assert invalid.status_code == 400 and invalid.json()["sub_code"] == "ACQ.INVALID_PARAMETER"
    assert "out_trade_no" in invalid.json()["sub_msg"] and "total_amount" in invalid.json()["sub_msg"]
    assert (await sim_trade(sim, order))["calls"]["create"] == 3


async def test_query_close_and_pay_follow_trade_rules(sim):
    order = new_order("sim-rules")
    missing = await sim.get(f"/v1/trades/{order}")
    assert missing.status_code == 404 and missing.json()["sub_code"] == "ACQ.TRADE_NOT_EXIST"
    await sim.post("/v1/trades", json=trade_body(order))

    paid = await sim.post(f"/control/trades/{order}/pay")
    assert paid.json()["trade"]["trade_status"] == "TRADE_SUCCESS" and paid.json()["trade"]["gmt_payment"]
    refused = await sim.post(f"/v1/trades/{order}/close", headers={"Idempotency-Key": "c1"})
    assert refused.status_code == 400 and refused.json()["sub_code"] == "ACQ.TRADE_STATUS_ERROR"
    assert refused.json()["trade"]["trade_status"] == "TRADE_SUCCESS"

    unpaid = new_order("sim-close")
    await sim.post("/v1/trades", json=trade_body(unpaid))
    closed = await sim.post(f"/v1/trades/{unpaid}/close")
    again = await sim.post(f"/v1/trades/{unpaid}/close")
    assert closed.json()["trade"]["trade_status"] == again.json()["trade"]["trade_status"] == "TRADE_CLOSED"
    late = await sim.post(f"/control/trades/{unpaid}/pay")
    assert late.status_code == 409 and "closed" in late.json()["sub_msg"]
    assert (await sim.get(f"/v1/trades/{unpaid}")).json()["trade"]["trade_status"] == "TRADE_CLOSED"


async def test_scripted_faults_fail_the_given_number_of_calls(sim):
    order = new_order("sim-faults")
    await script(sim, order, faults={"create": {"mode": "error", "times": 2}, "query": {"mode": "hang", "times": 1}})
    codes = [(await sim.post("/v1/trades", json=trade_body(order))).status_code for _ in range(3)]
    assert codes == [500, 500, 200]
    hung = await sim.get(f"/v1/trades/{order}")  # answers after PAYSENTINEL_SIMULATOR_HANG_SECONDS
    assert hung.status_code == 504 and hung.json()["sub_code"] == "ACQ.SYSTEM_ERROR"
    assert (await sim.get(f"/v1/trades/{order}")).status_code == 200
    assert (await sim_trade(sim, order))["calls"] == {"create": 3, "query": 2, "close": 0, "refund": 0, "refund_query": 0}


async def test_cashier_page_lets_the_payer_pay(sim):
    order = new_order("sim-cashier")
    trade = (await sim.post("/v1/trades", json=trade_body(order))).json()["trade"]
    page = await sim.get(f"/pay/{trade['trade_no']}")
    assert page.status_code == 200 and "Pay 12.30 CNY" in page.text and "<form" in page.text
    done = await sim.post(f"/pay/{trade['trade_no']}")
    assert done.status_code == 200 and "You paid 12.30 CNY" in done.text
    assert (await sim.post(f"/pay/{trade['trade_no']}")).status_code == 409
    assert (await sim.get("/pay/nope")).status_code == 404


async def test_callbacks_are_signed_and_resent_until_acknowledged(sim):
    order = new_order("sim-resend")
    await script(sim, order, pay="immediately")
    async with receiver([500, 503, 200], secret=SIMULATOR_SECRET) as (url, received):
        await sim.post("/v1/trades", json=trade_body(order, notify_url=url))
        await wait_for(lambda: _delivered(sim, order, 3), what="three delivery attempts")
        await asyncio.sleep(1.5)  # the acknowledged event is not sent again
    deliveries = (await sim_trade(sim, order))["deliveries"]
    assert [(d["attempt"], d["status_code"]) for d in deliveries] == [(1, 500), (2, 503), (3, 200)]
    assert len(received) == 3 and len({event_id for _, event_id in received}) == 1
    event, event_id = received[0]
    assert event["id"] == event_id and event["type"] == "trade.status_changed"
    assert event["data"]["trade_status"] == "TRADE_SUCCESS" and event["data"]["total_amount"] == "12.30"


async def test_callback_scripts_drop_and_duplicate(sim):
    dropped, doubled = new_order("sim-drop"), new_order("sim-twice")
    await script(sim, dropped, pay="immediately", callback="drop")
    await script(sim, doubled, pay="immediately", callback="duplicate", callback_amount="0.01")
    async with receiver([200], secret=SIMULATOR_SECRET) as (url, received):
        await sim.post("/v1/trades", json=trade_body(dropped, notify_url=url))
        await sim.post("/v1/trades", json=trade_body(doubled, notify_url=url))
        await wait_for(lambda: _delivered(sim, doubled, 2), what="the duplicated callback")
    assert [d["error"] for d in (await sim_trade(sim, dropped))["deliveries"]] == ["dropped by script"]
    assert [event["data"]["out_trade_no"] for event, _ in received] == [doubled, doubled]
    assert received[0][1] == received[1][1]  # the same event twice
    assert received[0][0]["data"]["total_amount"] == "0.01"  # the scripted wrong amount


async def _delivered(sim, order: str, count: int) -> bool:
    return len((await sim_trade(sim, order))["deliveries"]) >= count


async def test_control_api_rejects_bad_scripts(sim):
    bad = await sim.put(f"/control/scripts/{new_order('sim-bad')}", json={"pay": "sometimes"})
    assert bad.status_code == 400 and "pay" in bad.json()["sub_msg"]
    unknown = await sim.put(f"/control/scripts/{new_order('sim-bad')}", json={"colour": "red"})
    assert unknown.status_code == 400
    assert (await sim.post(f"/control/trades/{new_order('sim-none')}/pay")).status_code == 404


async def paid_trade(sim, prefix: str, **behaviour) -> str:
    order = new_order(prefix)
    await script(sim, order, **behaviour)
    await sim.post("/v1/trades", json=trade_body(order))
    assert (await sim.post(f"/control/trades/{order}/pay")).status_code == 200
    return order


def refund_body(request_no: str, amount: str, **extra) -> dict:
    return {"out_request_no": request_no, "refund_amount": amount, **extra}


async def test_refunds_never_exceed_the_trade_and_are_idempotent(sim):
    order = await paid_trade(sim, "sim-refund")
    first = await sim.post(f"/v1/trades/{order}/refunds", json=refund_body("r1", "10.00"), headers={"Idempotency-Key": "a"})
    assert first.status_code == 200 and first.json()["refund"]["refund_status"] == "REFUND_SUCCESS"
    again = await sim.post(f"/v1/trades/{order}/refunds", json=refund_body("r1", "10.00"))
    assert again.json()["refund"]["submissions"] == 1  # the same refund, not a second one
    other = await sim.post(f"/v1/trades/{order}/refunds", json=refund_body("r1", "1.00"))
    assert other.status_code == 400 and other.json()["sub_code"] == "ACQ.CONTEXT_INCONSISTENT"
    over = await sim.post(f"/v1/trades/{order}/refunds", json=refund_body("r2", "2.31"))
    assert over.status_code == 400 and over.json()["sub_code"] == "ACQ.REFUND_AMT_NOT_EQUAL_TOTAL"
    rest = await sim.post(f"/v1/trades/{order}/refunds", json=refund_body("r3", "2.30"))
    assert rest.json()["refund"]["refund_status"] == "REFUND_SUCCESS"
    query = await sim.get(f"/v1/trades/{order}/refunds/r3")
    assert query.json()["refund"]["refund_amount"] == "2.30"
    assert (await sim.get(f"/v1/trades/{order}/refunds/nope")).json()["sub_code"] == "ACQ.REFUND_NOT_EXIST"
    books = (await sim.get(f"/control/ledger/{order}")).json()
    assert (books["captured_minor"], books["refunded_minor"], books["net_minor"]) == (1230, 1230, 0)
    assert books["trades"][0]["trade_status"] == "TRADE_CLOSED"  # fully refunded

    unpaid = new_order("sim-unpaid")
    await sim.post("/v1/trades", json=trade_body(unpaid))
    refused = await sim.post(f"/v1/trades/{unpaid}/refunds", json=refund_body("r1", "1.00"))
    assert refused.status_code == 400 and refused.json()["sub_code"] == "ACQ.TRADE_STATUS_ERROR"
    assert (await sim.post(f"/v1/trades/{new_order('none')}/refunds", json=refund_body("r1", "1"))).status_code == 404


async def test_scripted_refund_failure_delay_and_faults(sim):
    order = await paid_trade(
        sim,
        "sim-refail",
        refund="fail",
        refund_fail_times=1,
        refund_delay_seconds=0.3,
        faults={"refund": {"mode": "error", "times": 1}},
    )
    assert (await sim.post(f"/v1/trades/{order}/refunds", json=refund_body("r1", "12.30"))).status_code == 500
    first = await sim.post(f"/v1/trades/{order}/refunds", json=refund_body("r1", "12.30"))
    assert first.json()["refund"]["refund_status"] == "REFUND_PROCESSING"
    failed = await wait_for(lambda: _refund_in(sim, order, "r1", "REFUND_FAILED"), what="the scripted failure")
    assert "insufficient merchant balance" in failed["fail_reason"]
    retried = await sim.post(f"/v1/trades/{order}/refunds", json=refund_body("r1", "12.30"))
    assert retried.json()["refund"]["submissions"] == 2
    await wait_for(lambda: _refund_in(sim, order, "r1", "REFUND_SUCCESS"), what="the resubmitted refund")
    assert (await sim.get(f"/control/ledger/{order}")).json()["refunded_minor"] == 1230


async def _refund_in(sim, order: str, request_no: str, status: str):
    refund = (await sim.get(f"/v1/trades/{order}/refunds/{request_no}")).json().get("refund")
    return refund if refund and refund["refund_status"] == status else None


async def test_second_charge_and_risk_hold(sim):
    order = new_order("sim-second")
    await script(sim, order, pay="immediately", second_charge=True, second_charge_delay_seconds=0.2)
    async with receiver([200], secret=SIMULATOR_SECRET) as (url, received):
        await sim.post("/v1/trades", json=trade_body(order, notify_url=url))
        await wait_for(lambda: _delivered(sim, order, 2), what="callbacks of both charges")
    trades = {event["data"]["trade_no"] for event, _ in received}
    assert len(trades) == 2
    books = (await sim.get(f"/control/ledger/{order}")).json()
    assert books["captured_minor"] == 2460 and len(books["trades"]) == 2
    second = (await sim_trade(sim, order))["extra_trades"][0]["trade_no"]
    refund = await sim.post(f"/v1/trades/{order}/refunds", json=refund_body("dup", "12.30", trade_no=second))
    assert refund.json()["refund"]["trade_no"] == second
    assert (await sim.get(f"/control/ledger/{order}")).json()["net_minor"] == 1230

    held = new_order("sim-risk")
    await script(sim, held, risk_hold=True)
    response = await sim.post("/v1/trades", json=trade_body(held))
    assert response.status_code == 400 and response.json()["sub_code"] == "ACQ.RISK_HOLD"
    assert (await sim_trade(sim, held))["trade"] is None
