"""The Stripe adapter: unit tests, the official library against the fake Stripe API
(tests/fakes/stripe.py), and end to end through the checkout API, Temporal, the worker, the
fake (real HTTP) and the webhook receiver."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
import stripe
import uvicorn
from fastapi import FastAPI, Request, Response

from paysentinel.config import Settings
from paysentinel.devserver import free_port
from paysentinel.models import CreateTradeInput, RefundInput, RefundStatus, TradeStatus
from paysentinel.providers import CallbackIgnored, MalformedCallback, ProviderRejected, ProviderUnavailable
from paysentinel.providers import stripe as adapter
from paysentinel.signing import SignatureError
from tests.conftest import Stack, new_order
from tests.fakes import stripe as fake
from tests.helpers import (
    reconcile,
    callback_rows,
    events,
    payment_row,
    provider_order,
    start_payment,
    wait_for,
    wait_status,
)

SECRET = "whsec_unit_test_secret_0123456789"
TZ = ZoneInfo("Asia/Shanghai")


# --- Unit: mappings and classification ------------------------------------------------------


def intent(status: str, **extra) -> dict:
    return {
        "id": "pi_1",
        "object": "payment_intent",
        "amount": 9990,
        "amount_received": 9990 if status == "succeeded" else 0,
        "currency": "cny",
        "status": status,
        "metadata": {"order_id": "testa-o1"},
        "client_secret": "pi_1_secret_x",
        **extra,
    }


@pytest.mark.parametrize(
    "status,expected",
    [
        ("requires_payment_method", TradeStatus.WAIT_BUYER_PAY),
        ("requires_confirmation", TradeStatus.WAIT_BUYER_PAY),
        ("requires_action", TradeStatus.WAIT_BUYER_PAY),
        ("requires_capture", TradeStatus.WAIT_BUYER_PAY),
        ("processing", TradeStatus.PAYING),
        ("succeeded", TradeStatus.TRADE_SUCCESS),
        ("canceled", TradeStatus.TRADE_CLOSED),
    ],
)
def test_payment_intent_statuses_map_to_trade_statuses(status, expected):
    trade = adapter.trade_of(intent(status, latest_charge={"id": "ch_1", "created": 1_700_000_000}))
    assert (trade.status, trade.trade_no, trade.order_id, trade.currency, trade.amount_minor) == (
        expected,
        "pi_1",
        "testa-o1",
        "CNY",
        9990,
    )
    assert (trade.paid_at is not None) == expected.is_paid
    assert not TradeStatus.PAYING.is_paid  # processing is never taken for paid


@pytest.mark.parametrize(
    "status,expected",
    [
        ("pending", RefundStatus.PROCESSING),
        ("requires_action", RefundStatus.PROCESSING),
        ("succeeded", RefundStatus.SUCCEEDED),
        ("failed", RefundStatus.FAILED),
        ("canceled", RefundStatus.FAILED),
    ],
)
def test_refund_statuses(status, expected):
    refund = adapter.refund_of(
        {"id": "re_1", "amount": 500, "status": status, "payment_intent": "pi_1", "failure_reason": "lost_or_stolen_card"}, "rf1"
    )
    assert (refund.status, refund.refund_id, refund.trade_no, refund.amount_minor) == (expected, "rf1", "pi_1", 500)
    assert (refund.fail_reason is not None) == (expected is RefundStatus.FAILED)


def _error(cls, status: int, code: str | None, kind: str = "invalid_request_error", **kw):
    body = {"error": {"type": kind, "message": "m", **({"code": code} if code else {})}}
    if cls in (stripe.InvalidRequestError, stripe.CardError):
        return cls("m", None, code, http_body=json.dumps(body), http_status=status, json_body=body)
    return cls("m", http_body=json.dumps(body), http_status=status, json_body=body)


@pytest.mark.parametrize(
    "err,transient,code",
    [
        (stripe.APIConnectionError("connection refused"), True, None),
        (_error(stripe.RateLimitError, 429, "rate_limit"), True, None),
        (_error(stripe.RateLimitError, 429, "lock_timeout"), True, None),
        (_error(stripe.InvalidRequestError, 400, "lock_timeout"), True, None),
        (_error(stripe.APIError, 500, None, "api_error"), True, None),
        (_error(stripe.APIError, 503, None, "api_error"), True, None),
        (_error(stripe.APIError, 409, "idempotency_key_in_use"), True, None),
        (_error(stripe.CardError, 402, "card_declined", "card_error"), False, "card_declined"),
        (_error(stripe.InvalidRequestError, 400, "charge_already_refunded"), False, "charge_already_refunded"),
        (_error(stripe.InvalidRequestError, 400, "amount_too_large"), False, "amount_too_large"),
        (_error(stripe.InvalidRequestError, 404, "resource_missing"), False, "resource_missing"),
        (_error(stripe.IdempotencyError, 400, None, "idempotency_error"), False, "idempotency_error"),
        (_error(stripe.AuthenticationError, 401, None), False, "authentication_error"),
        (_error(stripe.PermissionError, 403, None), False, "permission_error"),
    ],
)
def test_errors_are_transient_or_final(err, transient, code):
    mapped = adapter.classify(err, "call")
    assert isinstance(mapped, ProviderUnavailable if transient else ProviderRejected), mapped
    if code is not None:
        assert mapped.code == code


def test_pick_refund_prefers_a_live_refund_of_ours():
    refunds = [
        {"id": "re_a", "status": "failed", "created": 1, "metadata": {"refund_id": "rf1"}},
        {"id": "re_b", "status": "succeeded", "created": 2, "metadata": {"refund_id": "rf1"}},
        {"id": "re_c", "status": "succeeded", "created": 3, "metadata": {"refund_id": "rf2"}},
        {"id": "re_d", "status": "failed", "created": 4, "metadata": {"refund_id": "rf1"}},
    ]
    assert adapter.pick_refund(refunds, "rf1")["id"] == "re_b"
    assert adapter.pick_refund(refunds[:1] + refunds[3:], "rf1")["id"] == "re_d"
    assert adapter.pick_refund(refunds, "rf9") is None


def test_check_order_and_build_settings():
    provider = adapter.StripeProvider("http://127.0.0.1:9", "sk_test_x", SECRET)
    assert provider.check_order("testa-o1", 100, "USD") is None
    assert "XYZ" in provider.check_order("testa-o1", 100, "XYZ")
    assert "500" in provider.check_order("x" * 501, 100, "USD")
    with pytest.raises(ValueError, match="PAYSENTINEL_STRIPE_API_KEY"):
        adapter.build(Settings(stripe_api_key="", stripe_webhook_secret=SECRET), httpx.AsyncClient())
    with pytest.raises(ValueError, match="PAYSENTINEL_STRIPE_WEBHOOK_SECRET"):
        adapter.build(Settings(stripe_api_key="sk_test_x", stripe_webhook_secret=""), httpx.AsyncClient())


# --- Unit: webhook verification ---------------------------------------------------------------


def event_body(kind: str = "payment_intent.succeeded", status: str = "succeeded", **over) -> bytes:
    event = {
        "id": "evt_1",
        "object": "event",
        "created": int(time.time()),
        "type": kind,
        "data": {"object": intent(status)},
        **over,
    }
    return json.dumps(event).encode()


def signed(body: bytes, secret: str = SECRET, timestamp: int | None = None) -> dict[str, str]:
    return {"Stripe-Signature": fake.sign(secret, body, timestamp), "Content-Type": "application/json"}


def provider() -> adapter.StripeProvider:
    return adapter.StripeProvider("http://127.0.0.1:9", "sk_test_x", SECRET, tolerance_seconds=300)


def test_webhook_events_are_verified_and_decoded():
    body = event_body()
    callback = provider().parse_callback(signed(body), body)
    assert (
        callback.event_id,
        callback.order_id,
        callback.trade_no,
        callback.trade_status,
        callback.amount_minor,
        callback.currency,
    ) == ("evt_1", "testa-o1", "pi_1", TradeStatus.TRADE_SUCCESS, 9990, "CNY")
    for kind, status, expected in (
        ("payment_intent.canceled", "canceled", TradeStatus.TRADE_CLOSED),
        ("payment_intent.processing", "processing", TradeStatus.PAYING),
    ):
        body = event_body(kind, status)
        assert provider().parse_callback({"stripe-signature": fake.sign(SECRET, body)}, body).trade_status == expected


def test_webhook_signature_refusals():
    body = event_body()
    tampered = body.replace(b'"amount_received": 9990', b'"amount_received": 1')
    assert tampered != body
    with pytest.raises(SignatureError):
        provider().parse_callback(signed(body), tampered)
    with pytest.raises(SignatureError):
        provider().parse_callback(signed(body, "whsec_someone_else"), body)
    with pytest.raises(SignatureError, match="tolerance"):
        provider().parse_callback(signed(body, timestamp=int(time.time()) - 301), body)
    with pytest.raises(SignatureError, match="future"):
        provider().parse_callback(signed(body, timestamp=int(time.time()) + 3600), body)
    with pytest.raises(SignatureError):
        provider().parse_callback({}, body)
    with pytest.raises(SignatureError):
        provider().parse_callback({"Stripe-Signature": "garbage"}, body)


def test_other_events_are_ignored_and_broken_ones_malformed():
    for kind in ("charge.succeeded", "refund.updated", "payment_intent.created"):
        body = event_body(kind)
        with pytest.raises(CallbackIgnored):
            provider().parse_callback(signed(body), body)
    for body in (
        b"not json",
        json.dumps(
            {"id": "evt_2", "type": "payment_intent.succeeded", "data": {"object": {"object": "payment_intent"}}}
        ).encode(),
    ):
        with pytest.raises(MalformedCallback):
            provider().parse_callback(signed(body), body)
    reply = provider().callback_reply(200, {"result": "delivered"})
    assert (reply.status, json.loads(reply.body)) == (200, {"received": True, "result": "delivered"})
    assert json.loads(provider().callback_reply(401, "bad signature").body) == {"error": "bad signature"}


# --- The official library against the fake (in this process) -------------------------------


class Capture:
    """A webhook endpoint that records raw bodies and headers and answers 200."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, dict[str, str]]] = []
        self.app = FastAPI()

        @self.app.post("/hook")
        async def hook(request: Request) -> Response:
            self.received.append((await request.body(), dict(request.headers)))
            return Response('{"received": true}', 200, media_type="application/json")


