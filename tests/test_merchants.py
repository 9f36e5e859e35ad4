"""Merchant API keys on the checkout API, on the running system.

Every checkout route needs a merchant key with the route's scope; a merchant sees and refunds
only its own payments (another merchant's answers 404 exactly like an unknown one); order ids
are the merchant's own, so two merchants may use the same one; keys are stored hashed.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import subprocess
import sys

import httpx
import pytest
from sqlalchemy import select, text

from paysentinel import db
from tests.conftest import Merchants, Stack, new_order
from tests.helpers import (
    MERCHANT_A,
    MERCHANT_B,
    payment_id_for,
    payment_row,
    provider_order,
    script,
    start_payment,
    wait_status,
)

REFUND = {"amount_minor": 1000, "reason": "returned"}


@pytest.fixture
async def api_b(stack: Stack, merchants: Merchants):
    """The checkout API as merchant B (its key with every scope) sees it."""
    async with httpx.AsyncClient(base_url=stack.api_url, headers=merchants.headers(MERCHANT_B), timeout=30) as http:
        yield http


@pytest.fixture
async def anonymous(stack: Stack):
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        yield http


def run_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess:
    """``paysentinel ...`` against the stack's database."""
    return subprocess.run(
        [sys.executable, "-m", "paysentinel.cli", *args], env=stack.env, capture_output=True, text=True, timeout=60
    )


def cli_key(stack: Stack, merchant: str, *scopes: str) -> str:
    made = run_cli(stack, "key", "create", "--merchant", merchant, *[a for s in scopes for a in ("--scope", s)])
    assert made.returncode == 0, made.stdout + made.stderr
    [key] = re.findall(r"^psk_\S+$", made.stdout, re.MULTILINE)
    return key


def checkout_routes(payment_id: str) -> list[tuple[str, str, dict]]:
    body = {"order_id": new_order("anon"), "amount_minor": 100, "currency": "CNY"}
    return [
        ("POST", "/payments", {"json": body}),
        ("GET", f"/payments/{payment_id}", {}),
        ("POST", f"/payments/{payment_id}/refunds", {"json": REFUND, "headers": {"Idempotency-Key": "k1"}}),
        ("GET", "/callbacks", {}),
    ]


async def paid(api: httpx.AsyncClient, sim: httpx.AsyncClient, prefix: str, merchant: str = MERCHANT_A) -> str:
    order = new_order(prefix)
    await script(sim, order, merchant=merchant, pay="immediately")
    response = await start_payment(api, order, merchant=merchant)
    assert response.status_code == 201, response.text
    await wait_status(api, response.json()["payment_id"], "SUCCEEDED")
    return order


