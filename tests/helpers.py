"""Small helpers shared by the end-to-end tests."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Collection, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response
from sqlalchemy import select
from temporalio.client import Client

from paysentinel import db, signing
from paysentinel.config import new_webhook_secret
from paysentinel.devserver import free_port

# This test session's secrets (the stack runs outside the development profile, so it needs its
# own): the provider's callback secret and the merchant webhook secret.
SIMULATOR_SECRET = new_webhook_secret()
MERCHANT_SECRET = new_webhook_secret()
MERCHANT_PREVIOUS_SECRET = new_webhook_secret()  # the stack rotates: merchant webhooks carry both signatures


# The test session's merchants (tests/conftest.py makes them and their keys): the ``api`` fixture
# is merchant A with every scope. A merchant's order ``o`` is ``<merchant>-o`` past the checkout
# API: at the provider (the simulator), in the payments table, the workflow and the operator API.
MERCHANT_A = "testa"
MERCHANT_B = "testb"


def provider_order(order: str, merchant: str | None = MERCHANT_A) -> str:
    """The internal order number of a merchant's order (the simulator's, the database's);
    ``merchant=None``: ``order`` is that number already (tests of the simulator alone)."""
    return order if merchant is None else f"{merchant}-{order}"


def payment_id_for(order: str, merchant: str = MERCHANT_A) -> str:
    """The payment id the checkout API gives a merchant's order."""
    return f"payment-{merchant}-{order}"


def own_operator_tokens() -> str:
    """A PAYSENTINEL_OPERATOR_TOKENS value shaped like the development default, with a token of
    its own in place of the published one (so a start outside development accepts it)."""
    import hashlib
    import secrets

    from paysentinel.config import DEVELOPMENT_SECRET_VALUES, Settings

    [entry] = Settings.model_fields["operator_tokens"].default
    token = secrets.token_hex(16)
    parts = [
        (hashlib.sha256(token.encode()).hexdigest() if len(part) == 64 else token) if part in DEVELOPMENT_SECRET_VALUES else part
        for part in str(entry).split(":")
    ]
    return ":".join(parts)


async def start_payment(
    api: httpx.AsyncClient, order_id: str, amount_minor: int = 9990, *, merchant: str = MERCHANT_A, **extra
) -> httpx.Response:
    """POST /payments as ``merchant`` (whose key ``api`` sends); an accepted order joins the running
    test's books (see ``Books``) under its internal order number."""
    body = {
        "order_id": order_id,
        "amount_minor": amount_minor,
        "currency": "CNY",
        "subject": "test order",
        "customer": {"email": f"{order_id}@example.com"},
        **extra,
    }
    response = await api.post("/payments", json=body)
    if response.is_success and _books is not None:
        _books.started(provider_order(order_id, merchant))
    return response


# --- The books: the provider's ledger against our payments table ---------------------------

# How long the books may take to settle after a scenario; the check polls every BOOKS_POLL_SECONDS.
BOOKS_TIMEOUT_SECONDS = float(os.environ.get("PAYSENTINEL_TEST_BOOKS_TIMEOUT_SECONDS", "30"))
BOOKS_POLL_SECONDS = 0.2
OPEN_STATUSES = frozenset({"CREATED", "PENDING", "REFUNDING"})


@dataclass
class Books:
    """The orders one test started, and those it leaves open (or in review) on purpose."""

    orders: dict[str, None] = field(default_factory=dict)  # in the order they were started
    exempted: dict[str, str] = field(default_factory=dict)  # order -> why its books are not checked
    review_allowed: dict[str, str] = field(default_factory=dict)  # order -> why IN_REVIEW may differ

    def started(self, order_id: str) -> None:
        self.orders.setdefault(order_id, None)

    def exempt(self, order_id: str, reason: str, merchant: str = MERCHANT_A) -> None:
        """Leave this merchant's order out of the check (e.g. the test ends while it is deliberately PENDING)."""
        if not reason.strip():
            raise ValueError("say why the order is exempt from the books check")
        self.exempted[provider_order(order_id, merchant)] = reason

    def allow_review(self, order_id: str, reason: str, merchant: str = MERCHANT_A) -> None:
        """This merchant's order may end IN_REVIEW with amounts that differ from the provider's (a person decides)."""
        if not reason.strip():
            raise ValueError("say why the order may stay in review")
        self.review_allowed[provider_order(order_id, merchant)] = reason

    def to_check(self) -> list[str]:
        return [order for order in self.orders if order not in self.exempted]


_books: Books | None = None  # the running test's books, set by the ``books`` fixture


def track_books(books: Books | None) -> None:
    global _books
    _books = books


def current_books() -> Books:
    if _books is None:
        raise RuntimeError("no books are being kept: this test does not use the running stack")
    return _books


def exempt(order_id: str, reason: str) -> None:
    """``Books.exempt`` for the running test."""
    current_books().exempt(order_id, reason)


def allow_review(order_id: str, reason: str) -> None:
    """``Books.allow_review`` for the running test."""
    current_books().allow_review(order_id, reason)