async def serve(app) -> tuple[uvicorn.Server, asyncio.Task, int]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    return server, task, port


@pytest.fixture
async def local_fake(tmp_path):
    """The fake Stripe API and a capturing webhook endpoint, in this process."""
    capture = Capture()
    hook_server, hook_task, hook_port = await serve(capture.app)
    setup = fake.prepare(tmp_path, 0, f"http://127.0.0.1:{hook_port}/hook")
    api_key = Path(setup.app_env["PAYSENTINEL_STRIPE_API_KEY_FILE"]).read_text()
    secret = Path(setup.app_env["PAYSENTINEL_STRIPE_WEBHOOK_SECRET_FILE"]).read_text()
    state = fake.State(api_key, secret, f"http://127.0.0.1:{hook_port}/hook", [0.2, 0.4])
    server, task, port = await serve(fake.create_app(state))
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=url, timeout=10) as control:
        yield {
            "url": url,
            "api_key": api_key,
            "secret": secret,
            "state": state,
            "control": control,
            "capture": capture,
            "provider": adapter.StripeProvider(url, api_key, secret, 300, 5),
        }
    for s, t in ((server, task), (hook_server, hook_task)):
        s.should_exit = True
        await t


def create_input(order: str, amount: int = 9990) -> CreateTradeInput:
    return CreateTradeInput(
        provider="stripe",
        order_id=order,
        amount_minor=amount,
        currency="CNY",
        subject="test",
        notify_url="http://127.0.0.1/webhooks/stripe",
        expires_at=datetime.now(timezone.utc),
        idempotency_key=f"create:{order}",
    )


