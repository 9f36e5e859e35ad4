"""Abuse limits: token buckets per client and per address on POST /payments and webhooks."""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from unittest import mock

import httpx
import pytest
from sqlalchemy import select
from temporalio.service import RPCError

from paysentinel import db, signing
from paysentinel.config import DEV_WEBHOOK_SECRET, Settings
from paysentinel.ratelimit import Limit, RateLimiter, TokenBucket, admit
from starters.limits import address_key, client_key
from tests.conftest import new_order
from tests.helpers import payment_id_for, provider_order, start_payment


# --- The pure rules ------------------------------------------------------------------------


def test_a_bucket_allows_its_burst_then_refills_at_its_rate():
    bucket = TokenBucket(Limit(per_second=2, burst=3), now=0)
    for _ in range(3):
        assert bucket.wait(0) == 0
        bucket.take()
    assert bucket.wait(0) == pytest.approx(0.5)  # one token every half second
    assert bucket.wait(0.25) == pytest.approx(0.25)
    assert bucket.wait(0.5) == 0
    assert bucket.full(100) and bucket.tokens == 3  # never more than the burst


def test_a_request_needs_a_token_from_every_bucket_and_a_refused_one_takes_none():
    clients, addresses = RateLimiter(Limit(1, 1)), RateLimiter(Limit(1, 2))

    def ask(client: str, now: float = 0.0):
        return admit([("client", clients, client), ("address", addresses, "1.2.3.4")], now)

    assert ask("a") is None
    refusal = ask("a")
    assert refusal.name == "client" and refusal.retry_after == pytest.approx(1) and refusal.retry_after_header == "1"
    assert ask("b") is None  # the refusal of "a" took nothing from the address
    refusal = ask("c")
    assert refusal.name == "address" and refusal.retry_after_header == "1"
    assert ask("c", now=1.0) is None


def test_a_rate_of_zero_is_no_limit_and_retry_after_is_whole_seconds():
    off = RateLimiter(Limit(0, 1))
    assert all(admit([("client", off, "k")], 0) is None for _ in range(1000))
    slow = RateLimiter(Limit(0.1, 1))
    assert admit([("client", slow, "k")], 0) is None
    assert admit([("client", slow, "k")], 0.5).retry_after_header == "10"  # 9.5 s rounded up


def test_buckets_are_bounded():
    limiter = RateLimiter(Limit(1, 1), max_keys=10)
    for i in range(100):
        admit([("client", limiter, f"k{i}")], 0)
    assert len(limiter) == 10


def test_keys():
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert address_key("::ffff:203.0.113.7") == "203.0.113.7" and address_key("203.0.113.7") == "203.0.113.7"
    assert client_key({b"authorization": b"Bearer x"}, "1.2.3.4").startswith("credential:")
    assert client_key({}, "1.2.3.4") == "address:1.2.3.4"


# --- The running parts, with low limits ----------------------------------------------------


@asynccontextmanager
async def in_process(stack, create_app, address: str = "203.0.113.7", **limits):
    """The app of a part, created here on the stack's Temporal, database and task queue with
    the given limits, called in-process from ``address``."""
    with mock.patch.dict(os.environ, stack.env):
        settings = Settings(_env_file=None, **limits)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=(address, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://paysentinel.test", timeout=30) as http:
            yield http


async def payment_rows(sessions, order_id: str) -> list:
    async with sessions() as session:
        return (await session.scalars(select(db.Payment).where(db.Payment.order_id == order_id))).all()


def assert_429(response: httpx.Response, limit: str) -> None:
    assert response.status_code == 429, response.text
    assert int(response.headers["Retry-After"]) >= 1
    body = response.json()
    assert body["error"].startswith("too many requests") and body["limit"] == limit
    assert "Nothing was done" in body["error"]


async def test_payment_creation_over_the_limit_is_429_and_creates_nothing(stack, client, sim, sessions, merchants):
    from starters.checkout_api import create_app

    async with in_process(
        stack,
        create_app,
        rate_limit_payments_per_second=0.01,
        rate_limit_payments_burst=1,
        rate_limit_payments_address_per_second=0.01,
        rate_limit_payments_address_burst=2,
    ) as api:
        api.headers.update(merchants.headers())  # merchant A
        first = new_order("limit")
        await sim.put(f"/control/scripts/{provider_order(first)}", json={"pay": "immediately"})
        assert (await start_payment(api, first)).status_code == 201

        # The same client again: over its own limit.
        second = new_order("limited")
        assert_429(await start_payment(api, second), "client")
        # Another client from the same address passes (the refusal took nothing from the address)...
        other = await api.post("/payments", json={"order_id": "x"}, headers={"Authorization": "Bearer shop-b"})
        assert other.status_code == 401  # past the limits: an unknown key
        # ... and then the address is spent for everyone on it.
        third = new_order("limited")
        response = await api.post(
            "/payments",
            headers={"Authorization": "Bearer shop-c"},
            json={"order_id": third, "amount_minor": 100, "currency": "CNY", "subject": "x"},
        )
        assert_429(response, "address")

    for order in (second, third):  # a limited request changed nothing
        assert await payment_rows(sessions, provider_order(order)) == []
        with pytest.raises(RPCError):
            await client.get_workflow_handle(payment_id_for(order)).describe()
    # The stack's own API (default limits) is not affected by these.
    async with httpx.AsyncClient(base_url=stack.api_url) as api:
        assert (await api.get("/health")).status_code == 200


async def test_webhooks_over_the_limit_are_429_and_store_nothing(stack, sessions):
    from starters.webhook_receiver import create_app
    from tests.test_webhooks import trade_event

    async with in_process(
        stack,
        create_app,
        address="2001:db8:7::1",
        rate_limit_webhooks_per_second=0.01,
        rate_limit_webhooks_burst=5,
        rate_limit_webhooks_address_per_second=0.01,
        rate_limit_webhooks_address_burst=1,
    ) as webhooks:
        assert (await webhooks.post("/webhooks/simulator", content=b"{}")).status_code == 401  # unsigned
        secret = stack.env.get("PAYSENTINEL_SIMULATOR_WEBHOOK_SECRET", DEV_WEBHOOK_SECRET)  # a verified callback
        order = new_order("whlimit")
        event_id, body = trade_event(order, "T-limit")
        response = await webhooks.post(
            "/webhooks/simulator", content=body, headers=signing.signed_headers(secret, event_id, body)
        )
        assert_429(response, "address")  # the /64 of the first request
        assert (await webhooks.get("/health")).status_code == 200  # only the limited route
    async with sessions() as session:
        stored = (await session.scalars(select(db.Callback).where(db.Callback.event_id == event_id))).all()
    assert stored == []