@dataclass
class _Side:
    order: str
    ledger: dict | None = None
    row: db.Payment | None = None

    @property
    def provider_net(self) -> int:
        return self.ledger["net_minor"] if self.ledger else 0

    @property
    def our_net(self) -> int:
        assert self.row is not None
        return (self.row.paid_amount_minor or 0) - (self.row.refunded_minor or 0)

    def problem(self, review_allowed: bool) -> str | None:
        """Why this order's books are not settled yet, or None."""
        if self.row is None:
            return "no payments row"
        if self.row.status in OPEN_STATUSES:
            return f"still {self.row.status}"
        if self.provider_net != self.our_net:
            if self.row.status == "IN_REVIEW" and review_allowed:
                return None
            return f"net differs: provider {self.provider_net}, ours {self.our_net}"
        return None

    def describe(self, problem: str) -> str:
        books = self.ledger or {}
        trades = (
            ", ".join(
                f"{t['trade_no']} {t['trade_status']} {t['total_amount']}"
                + (f" refunded {t['refunded_amount']}" if t["refunded_amount"] != "0.00" else "")
                for t in books.get("trades", [])
            )
            or "none"
        )
        refunds = (
            ", ".join(f"{r['out_request_no']} {r['refund_amount']} {r['refund_status']}" for r in books.get("refunds", []))
            or "none"
        )
        provider = (
            f"provider captured {books.get('captured_minor', 0)}, refunded {books.get('refunded_minor', 0)}"
            f" (net {self.provider_net}; trades: {trades}; refunds: {refunds})"
        )
        if self.row is None:
            ours = "ours: no payments row"
        else:
            row = self.row
            review = f" ({row.review_reason})" if row.review_reason else ""
            ours = f"ours {row.status}{review}, paid {row.paid_amount_minor}, refunded {row.refunded_minor} (net {self.our_net})"
        return f"  {self.order}: {problem}\n    {provider}\n    {ours}"


# Where each provider's ledger is read (GET /control/ledger): the simulator's and the fakes'
# (tests/conftest.py sets them when the stack starts).
_PROVIDER_URLS: dict[str, str] = {}


def set_provider_urls(urls: dict[str, str]) -> None:
    _PROVIDER_URLS.clear()
    _PROVIDER_URLS.update(urls)


async def _ledgers(
    sim: httpx.AsyncClient, orders: list[str], providers: dict[str, str] | None = None, batch: int = 100
) -> dict[str, dict]:
    """The provider's ledger of each order (GET /control/ledger?order=..., a batch at a time);
    ``providers`` names each order's provider (default: the simulator, ``sim``)."""
    by_provider: dict[str, list[str]] = {}
    for order in orders:
        by_provider.setdefault((providers or {}).get(order, "simulator"), []).append(order)
    found: dict[str, dict] = {}
    for provider, names in by_provider.items():
        http = sim if provider == "simulator" else httpx.AsyncClient(base_url=_PROVIDER_URLS[provider], timeout=30)
        try:
            for start in range(0, len(names), batch):
                response = await http.get("/control/ledger", params={"order": names[start : start + batch]})
                assert response.status_code == 200, response.text
                found.update(response.json()["orders"])
        finally:
            if http is not sim:
                await http.aclose()
    return found


async def assert_books_balance(
    sim: httpx.AsyncClient,
    sessions,
    order_ids: Iterable[str] | None = None,
    timeout: float | None = None,
    *,
    allow_review: bool | Collection[str] = False,
) -> dict[str, dict]:
    """For each internal order number (by default every order this test started and did not exempt;
    ``provider_order`` turns a merchant's order into one), wait until our
    payments row is no longer CREATED, PENDING or REFUNDING and the provider's captured − refunded
    equals our paid − refunded. An IN_REVIEW row may differ only for orders in ``allow_review``
    (True: all of them). Fails after ``timeout`` (PAYSENTINEL_TEST_BOOKS_TIMEOUT_SECONDS) showing
    both sides of every order that does not balance. Returns the provider's ledger per order."""
    if order_ids is None:
        order_ids = current_books().to_check()
    orders = list(dict.fromkeys(order_ids))
    timeout = BOOKS_TIMEOUT_SECONDS if timeout is None else timeout

    def review_allowed(order: str) -> bool:
        return allow_review is True or (not isinstance(allow_review, bool) and order in allow_review)

    sides = {order: _Side(order) for order in orders}
    deadline = time.monotonic() + timeout
    while orders:
        async with sessions() as session:
            rows = {
                row.order_id: row
                for row in (await session.scalars(select(db.Payment).where(db.Payment.order_id.in_(orders)))).all()
            }
        ledgers = await _ledgers(sim, orders, {order: row.provider for order, row in rows.items()})
        unsettled: dict[str, str] = {}
        for order in orders:
            side = sides[order]
            side.ledger, side.row = ledgers[order], rows.get(order)
            if (problem := side.problem(review_allowed(order))) is not None:
                unsettled[order] = problem
        if not unsettled:
            return {order: side.ledger for order, side in sides.items()}
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"the books do not balance after {timeout:g}s for {len(unsettled)} of {len(orders)} order(s) "
                "(provider captured − refunded against our paid − refunded, minor units):\n"
                + "\n".join(sides[order].describe(problem) for order, problem in unsettled.items())
            )
        await asyncio.sleep(BOOKS_POLL_SECONDS)
    return {}