def refund_input(order: str, trade_no: str, refund_id: str, amount: int) -> RefundInput:
    return RefundInput.model_construct(
        payment_id=f"payment-{order}",
        provider="stripe",
        order_id=order,
        trade_no=trade_no,
        refund_id=refund_id,
        amount_minor=amount,
        currency="CNY",
        reason="returned",
        requested_by="merchant",
        timing=None,
    )


async def test_the_official_library_verifies_the_fakes_events_and_refuses_tampered_ones(local_fake):
    provider, control = local_fake["provider"], local_fake["control"]
    trade = await provider.create_trade(create_input("lib-o1"))
    assert (await control.post("/control/pay/lib-o1")).status_code == 200

    async def succeeded():
        return [r for r in local_fake["capture"].received if b"payment_intent.succeeded" in r[0]]

    [(body, headers)] = await wait_for(succeeded, timeout=10, what="the payment_intent.succeeded event")
    event = stripe.Webhook.construct_event(body, headers["stripe-signature"], local_fake["secret"], tolerance=300)
    assert (event["type"], event["data"]["object"]["id"]) == ("payment_intent.succeeded", trade.trade_no)
    assert provider.parse_callback(headers, body).trade_status is TradeStatus.TRADE_SUCCESS
    tampered = body.replace(b'"amount_received": 9990', b'"amount_received": 99')
    assert tampered != body
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(tampered, headers["stripe-signature"], local_fake["secret"], tolerance=300)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(body, headers["stripe-signature"], "whsec_other", tolerance=300)
    # Every event the fake sent verifies with the library.
    for raw, sent in local_fake["capture"].received:
        stripe.Webhook.construct_event(raw, sent["stripe-signature"], local_fake["secret"], tolerance=300)


