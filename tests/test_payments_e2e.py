"""End to end: checkout API -> Temporal -> worker -> simulator (HTTP) -> webhook -> PostgreSQL."""

from __future__ import annotations

import asyncio

from tests.conftest import new_order
from tests.helpers import (
    callback_rows,
    events,
    payment_id_for,
    payment_row,
    provider_order,
    script,
    search_count,
    sim_trade,
    start_payment,
    wait_for,
    wait_status,
)


async def test_happy_path_paid_by_callback(api, sim, sessions, client):
    order = new_order("happy")
    await script(sim, order, pay="immediately")
    response = await start_payment(api, order)
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["payment_id"] == payment_id_for(order) and created["order_id"] == order
    assert created["pay_url"] and created["trade_no"]

    view = await wait_status(api, created["payment_id"], "SUCCEEDED")
    assert [e["event"] for e in view["timeline"] if e["event"] == "paid"] == ["paid"]
    assert "confirmed by callback" in events(view, "paid")[0]["detail"]

    row = await payment_row(sessions, created["payment_id"], "SUCCEEDED")
    assert (row.status, row.paid_amount_minor, row.trade_no) == ("SUCCEEDED", 9990, created["trade_no"])
    callbacks = await callback_rows(sessions, order)
    assert [(c.delivery, c.signature_verified, c.trade_status) for c in callbacks] == [("delivered", True, "TRADE_SUCCESS")]
    assert '"TRADE_SUCCESS"' in callbacks[0].raw_body
    trade = await sim_trade(sim, order)
    assert trade["trade"]["trade_status"] == "TRADE_SUCCESS"
    assert [d["status_code"] for d in trade["deliveries"]] == [200]
    await search_count(
        client, f'OrderId = "{provider_order(order)}" AND PaymentStatus = "SUCCEEDED" AND Provider = "simulator"', 1
    )


async def test_callback_lost_is_resolved_by_query(api, sim, sessions):
    order = new_order("lost")
    await script(sim, order, pay="immediately", callback="drop")
    payment_id = (await start_payment(api, order)).json()["payment_id"]
    view = await wait_status(api, payment_id, "SUCCEEDED")
    assert "confirmed by query" in events(view, "paid")[0]["detail"]
    assert events(view, "callback") == []
    assert await callback_rows(sessions, order) == []
    assert (await payment_row(sessions, payment_id, "SUCCEEDED")).status == "SUCCEEDED"


async def test_duplicated_callback_makes_one_transition(api, sim, sessions):
    order = new_order("dup")
    await script(sim, order, pay="immediately", callback="duplicate")
    payment_id = (await start_payment(api, order)).json()["payment_id"]
    await wait_status(api, payment_id, "SUCCEEDED")
    trade = await wait_for(lambda: _acknowledged(sim, order, 2), what="both duplicate deliveries acknowledged")
    assert len({d["event_id"] for d in trade["deliveries"]}) == 1
    view = (await api.get(f"/payments/{payment_id}")).json()
    assert len(events(view, "paid")) == 1
    assert len(await callback_rows(sessions, order)) == 1  # deduplicated by event id
    row = await payment_row(sessions, payment_id, "SUCCEEDED")
    assert row.status == "SUCCEEDED" and row.status_seq > 0


async def _acknowledged(sim, order: str, count: int):
    trade = await sim_trade(sim, order)
    return trade if sum(d["status_code"] == 200 for d in trade["deliveries"]) >= count else None


async def test_payer_never_pays_is_closed_at_provider(api, sim, sessions, client):
    order = new_order("never")
    await script(sim, order, pay="never")
    payment_id = (await start_payment(api, order, expires_in_seconds=5)).json()["payment_id"]
    view = await wait_status(api, payment_id, "CLOSED", timeout=30)
    assert events(view, "expired")
    trade = await sim_trade(sim, order)
    assert trade["trade"]["trade_status"] == "TRADE_CLOSED"
    assert trade["calls"]["close"] == 1 and trade["calls"]["query"] >= 1
    assert (await payment_row(sessions, payment_id, "CLOSED")).status == "CLOSED"
    await search_count(client, f'OrderId = "{provider_order(order)}" AND PaymentStatus = "CLOSED"', 1)


async def test_close_reveals_payment_when_queries_fail(api, sim, sessions):
    order = new_order("race")
    await script(sim, order, pay="never", callback="drop", faults={"query": {"mode": "error", "times": -1}})
    payment_id = (await start_payment(api, order, expires_in_seconds=5)).json()["payment_id"]
    assert (await sim.post(f"/control/trades/{provider_order(order)}/pay")).status_code == 200
    view = await wait_status(api, payment_id, "SUCCEEDED", timeout=30)
    assert "confirmed by close" in events(view, "paid")[0]["detail"]
    assert any(e["event"].startswith("query #") and e["event"].endswith("failed") for e in view["timeline"])
    assert (await payment_row(sessions, payment_id, "SUCCEEDED")).status == "SUCCEEDED"


