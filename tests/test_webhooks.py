"""The webhook receiver rejects what is not a verified callback, with no effect."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest

from paysentinel import signing
from tests.conftest import new_order
from tests.helpers import (
    SIMULATOR_SECRET,
    callback_rows,
    exempt,
    payment_row,
    provider_order,
    script,
    start_payment,
    wait_for,
    wait_status,
)


def trade_event(order_id: str, trade_no: str, status: str = "TRADE_SUCCESS", amount: str = "99.90") -> tuple[str, bytes]:
    event_id = f"evt_{uuid.uuid4().hex}"
    body = {
        "id": event_id,
        "type": "trade.status_changed",
        "created_at": "2026-11-22T10:00:00+00:00",
        "data": {
            "out_trade_no": order_id,
            "trade_no": trade_no,
            "trade_status": status,
            "total_amount": amount,
            "currency": "CNY",
            "gmt_payment": "2026-11-22T10:00:00+00:00",
        },
    }
    return event_id, json.dumps(body).encode()


@pytest.fixture
async def webhooks(stack):
    async with httpx.AsyncClient(base_url=stack.webhook_url, timeout=30) as http:
        yield http


@pytest.fixture
async def pending_payment(api, sim, sessions):
    """A payment waiting for its payer, so any accepted callback would change it."""
    order = new_order("wh")
    await script(sim, order, pay="never")
    view = (await start_payment(api, order, expires_in_seconds=120)).json()
    await wait_status(api, view["payment_id"], "PENDING")

    async def row_pending() -> bool:  # the row follows the workflow a moment later
        row = await payment_row(sessions, view["payment_id"])
        return row is not None and row.status == "PENDING"

    await wait_for(row_pending, timeout=10, what="the payment row to show PENDING")
    return view


async def assert_unchanged(api, sessions, payment: dict) -> None:
    """The payment still waits for its payer (and the test ends so: it stays out of the books check)."""
    exempt(payment["order_id"], "refused callbacks leave the payment PENDING, its payer has 120 s left")
    row = await payment_row(sessions, payment["payment_id"])
    assert row.status == "PENDING" and row.status_seq > 0
    assert await callback_rows(sessions, payment["order_id"]) == []
    view = (await api.get(f"/payments/{payment['payment_id']}")).json()
    assert view["status"] == "PENDING"
    assert not [e for e in view["timeline"] if e["event"].startswith("callback")]


async def test_bad_signature_is_401_and_changes_nothing(webhooks, api, sessions, pending_payment):
    event_id, body = trade_event(provider_order(pending_payment["order_id"]), pending_payment["trade_no"])
    headers = signing.signed_headers("whsec_" + "d3Jvbmctc2VjcmV0LXdyb25nLXNlY3JldA==", event_id, body)
    response = await webhooks.post("/webhooks/simulator", content=body, headers=headers)
    assert response.status_code == 401
    assert "signature" in response.json()["error"]
    tampered = signing.signed_headers(SIMULATOR_SECRET, event_id, body)
    response = await webhooks.post("/webhooks/simulator", content=body.replace(b"99.90", b"0.01"), headers=tampered)
    assert response.status_code == 401
    response = await webhooks.post("/webhooks/simulator", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 401 and "missing" in response.json()["error"]
    await assert_unchanged(api, sessions, pending_payment)


async def test_stale_timestamp_is_401(webhooks, api, sessions, pending_payment):
    event_id, body = trade_event(provider_order(pending_payment["order_id"]), pending_payment["trade_no"])
    headers = signing.signed_headers(SIMULATOR_SECRET, event_id, body, timestamp=int(time.time()) - 3600)
    response = await webhooks.post("/webhooks/simulator", content=body, headers=headers)
    assert response.status_code == 401 and "timestamp" in response.json()["error"]
    await assert_unchanged(api, sessions, pending_payment)


async def test_malformed_body_is_400(webhooks, api, sessions, pending_payment):
    for body in (b"{not json", json.dumps({"id": "evt_x", "data": {"trade_status": "PAID??"}}).encode()):
        headers = signing.signed_headers(SIMULATOR_SECRET, "evt_x", body)
        response = await webhooks.post("/webhooks/simulator", content=body, headers=headers)
        assert response.status_code == 400, response.text
    await assert_unchanged(api, sessions, pending_payment)


async def test_oversized_body_is_413(webhooks, api, sessions, pending_payment):
    body = b'{"pad": "' + b"x" * (70 * 1024) + b'"}'
    headers = signing.signed_headers(SIMULATOR_SECRET, "evt_big", body)
    response = await webhooks.post("/webhooks/simulator", content=body, headers=headers)
    assert response.status_code == 413

    async def chunks():  # no Content-Length: the limit applies while reading
        for _ in range(80):
            yield b"x" * 1024

    response = await webhooks.post("/webhooks/simulator", content=chunks(), headers=headers)
    assert response.status_code == 413
    await assert_unchanged(api, sessions, pending_payment)


async def test_unknown_provider_is_404(webhooks):
    response = await webhooks.post("/webhooks/paypal", content=b"{}")
    assert response.status_code == 404


async def test_verified_callback_for_unknown_payment_is_stored_and_listed(webhooks, api, sessions):
    order = new_order("ghost")
    event_id, body = trade_event(provider_order(order), "2026112299999999")  # merchant A's order number
    response = await webhooks.post(
        "/webhooks/simulator", content=body, headers=signing.signed_headers(SIMULATOR_SECRET, event_id, body)
    )
    assert response.status_code == 200
    assert response.json()["result"] == "unknown_payment"
    [row] = await callback_rows(sessions, order)
    assert (row.delivery, row.event_id, row.signature_verified) == ("unknown_payment", event_id, True)
    listed = (await api.get("/callbacks", params={"delivery": "unknown_payment", "order_id": order})).json()
    assert [(c["event_id"], c["order_id"]) for c in listed] == [(event_id, order)]
    # The provider resends: acknowledged as a duplicate, stored once.
    again = await webhooks.post(
        "/webhooks/simulator", content=body, headers=signing.signed_headers(SIMULATOR_SECRET, event_id, body)
    )
    assert again.json()["result"] == "duplicate"
    assert len(await callback_rows(sessions, order)) == 1


async def test_valid_callback_is_delivered_once(webhooks, api, sim, sessions, pending_payment):
    order = pending_payment["order_id"]
    await script(sim, order, pay="never", callback="drop")  # the payer pays; our callback below tells of it
    assert (await sim.post(f"/control/trades/{provider_order(order)}/pay")).status_code == 200
    event_id, body = trade_event(provider_order(order), pending_payment["trade_no"])
    for expected in ("delivered", "duplicate"):
        response = await webhooks.post(
            "/webhooks/simulator", content=body, headers=signing.signed_headers(SIMULATOR_SECRET, event_id, body)
        )
        assert response.status_code == 200 and response.json()["result"] == expected
    view = await wait_status(api, pending_payment["payment_id"], "SUCCEEDED")
    assert len([e for e in view["timeline"] if e["event"] == "paid"]) == 1