async def test_the_fake_refuses_a_wrong_api_key(local_fake):
    wrong = adapter.StripeProvider(local_fake["url"], "sk_test_wrong", SECRET)
    with pytest.raises(ProviderRejected) as raised:
        await wrong.create_trade(create_input("lib-key"))
    assert raised.value.code == "authentication_error"


async def test_a_refund_is_reused_after_a_saved_5xx_and_after_the_keys_are_forgotten(local_fake):
    provider, control = local_fake["provider"], local_fake["control"]
    trade = await provider.create_trade(create_input("lib-rf"))
    await control.post("/control/pay/lib-rf")
    # The refund is made, then answered 500, saved under the key: the adapter finds it.
    await control.put("/control/scripts/lib-rf", json={"refund_error_after_create": 1})
    first = await provider.refund(refund_input("lib-rf", trade.trade_no, "rf-one", 3000), "refund:rf-one")
    assert (first.status, first.amount_minor) == (RefundStatus.SUCCEEDED, 3000)
    again = await provider.refund(refund_input("lib-rf", trade.trade_no, "rf-one", 3000), "refund:rf-one")
    assert again.status is RefundStatus.SUCCEEDED
    assert (await control.post("/control/idempotency/forget")).json()["forgotten"] >= 1
    after = await provider.refund(refund_input("lib-rf", trade.trade_no, "rf-one", 3000), "refund:rf-one")
    assert after.status is RefundStatus.SUCCEEDED
    ledger = (await control.get("/control/ledger/lib-rf")).json()
    assert (ledger["refunded_minor"], len(ledger["refunds"])) == (3000, 1)
    # More than is left is final; an unknown refund id is None.
    with pytest.raises(ProviderRejected) as raised:
        await provider.refund(refund_input("lib-rf", trade.trade_no, "rf-two", 9000), "refund:rf-two")
    assert raised.value.code == "amount_too_large"
    assert await provider.query_refund("lib-rf", "rf-none", trade.trade_no) is None
    assert (await provider.query_refund("lib-rf", "rf-one", trade.trade_no)).status is RefundStatus.SUCCEEDED


async def test_a_failed_refund_submitted_again_is_a_new_refund(local_fake):
    provider, control = local_fake["provider"], local_fake["control"]
    trade = await provider.create_trade(create_input("lib-rf2"))
    await control.post("/control/pay/lib-rf2")
    await control.put("/control/scripts/lib-rf2", json={"refund": "fail", "refund_fail_times": 1})
    failed = await provider.refund(refund_input("lib-rf2", trade.trade_no, "rf-x", 1000), "refund:rf-x")
    assert failed.status is RefundStatus.FAILED and failed.fail_reason
    retried = await provider.refund(refund_input("lib-rf2", trade.trade_no, "rf-x", 1000), "refund:rf-x")
    assert retried.status is RefundStatus.SUCCEEDED
    ledger = (await control.get("/control/ledger/lib-rf2")).json()
    assert ledger["refunded_minor"] == 1000
    assert sorted(r["refund_status"] for r in ledger["refunds"]) == ["failed", "succeeded"]