async def test_every_checkout_route_needs_a_merchant_key(anonymous, api, sim):
    order = await paid(api, sim, "mk-anon")
    payment_id = payment_id_for(order)
    for credentials in (
        {},
        {"Authorization": "Bearer psk_000000000000_guessed"},
        {"Authorization": "Bearer x"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ):
        for method, path, kwargs in checkout_routes(payment_id):
            headers = {**kwargs.get("headers", {}), **credentials}
            response = await anonymous.request(method, path, **{**kwargs, "headers": headers})
            assert response.status_code == 401, (method, path, credentials, response.text)
            error = response.json()["error"]
            assert "Authorization: Bearer <merchant API key>" in error and "paysentinel key create" in error
            assert response.headers["WWW-Authenticate"] == "Bearer"
    for path in ("/health", "/metrics", "/docs", "/openapi.json"):  # stay open
        assert (await anonymous.get(path)).status_code == 200, path
    view = (await api.get(f"/payments/{payment_id}")).json()
    assert view["status"] == "SUCCEEDED" and view["refunded_minor"] == 0  # nothing was refunded


async def test_a_revoked_key_is_refused(stack, sim, sessions):
    key = cli_key(stack, MERCHANT_A, "payments", "read")
    async with httpx.AsyncClient(base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"}) as mine:
        assert (await mine.get("/callbacks")).status_code == 200
        key_id = key.split("_")[1]
        listed = run_cli(stack, "key", "list", "--merchant", MERCHANT_A)
        assert listed.returncode == 0 and key_id in listed.stdout and key not in listed.stdout
        revoked = run_cli(stack, "key", "revoke", key_id)
        assert revoked.returncode == 0 and "revoked" in revoked.stdout, revoked.stdout + revoked.stderr
        response = await mine.get("/callbacks")
        assert response.status_code == 401 and "revoked" in response.json()["error"]
        response = await mine.post("/payments", json={"order_id": new_order("rev"), "amount_minor": 100})
        assert response.status_code == 401
    async with sessions() as session:
        assert (await session.get(db.ApiKey, key_id)).revoked_at is not None


async def test_a_merchant_can_neither_read_nor_refund_another_merchants_payment(api, api_b, sim, sessions):
    order = await paid(api, sim, "mk-mine")
    payment_id = payment_id_for(order)
    ledger_before = (await sim.get(f"/control/ledger/{provider_order(order)}")).json()
    row_before = await payment_row(sessions, payment_id)

    unknown_id = payment_id_for(new_order("mk-never"))
    for target in (payment_id, unknown_id):  # B cannot tell A's payment from one that does not exist
        read = await api_b.get(f"/payments/{target}")
        refund = await api_b.post(f"/payments/{target}/refunds", json=REFUND, headers={"Idempotency-Key": "steal"})
        assert read.status_code == refund.status_code == 404, (read.text, refund.text)
        assert (
            read.json()["error"]
            == refund.json()["error"]
            == (f"no payment {target!r}; payment ids are the payment_id POST /payments answered")
        )
    # B's callbacks list holds none of A's.
    assert all(c["payment_id"] != payment_id for c in (await api_b.get("/callbacks")).json())
    mine = (await api.get("/callbacks", params={"order_id": order})).json()
    assert mine and {c["order_id"] for c in mine} == {order}  # A sees its own order id

    await asyncio.sleep(1)  # a refund would have reached the provider by now
    assert (await sim.get(f"/control/ledger/{provider_order(order)}")).json() == ledger_before
    row = await payment_row(sessions, payment_id)
    assert (row.status, row.refunded_minor, row.status_seq) == (row_before.status, 0, row_before.status_seq)
    async with sessions() as session:
        assert (await session.scalars(select(db.Refund).where(db.Refund.payment_id == payment_id))).all() == []
    view = (await api.get(f"/payments/{payment_id}")).json()
    assert view["order_id"] == order and view["refunds"] == [] and view["status"] == "SUCCEEDED"


async def test_a_key_without_the_refunds_scope_is_403(stack, api, sim):
    order = await paid(api, sim, "mk-scope")
    payment_id = payment_id_for(order)
    key = cli_key(stack, MERCHANT_A, "payments", "read")
    async with httpx.AsyncClient(base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"}) as reader:
        assert (await reader.get(f"/payments/{payment_id}")).status_code == 200
        refused = await reader.post(f"/payments/{payment_id}/refunds", json=REFUND, headers={"Idempotency-Key": "k"})
        assert refused.status_code == 403 and "'refunds'" in refused.json()["error"], refused.text
        assert f"paysentinel key create --merchant {MERCHANT_A} --scope refunds" in refused.json()["error"]
    refunds_only = cli_key(stack, MERCHANT_A, "refunds")
    async with httpx.AsyncClient(base_url=stack.api_url, headers={"Authorization": f"Bearer {refunds_only}"}) as r:
        refused = await r.get(f"/payments/{payment_id}")
        assert refused.status_code == 403 and "'read'" in refused.json()["error"]
        refused = await r.post("/payments", json={"order_id": new_order("x"), "amount_minor": 100})
        assert refused.status_code == 403 and "'payments'" in refused.json()["error"]
    assert (await api.get(f"/payments/{payment_id}")).json()["refunded_minor"] == 0


async def test_the_same_order_id_under_two_merchants_is_two_payments(api, api_b, sim, sessions):
    order = new_order("shared")
    for merchant, client, amount in ((MERCHANT_A, api, 1200), (MERCHANT_B, api_b, 3400)):
        await script(sim, order, merchant=merchant, pay="immediately")
        response = await start_payment(client, order, amount_minor=amount, merchant=merchant)
        assert response.status_code == 201, response.text
        assert response.json()["payment_id"] == payment_id_for(order, merchant)
        assert response.json()["order_id"] == order  # the merchant's own order id
    a = await wait_status(api, payment_id_for(order, MERCHANT_A), "SUCCEEDED")
    b = await wait_status(api_b, payment_id_for(order, MERCHANT_B), "SUCCEEDED")
    assert (a["order_id"], a["amount_minor"]) == (order, 1200) and (b["order_id"], b["amount_minor"]) == (order, 3400)
    assert a["trade_no"] != b["trade_no"]
    async with sessions() as session:
        rows = (
            await session.scalars(
                select(db.Payment).where(
                    db.Payment.payment_id.in_([payment_id_for(order, MERCHANT_A), payment_id_for(order, MERCHANT_B)])
                )
            )
        ).all()
    assert sorted((r.merchant_id, r.order_id) for r in rows) == [
        (MERCHANT_A, provider_order(order, MERCHANT_A)),
        (MERCHANT_B, provider_order(order, MERCHANT_B)),
    ]
    # A refund by A touches A's payment only.
    refund = await api.post(f"/payments/{a['payment_id']}/refunds", json=REFUND, headers={"Idempotency-Key": "r1"})
    assert refund.status_code == 202, refund.text
    await wait_status(api, a["payment_id"], "PARTIALLY_REFUNDED")
    assert (await api_b.get(f"/payments/{b['payment_id']}")).json()["refunded_minor"] == 0


async def test_keys_are_stored_hashed(stack, sessions, merchants):
    key = cli_key(stack, MERCHANT_B, "read")
    key_id, secret = key.removeprefix("psk_").split("_", 1)
    async with sessions() as session:
        row = await session.get(db.ApiKey, key_id)
        assert row.secret_sha256 == hashlib.sha256(secret.encode()).hexdigest() and row.scopes == "read"
        tables = (
            await session.scalars(text("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"))
        ).all()
        for table in tables:
            dumped = "\n".join((await session.scalars(text(f'SELECT t::text FROM "{table}" t'))).all())
            for raw in (key, secret, merchants.a_key, merchants.a_key.removeprefix("psk_").split("_", 1)[1]):
                assert raw not in dumped, f"a raw key in table {table}"