async def test_closed_callback_after_close_is_recorded_and_changes_nothing(api, sim, sessions):
    order = new_order("afterclose")
    await script(sim, order, pay="never", after_close="closed_callback")
    payment_id = (await start_payment(api, order, expires_in_seconds=5)).json()["payment_id"]
    await wait_status(api, payment_id, "CLOSED", timeout=30)

    async def recorded():
        view = (await api.get(f"/payments/{payment_id}")).json()
        return view if any("TRADE_CLOSED" in e["detail"] for e in events(view, "callback")) else None

    view = await wait_for(recorded, what="the late TRADE_CLOSED callback in the timeline")
    assert view["status"] == "CLOSED"
    assert [c.delivery for c in await callback_rows(sessions, order)] == ["delivered"]
    row = await payment_row(sessions, payment_id, "CLOSED")
    assert row.status == "CLOSED"


async def test_wrong_amount_callback_goes_to_review(api, sim, sessions):
    order = new_order("amount")
    await script(sim, order, pay="immediately", paid_amount="0.01")
    payment_id = (await start_payment(api, order)).json()["payment_id"]
    view = await wait_status(api, payment_id, "IN_REVIEW")
    assert view["review_reason"] == "amount_mismatch"
    opened = events(view, "review opened")[0]["detail"]
    assert "callback reports 0.01 CNY" in opened and "order is 99.90 CNY" in opened
    assert "the provider's query says 0.01 CNY" in opened


async def test_a_wrong_amount_claim_is_settled_by_what_the_provider_took(api, sim, sessions):
    order = new_order("claim")
    await script(sim, order, pay="immediately", callback_amount="0.01")  # the provider took 99.90
    payment_id = (await start_payment(api, order)).json()["payment_id"]
    view = await wait_status(api, payment_id, "SUCCEEDED")
    assert view["captured_minor"] == 9990 and not view["refunds"]
    assert "the provider took 99.90 CNY" in events(view, "amount confirmed")[0]["detail"]


async def test_provider_5xx_on_create_fails_after_bounded_retries(api, sim, sessions):
    order = new_order("down")
    await script(sim, order, faults={"create": {"mode": "error", "times": -1}})
    response = await start_payment(api, order)
    assert response.status_code == 201
    view = await wait_status(api, response.json()["payment_id"], "FAILED")
    assert "retry limit" in view["reason"] and view["pay_url"] is None
    trade = await sim_trade(sim, order)
    assert trade["calls"]["create"] == 3  # PAYSENTINEL_PROVIDER_MAX_ATTEMPTS
    assert trade["calls"]["close"] >= 1  # made sure no trade can be paid
    assert trade["trade"] is None
    assert (await payment_row(sessions, view["payment_id"], "FAILED")).status == "FAILED"


async def test_provider_recovers_within_retries(api, sim, sessions):
    order = new_order("flaky")
    await script(
        sim, order, pay="immediately", faults={"create": {"mode": "error", "times": 2}, "query": {"mode": "hang", "times": 1}}
    )
    payment_id = (await start_payment(api, order)).json()["payment_id"]
    await wait_status(api, payment_id, "SUCCEEDED")
    assert (await sim_trade(sim, order))["calls"]["create"] == 3
    row = await payment_row(sessions, payment_id, "SUCCEEDED")
    assert row.provider_retries >= 2  # retries are counted per payment


async def test_idempotent_start_same_order_concurrently(api, sim, books):
    order = new_order("idem")
    books.exempt(order, "the payer has 60 s left to pay: the test ends while the payment is PENDING")
    await script(sim, order, pay="never")
    responses = await asyncio.gather(*(start_payment(api, order, expires_in_seconds=60) for _ in range(5)))
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 200, 201]
    assert len({r.json()["payment_id"] for r in responses}) == 1
    assert len({r.json()["trade_no"] for r in responses}) == 1
    assert (await sim_trade(sim, order))["calls"]["create"] == 1

    again = await start_payment(api, order, expires_in_seconds=60)
    assert again.status_code == 200 and again.json()["payment_id"] == payment_id_for(order)
    conflict = await start_payment(api, order, amount_minor=100, expires_in_seconds=60)
    assert conflict.status_code == 409
    assert "amount_minor: existing 9990 vs requested 100" in conflict.json()["error"]


async def test_invalid_checkout_requests_get_readable_422(api):
    response = await start_payment(api, new_order("bad"), amount_minor=0)
    assert response.status_code == 422
    assert any(p.startswith("amount_minor:") for p in response.json()["problems"])
    response = await start_payment(api, "has spaces!")
    assert response.status_code == 422 and "order_id" in response.json()["problems"][0]
    response = await start_payment(api, new_order("bad"), currency="XXX")
    assert response.status_code == 422 and "unsupported currency" in response.text
    response = await start_payment(api, new_order("bad"), provider="paypal")
    assert response.status_code == 422 and "this deployment takes simulator" in response.json()["error"]
    assert (await api.get("/payments/payment-nope")).status_code == 404