@pytest.mark.parametrize(
    "code,transient",
    [
        ("rate_limit", True),
        ("lock_timeout", True),
        ("api_error", True),
        ("card_declined", False),
        ("permission_error", False),
        ("amount_too_small", False),
    ],
)
async def test_answers_of_the_fake_are_classified(local_fake, code, transient):
    provider, control = local_fake["provider"], local_fake["control"]
    order = f"lib-err-{code}"
    await control.put(f"/control/scripts/{order}", json={"errors": {"create": {"code": code, "times": 1}}})
    with pytest.raises(ProviderUnavailable if transient else ProviderRejected):
        await provider.create_trade(create_input(order))
    if code in ("rate_limit", "lock_timeout"):  # never ran: not saved, the same key goes through
        assert (await provider.create_trade(create_input(order))).status is TradeStatus.WAIT_BUYER_PAY
    if code == "api_error":  # saved under the key and replayed, as Stripe does
        with pytest.raises(ProviderUnavailable):
            await provider.create_trade(create_input(order))


async def test_close_answers_paying_paid_and_closed(local_fake):
    provider, control = local_fake["provider"], local_fake["control"]
    processing = await provider.create_trade(create_input("lib-close-1"))
    await control.post("/control/pay/lib-close-1", json={"processing_seconds": 60})
    closed = await provider.close_trade("lib-close-1", "close:1", created_trade_no=processing.trade_no)
    assert closed.status is TradeStatus.PAYING
    racing = await provider.create_trade(create_input("lib-close-2"))
    await control.put("/control/scripts/lib-close-2", json={"pay_on_cancel": True})
    assert (await provider.close_trade("lib-close-2", "close:2", created_trade_no=racing.trade_no)).status.is_paid
    unpaid = await provider.create_trade(create_input("lib-close-3"))
    for _ in range(2):  # again: the same answer
        assert (
            await provider.close_trade("lib-close-3", "close:3", created_trade_no=unpaid.trade_no)
        ).status is TradeStatus.TRADE_CLOSED
    assert not (await provider.close_trade("lib-close-none", "close:4")).exists
    assert not (await provider.query_trade("lib-close-none", created_trade_no="pi_missing")).exists


async def test_balance_transactions_become_bill_rows_page_by_page(local_fake):
    provider, control = local_fake["provider"], local_fake["control"]
    trades = {}
    for n in range(3):
        order = f"lib-bill-{n}"
        trades[order] = await provider.create_trade(create_input(order, 1000 + n))
        await control.post(f"/control/pay/{order}")
    await provider.refund(refund_input("lib-bill-0", trades["lib-bill-0"].trade_no, "rf-b", 400), "refund:rf-b")
    old = adapter.BILL_PAGE_SIZE
    adapter.BILL_PAGE_SIZE = 2  # several pages
    try:
        rows = [row async for row in provider.bill_rows(datetime.now(TZ).date(), TZ)]
    finally:
        adapter.BILL_PAGE_SIZE = old
    mine = sorted(
        (r.kind, r.order_id, r.trade_no, r.amount_minor, r.refund_no) for r in rows if r.order_id.startswith("lib-bill-")
    )
    assert mine == sorted(
        [("payment", o, t.trade_no, t.amount_minor, "") for o, t in trades.items()]
        + [("refund", "lib-bill-0", trades["lib-bill-0"].trade_no, 400, "rf-b")]
    )
    assert local_fake["state"].calls["*"]["balance_transactions"] >= 2


# --- End to end on the running stack ----------------------------------------------------------


@pytest.fixture
async def fake_stripe(stack: Stack):
    url = stack.provider_urls.get("stripe")
    if url is None:
        pytest.fail("the fake Stripe API did not start (tests/fakes/stripe.py; see tests/conftest.py)", pytrace=False)
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        yield http


async def scripted(fake_stripe, order: str, **behaviour) -> None:
    response = await fake_stripe.put(f"/control/scripts/{provider_order(order)}", json=behaviour)
    assert response.status_code == 200, response.text


async def order_view(fake_stripe, order: str) -> dict:
    return (await fake_stripe.get(f"/control/orders/{provider_order(order)}")).json()


async def pay_with_stripe(api, order: str, **extra) -> str:
    response = await start_payment(api, order, provider="stripe", **extra)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["trade_no"].startswith("pi_") and "_secret_" in body["pay_url"]
    return body["payment_id"]