async def script(sim: httpx.AsyncClient, order_id: str, merchant: str | None = MERCHANT_A, **behaviour) -> None:
    """Script the simulator for a merchant's order (the provider knows its internal number)."""
    response = await sim.put(f"/control/scripts/{provider_order(order_id, merchant)}", json=behaviour)
    assert response.status_code == 200, response.text


async def wait_status(api: httpx.AsyncClient, payment_id: str, status: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    view: dict = {}
    while time.monotonic() < deadline:
        view = (await api.get(f"/payments/{payment_id}")).json()
        if view.get("status") == status:
            return view
        await asyncio.sleep(0.2)
    raise AssertionError(f"{payment_id} did not reach {status} in {timeout}s; last view: {view}")


async def wait_for(predicate, timeout: float = 20, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def mails_to(mailbox, address: str, count: int, timeout: float = 20) -> list:
    """The e-mails to ``address`` once at least ``count`` have arrived."""

    async def arrived():
        found = mailbox.to(address)
        return found if len(found) >= count else None

    return await wait_for(arrived, timeout=timeout, what=f"{count} e-mail(s) to {address}")


async def payment_row(sessions, payment_id: str, status: str | None = None) -> db.Payment | None:
    """The payment's row; with ``status``, once the row shows it (it follows the workflow a moment later)."""
    deadline = time.monotonic() + 10
    while True:
        async with sessions() as session:
            row = await session.get(db.Payment, payment_id)
        if status is None or (row is not None and row.status == status) or time.monotonic() > deadline:
            return row
        await asyncio.sleep(0.1)


async def callback_rows(sessions, order_id: str, merchant: str = MERCHANT_A) -> list[db.Callback]:
    internal = provider_order(order_id, merchant)
    async with sessions() as session:
        return list((await session.scalars(select(db.Callback).where(db.Callback.order_id == internal))).all())


async def sim_trade(sim: httpx.AsyncClient, order_id: str, merchant: str | None = MERCHANT_A) -> dict:
    response = await sim.get(f"/control/trades/{provider_order(order_id, merchant)}")
    assert response.status_code == 200, response.text
    return response.json()


async def search_count(client: Client, query: str, expected: int, timeout: float = 15) -> int:
    """Visibility is eventually consistent: wait until the query finds ``expected`` workflows."""

    async def count() -> bool:
        return (await client.count_workflows(query)).count == expected

    await wait_for(count, timeout, f"{expected} workflow(s) matching {query}")
    return expected


def events(view: dict, name: str) -> list[dict]:
    return [entry for entry in view["timeline"] if entry["event"] == name]


@asynccontextmanager
async def receiver(answers: list[int], host: str = "127.0.0.1", secret: str = MERCHANT_SECRET):
    """A real HTTP endpoint that checks Standard Webhooks signatures (by default the merchant
    webhook secret; the simulator's callbacks: ``secret=SIMULATOR_SECRET``), answers the given
    status codes in turn (the last one repeats) and records (event, event id) it got."""
    received: list[tuple[dict, str]] = []
    app = FastAPI()

    @app.post("/hook")
    async def hook(request: Request) -> Response:
        body = await request.body()
        event_id = signing.verify(secret, request.headers, body, tolerance_seconds=60)
        received.append((await request.json(), event_id))
        return Response(status_code=answers[min(len(received), len(answers)) - 1])

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    try:
        yield f"http://{host}:{port}/hook", received
    finally:
        server.should_exit = True
        await task


async def reconcile(finance: httpx.AsyncClient, client: Client, day, passes: int, provider: str = "simulator") -> dict:
    """Start ``provider``'s reconciliation of ``day`` through the operator API and wait for its
    report (the ``passes``-th run), once the day's last run has ended (its report is written
    before its alerts are sent, and a request while it runs joins it)."""
    from temporalio.client import WorkflowFailureError
    from temporalio.service import RPCError

    from workflows.reconcile import reconcile_workflow_id

    try:
        await client.get_workflow_handle(reconcile_workflow_id(provider, day)).result()
    except (RPCError, WorkflowFailureError):
        pass  # never run, or failed
    response = await finance.post(f"/operator/reconciliations/{day}", params={"provider": provider})
    assert response.status_code == 202, response.text

    async def done():
        view = await finance.get(f"/operator/reconciliations/{day}", params={"provider": provider})
        if view.status_code != 200:
            return None
        body = view.json()
        finished = body["report"]["status"] in ("DONE", "PROVISIONAL")  # PROVISIONAL: the day is not over yet
        return body if finished and body["report"]["passes"] == passes else None

    return await wait_for(done, timeout=90, what=f"{provider} reconciliation {day} pass {passes}")