async def test_paid_through_the_webhook(api, fake_stripe, sessions):
    order = new_order("st-paid")
    await scripted(fake_stripe, order, pay="immediately")
    payment_id = await pay_with_stripe(api, order)
    view = await wait_status(api, payment_id, "SUCCEEDED")
    assert "confirmed by callback" in events(view, "paid")[0]["detail"]
    row = await payment_row(sessions, payment_id, "SUCCEEDED")
    assert (row.provider, row.paid_amount_minor, row.trade_no) == ("stripe", 9990, view["trade_no"])
    callbacks = await wait_for(lambda: _callbacks(sessions, order, 1), what="the stored event")
    assert [(c.delivery, c.trade_status) for c in callbacks] == [("delivered", "TRADE_SUCCESS")]
    assert callbacks[0].event_id.startswith("evt_")
    deliveries = (await order_view(fake_stripe, order))["deliveries"]
    assert any(d["type"] == "payment_intent.succeeded" and d["status_code"] == 200 for d in deliveries)
    assert all(d["status_code"] == 200 for d in deliveries)  # ignored events are acknowledged too


async def _callbacks(sessions, order: str, count: int):
    found = await callback_rows(sessions, order)
    return found if len(found) >= count else None


async def test_lost_webhook_is_found_by_query(api, fake_stripe, sessions):
    order = new_order("st-lost")
    await scripted(fake_stripe, order, pay="immediately", lose_events=["payment_intent.succeeded"])
    payment_id = await pay_with_stripe(api, order)
    view = await wait_status(api, payment_id, "SUCCEEDED")
    assert "confirmed by query" in events(view, "paid")[0]["detail"]
    assert await callback_rows(sessions, order) == []
    assert (await order_view(fake_stripe, order))["calls"]["retrieve"] >= 1


async def test_never_paid_is_cancelled_at_the_time_to_live(api, fake_stripe):
    order = new_order("st-never")
    payment_id = await pay_with_stripe(api, order, expires_in_seconds=5)
    view = await wait_status(api, payment_id, "CLOSED", timeout=30)
    assert events(view, "expired")
    seen = await order_view(fake_stripe, order)
    assert [i["status"] for i in seen["intents"]] == ["canceled"]
    assert seen["intents"][0]["cancellation_reason"] == "abandoned" and seen["calls"]["cancel"] == 1


async def test_processing_at_the_time_to_live_is_not_closed_as_unpaid(api, fake_stripe):
    order = new_order("st-proc")
    await scripted(fake_stripe, order, pay="immediately", processing_seconds=9, processing_outcome="succeeded")
    payment_id = await pay_with_stripe(api, order, expires_in_seconds=5)
    view = await wait_status(api, payment_id, "SUCCEEDED", timeout=40)
    assert not events(view, "closed")
    assert any("PAYING" in e["detail"] for e in view["timeline"]), view["timeline"]
    seen = await order_view(fake_stripe, order)
    assert seen["intents"][0]["status"] == "succeeded" and seen["calls"].get("cancel", 0) == 0


async def test_the_payer_pays_while_we_cancel(api, fake_stripe):
    order = new_order("st-race")
    await scripted(fake_stripe, order, pay_on_cancel=True, lose_events=["payment_intent.succeeded"])
    payment_id = await pay_with_stripe(api, order, expires_in_seconds=5)
    view = await wait_status(api, payment_id, "SUCCEEDED", timeout=30)
    assert "confirmed by close" in events(view, "paid")[0]["detail"]
    assert (await order_view(fake_stripe, order))["intents"][0]["status"] == "succeeded"


async def refund(api, payment_id: str, key: str, amount: int):
    response = await api.post(
        f"/payments/{payment_id}/refunds", json={"amount_minor": amount, "reason": "returned"}, headers={"Idempotency-Key": key}
    )
    assert response.status_code == 202, response.text
    return response.json()


async def refund_status(api, payment_id: str, refund_id: str, status: str) -> dict | None:
    view = (await api.get(f"/payments/{payment_id}")).json()
    found = [r for r in view["refunds"] if r["refund_id"] == refund_id and r["status"] == status]
    return view if found else None


async def test_partial_refunds_never_refund_twice(api, fake_stripe, stack, sessions):
    order = new_order("st-refund")
    await scripted(fake_stripe, order, pay="immediately", refund_error_after_create=1)
    payment_id = await pay_with_stripe(api, order)
    await wait_status(api, payment_id, "SUCCEEDED")
    first = await refund(api, payment_id, "r1", 2000)  # created, then answered 500: found, not made again
    await wait_for(lambda: refund_status(api, payment_id, first["refund_id"], "SUCCEEDED"), what="refund r1")
    assert (await refund(api, payment_id, "r1", 2000))["refund_id"] == first["refund_id"]  # the same request again
    second = await refund(api, payment_id, "r2", 990)
    await wait_for(lambda: refund_status(api, payment_id, second["refund_id"], "SUCCEEDED"), what="refund r2")
    # Stripe forgot the keys (24 hours later): submitting the refund again still finds it.
    assert (await fake_stripe.post("/control/idempotency/forget")).status_code == 200
    settings = Settings(
        stripe_api_url=stack.provider_urls["stripe"],
        stripe_api_key=Path(stack.env["PAYSENTINEL_STRIPE_API_KEY_FILE"]).read_text(),
        stripe_webhook_secret=Path(stack.env["PAYSENTINEL_STRIPE_WEBHOOK_SECRET_FILE"]).read_text(),
    )
    async with httpx.AsyncClient() as http:
        again = await adapter.build(settings, http).refund(
            refund_input(provider_order(order), first["trade_no"], first["refund_id"], 2000), f"refund:{first['refund_id']}"
        )
    assert again.status is RefundStatus.SUCCEEDED
    ledger = (await order_view(fake_stripe, order))["ledger"]
    assert (ledger["captured_minor"], ledger["refunded_minor"], len(ledger["refunds"])) == (9990, 2990, 2)
    view = await wait_status(api, payment_id, "PARTIALLY_REFUNDED")
    assert view["refunded_minor"] == 2990


async def test_refunds_pending_then_succeeded_and_pending_then_failed(api, fake_stripe):
    order = new_order("st-pending")
    await scripted(fake_stripe, order, pay="immediately", refund_pending_seconds=2)
    payment_id = await pay_with_stripe(api, order)
    await wait_status(api, payment_id, "SUCCEEDED")
    ok = await refund(api, payment_id, "p1", 1000)
    assert ok["status"] == "PROCESSING"
    await wait_for(lambda: refund_status(api, payment_id, ok["refund_id"], "SUCCEEDED"), timeout=30, what="p1")
    await scripted(fake_stripe, order, refund_pending_seconds=2, refund="fail", refund_fail_times=1)
    failing = await refund(api, payment_id, "p2", 500)
    # It fails at Stripe; submitted again (the refund workflow's next submission, or the review it
    # opens), the same refund id becomes a new Stripe refund, which succeeds.
    await wait_for(
        lambda: refund_status(api, payment_id, failing["refund_id"], "SUCCEEDED"),
        timeout=60,
        what="p2 refunded after its failure",
    )
    refunds = (await order_view(fake_stripe, order))["ledger"]["refunds"]
    assert sorted((r["out_request_no"], r["refund_status"]) for r in refunds) == sorted(
        [(ok["refund_id"], "succeeded"), (failing["refund_id"], "failed"), (failing["refund_id"], "succeeded")]
    )
    view = (await api.get(f"/payments/{payment_id}")).json()
    assert view["refunded_minor"] == 1500


async def test_forged_stale_and_replayed_events_change_nothing(api, fake_stripe, stack, sessions):
    order = new_order("st-forged")
    payment_id = await pay_with_stripe(api, order, expires_in_seconds=120)
    await wait_status(api, payment_id, "PENDING")
    seen = await order_view(fake_stripe, order)
    created = next(e for e in seen["events"] if e["type"] == "payment_intent.created")
    forged = {**created, "id": "evt_forged_" + order, "type": "payment_intent.succeeded"}
    forged["data"] = {"object": {**created["data"]["object"], "status": "succeeded", "amount_received": 9990}}
    body = json.dumps(forged).encode()
    secret = Path(stack.env["PAYSENTINEL_STRIPE_WEBHOOK_SECRET_FILE"]).read_text()
    url = f"{stack.webhook_url}/webhooks/stripe"
    async with httpx.AsyncClient(timeout=10) as http:
        genuine_header = fake.sign(secret, json.dumps(created).encode())
        for headers, what in (
            ({"Stripe-Signature": genuine_header}, "a signature of another body"),
            ({"Stripe-Signature": fake.sign("whsec_not_the_secret", body)}, "a wrong secret"),
            ({"Stripe-Signature": fake.sign(secret, body, int(time.time()) - 3600)}, "a stale timestamp"),
            ({}, "no signature"),
        ):
            answer = await http.post(url, content=body, headers={**headers, "Content-Type": "application/json"})
            assert answer.status_code == 401, (what, answer.text)
            assert "error" in answer.json()
    assert await callback_rows(sessions, order) == []
    assert (await api.get(f"/payments/{payment_id}")).json()["status"] == "PENDING"
    # The real payment, its event delivered; the same event again is a duplicate.
    assert (await fake_stripe.post(f"/control/pay/{provider_order(order)}")).status_code == 200
    await wait_status(api, payment_id, "SUCCEEDED")
    seen = await order_view(fake_stripe, order)
    succeeded = next(e for e in seen["events"] if e["type"] == "payment_intent.succeeded")
    await wait_for(lambda: _callbacks(sessions, order, 1), what="the stored event")
    assert (await fake_stripe.post(f"/control/events/{succeeded['id']}/resend")).status_code == 200

    async def acknowledged_twice():
        deliveries = (await order_view(fake_stripe, order))["deliveries"]
        return sum(d["event_id"] == succeeded["id"] and d["status_code"] == 200 for d in deliveries) >= 2

    await wait_for(acknowledged_twice, what="the resent event acknowledged")
    callbacks = await callback_rows(sessions, order)
    assert [c.event_id for c in callbacks] == [succeeded["id"]]
    view = (await api.get(f"/payments/{payment_id}")).json()
    assert len(events(view, "paid")) == 1


async def test_transient_errors_are_retried_and_final_ones_are_not(api, fake_stripe):
    order = new_order("st-transient")
    await scripted(
        fake_stripe,
        order,
        pay="immediately",
        lose_events=["payment_intent.succeeded"],
        errors={"create": {"code": "rate_limit", "times": 1}, "retrieve": {"code": "lock_timeout", "times": 1}},
    )
    payment_id = await pay_with_stripe(api, order)
    await wait_status(api, payment_id, "SUCCEEDED", timeout=30)
    calls = (await order_view(fake_stripe, order))["calls"]
    assert calls["create"] == 2 and calls["retrieve"] >= 2
    final = new_order("st-final")
    await scripted(fake_stripe, final, errors={"create": {"code": "amount_too_small", "times": -1}})
    response = await start_payment(api, final, provider="stripe")
    payment_id = response.json()["payment_id"]
    view = await wait_status(api, payment_id, "FAILED", timeout=30)
    assert "amount_too_small" in view["reason"] or any("amount_too_small" in e["detail"] for e in view["timeline"])
    assert (await order_view(fake_stripe, final))["calls"]["create"] == 1


async def test_a_days_balance_transactions_reconcile_and_a_difference_is_found(
    api, fake_stripe, finance, client, sessions, books
):
    today = datetime.now(TZ).date()
    orders = {}
    for name in ("st-rc-a", "st-rc-b"):
        order = new_order(name)
        await scripted(fake_stripe, order, pay="immediately")
        orders[name] = (provider_order(order), await pay_with_stripe(api, order))
    for _, payment_id in orders.values():
        await wait_status(api, payment_id, "SUCCEEDED")
    refunded = await refund(api, orders["st-rc-b"][1], "rc1", 1500)
    await wait_for(lambda: refund_status(api, orders["st-rc-b"][1], refunded["refund_id"], "SUCCEEDED"), what="refund")
    mine = {order for order, _ in orders.values()}

    first = await reconcile(finance, client, today, passes=1, provider="stripe")
    assert first["bill_rows_loaded"] >= 3
    assert [d for d in first["discrepancies"] if d["order_id"] in mine] == []

    # The bill says another amount for one order: found as a difference of that order.
    differs = orders["st-rc-a"][0]
    assert (await fake_stripe.put("/control/bills/adjustments", json={"amounts": {differs: 100}})).status_code == 200
    try:
        second = await reconcile(finance, client, today, passes=first["report"]["passes"] + 1, provider="stripe")
    finally:
        await fake_stripe.put("/control/bills/adjustments", json={})
    found = [d for d in second["discrepancies"] if d["order_id"] in mine]
    assert [(d["order_id"], d["kind"]) for d in found] == [(differs, "amount_differs")], second["discrepancies"]
    books.allow_review(differs.split("-", 1)[1], "the settlement review of the injected amount difference")
