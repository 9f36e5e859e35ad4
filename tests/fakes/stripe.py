"""A fake Stripe API speaking Stripe's wire format, for tests.

Provider API (what the adapter calls through the official library): form-encoded bodies in
bracket notation (``metadata[order_id]=...``, ``expand[0]=...``), JSON answers, errors as
``{"error": {"type", "code", "message"}}``, ``Authorization: Bearer sk_test_...`` checked,
``Idempotency-Key`` honoured: the saved answer (a 5xx too, as Stripe does) is replayed for
the same key and parameters, other parameters are an ``idempotency_error``.

- ``POST /v1/payment_intents``, ``GET /v1/payment_intents/{id}``,
  ``GET /v1/payment_intents/search?query=metadata['order_id']:'...'``,
  ``POST /v1/payment_intents/{id}/cancel`` (a ``processing`` or ``succeeded`` one answers
  ``payment_intent_unexpected_state``)
- ``POST /v1/refunds``, ``GET /v1/refunds?payment_intent=...``, ``GET /v1/refunds/{id}``
  (``charge_already_refunded``, ``amount_too_large``)
- ``GET /v1/balance_transactions?created[gte]=&created[lt]=`` with ``starting_after``/
  ``has_more`` pagination and ``expand[]=data.source`` / ``data.source.payment_intent``

Every status change is an event (``evt_...``) posted to the webhook endpoint with
``Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``, signed afresh on
each attempt and resent on a compressed schedule until answered 2xx.

Control API: ``GET /health``; ``GET /control/ledger?order=...``; ``GET /control/orders/{order}``
(PaymentIntents, refunds, calls, events and their deliveries); ``POST /control/pay/{order}``
(the payer pays; ``{"processing_seconds": s, "outcome": "succeeded"|"failed"}`` for a payment
that is processing first); ``PUT /control/scripts/{order}`` (see ``Script``); ``POST
/control/fail`` (the next calls of a route answer an error code); ``POST
/control/idempotency/forget`` (Stripe forgets keys after 24 hours);
``POST /control/events/{event_id}/resend``; ``PUT /control/bills/adjustments``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional
from contextlib import asynccontextmanager
from urllib.parse import parse_qsl

import httpx
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse

from tests.fakes import FakeSetup

log = logging.getLogger("tests.fakes.stripe")

RESEND_SECONDS = "0.5,1,2,4"
EXPONENTS = {"cny": 2, "usd": 2, "eur": 2, "gbp": 2, "hkd": 2, "sgd": 2, "jpy": 0, "krw": 0}

# Error codes a script can ask for: HTTP status, Stripe error type.
ERRORS: dict[str, tuple[int, str]] = {
    "rate_limit": (429, "invalid_request_error"),
    "lock_timeout": (429, "invalid_request_error"),
    "api_error": (500, "api_error"),
    "card_declined": (402, "card_error"),
    "authentication_required": (402, "card_error"),
    "authentication_error": (401, "invalid_request_error"),
    "permission_error": (403, "invalid_request_error"),
}
ROUTES = ("create", "retrieve", "search", "cancel", "refund_create", "refund_list", "refund_retrieve", "balance_transactions")


def prepare(directory: Path, port: int, webhook_url: str) -> FakeSetup:
    """This session's API key and webhook signing secret, as files."""
    directory.mkdir(parents=True, exist_ok=True)
    api_key = "sk_test_" + secrets.token_urlsafe(24).replace("-", "x").replace("_", "y")
    webhook_secret = "whsec_" + secrets.token_urlsafe(32).replace("-", "x").replace("_", "y")
    key_file, secret_file = directory / "stripe_api_key", directory / "stripe_webhook_secret"
    key_file.write_text(api_key)
    secret_file.write_text(webhook_secret)
    for path in (key_file, secret_file):
        path.chmod(0o600)
    return FakeSetup(
        app_env={
            "PAYSENTINEL_STRIPE_API_URL": f"http://127.0.0.1:{port}",
            "PAYSENTINEL_STRIPE_API_KEY_FILE": str(key_file),
            "PAYSENTINEL_STRIPE_WEBHOOK_SECRET_FILE": str(secret_file),
        },
        fake_env={
            "STRIPE_FAKE_PORT": str(port),
            "STRIPE_FAKE_API_KEY_FILE": str(key_file),
            "STRIPE_FAKE_WEBHOOK_SECRET_FILE": str(secret_file),
            "STRIPE_FAKE_WEBHOOK_URL": webhook_url,
            "STRIPE_FAKE_RESEND_SECONDS": RESEND_SECONDS,
        },
    )


def sign(secret: str, payload: bytes, timestamp: Optional[int] = None) -> str:
    """The ``Stripe-Signature`` header for a payload."""
    ts = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{ts}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={ts},v1={digest}"


def parse_form(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Stripe's bracket notation (``a[b][0]=x``) as nested dicts and lists."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        parts = re.findall(r"[^\[\]]+|\[\]", key)
        if not parts:
            continue
        node = root
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if part == "[]":
                part = str(len(node))
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
    return _lists(root)


def _lists(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: _lists(v) for k, v in node.items()}
        if node and all(k.isdigit() for k in node):
            return [node[k] for k in sorted(node, key=int)]
    return node


def _now() -> int:
    return int(time.time())


def _id(prefix: str) -> str:
    return prefix + "_" + secrets.token_hex(12)


def major(amount: int, currency: str) -> str:
    exponent = EXPONENTS.get(currency.lower(), 2)
    return f"{amount / 10**exponent:.{exponent}f}"


class StripeError(Exception):
    def __init__(self, status: int, kind: str, code: Optional[str], message: str, param: Optional[str] = None):
        self.status, self.kind, self.code, self.message, self.param = status, kind, code, message, param

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.kind, "message": self.message}
        if self.code:
            error["code"] = self.code
            error["doc_url"] = f"https://stripe.com/docs/error-codes/{self.code.replace('_', '-')}"
        if self.param:
            error["param"] = self.param
        return {"error": error}


def scripted(code: str, route: str) -> StripeError:
    status, kind = ERRORS.get(code, (400, "invalid_request_error"))
    return StripeError(status, kind, None if code == "api_error" else code, f"{route}: scripted {code}")


def missing(kind: str, ident: str, param: str = "id") -> StripeError:
    return StripeError(404, "invalid_request_error", "resource_missing", f"No such {kind}: '{ident}'", param)


# --- State ------------------------------------------------------------------------------


@dataclass
class Script:
    """What the payer and Stripe do for one order (all optional)."""

    pay: Literal["never", "immediately", "after_delay"] = "never"
    pay_delay_seconds: float = 1.0
    processing_seconds: float = 0.0  # the payment stays processing this long first
    processing_outcome: Literal["succeeded", "failed"] = "succeeded"
    pay_on_cancel: bool = False  # the payer pays the moment we cancel
    lose_events: list[str] = field(default_factory=list)  # event types never delivered ("*": all)
    refund: Literal["succeed", "fail"] = "succeed"
    refund_pending_seconds: float = 0.0
    refund_fail_times: int = -1  # with refund=fail: how many refunds fail (-1: all)
    refund_error_after_create: int = 0  # refunds created and then answered api_error (saved under the key)
    errors: dict[str, dict[str, Any]] = field(default_factory=dict)  # route -> {"code", "times"}


@dataclass
class Intent:
    id: str
    amount: int
    currency: str
    description: str
    metadata: dict[str, str]
    client_secret: str
    created: int
    payment_method_types: list[str]
    status: str = "requires_payment_method"
    amount_received: int = 0
    latest_charge: Optional[str] = None
    canceled_at: Optional[int] = None
    cancellation_reason: Optional[str] = None

    @property
    def order(self) -> str:
        return self.metadata.get("order_id", "")

    def out(self, state: "State", expand: set[str] = frozenset()) -> dict[str, Any]:
        charge: Any = self.latest_charge
        if charge and "latest_charge" in expand:
            charge = state.charges[charge].out(state)
        return {
            "id": self.id,
            "object": "payment_intent",
            "amount": self.amount,
            "amount_capturable": 0,
            "amount_received": self.amount_received,
            "automatic_payment_methods": {"enabled": True},
            "canceled_at": self.canceled_at,
            "cancellation_reason": self.cancellation_reason,
            "capture_method": "automatic",
            "client_secret": self.client_secret,
            "confirmation_method": "automatic",
            "created": self.created,
            "currency": self.currency,
            "description": self.description,
            "last_payment_error": None,
            "latest_charge": charge,
            "livemode": False,
            "metadata": dict(self.metadata),
            "payment_method_types": self.payment_method_types,
            "status": self.status,
        }


@dataclass
class Charge:
    id: str
    amount: int
    currency: str
    payment_intent: str
    created: int
    balance_transaction: str
    amount_refunded: int = 0

    def out(self, state: "State", expand: set[str] = frozenset()) -> dict[str, Any]:
        intent: Any = self.payment_intent
        if "payment_intent" in expand:
            intent = state.intents[intent].out(state)
        return {
            "id": self.id,
            "object": "charge",
            "amount": self.amount,
            "amount_captured": self.amount,
            "amount_refunded": self.amount_refunded,
            "balance_transaction": self.balance_transaction,
            "captured": True,
            "created": self.created,
            "currency": self.currency,
            "livemode": False,
            "metadata": {},
            "paid": True,
            "payment_intent": intent,
            "refunded": self.amount_refunded >= self.amount,
            "status": "succeeded",
        }


@dataclass
class Refund:
    id: str
    amount: int
    currency: str
    payment_intent: str
    charge: str
    metadata: dict[str, str]
    created: int
    balance_transaction: str
    status: str = "pending"
    failure_reason: Optional[str] = None

    def out(self, state: "State", expand: set[str] = frozenset()) -> dict[str, Any]:
        intent: Any = self.payment_intent
        if "payment_intent" in expand:
            intent = state.intents[intent].out(state)
        body = {
            "id": self.id,
            "object": "refund",
            "amount": self.amount,
            "balance_transaction": self.balance_transaction,
            "charge": self.charge,
            "created": self.created,
            "currency": self.currency,
            "metadata": dict(self.metadata),
            "payment_intent": intent,
            "reason": None,
            "status": self.status,
        }
        if self.failure_reason:
            body["failure_reason"] = self.failure_reason
        return body


@dataclass
class BalanceTransaction:
    id: str
    type: str
    amount: int
    currency: str
    created: int
    source: str

    def out(self, state: "State", expand: set[str]) -> Optional[dict[str, Any]]:
        source: Any = self.source
        sub = {e.removeprefix("data.source.") for e in expand if e.startswith("data.source.")}
        if "data.source" in expand or sub:
            obj = state.charges.get(self.source) or state.refunds.get(self.source)
            if obj is None:
                return None
            source = obj.out(state, sub)
            adjust = state.bill_adjustments
            order = state.intents[obj.payment_intent].order
            if isinstance(obj, Charge) and order in adjust.get("drop_orders", []):
                return None
            if isinstance(obj, Charge) and order in adjust.get("amounts", {}):
                source["amount"] = int(adjust["amounts"][order])
        return {
            "id": self.id,
            "object": "balance_transaction",
            "amount": self.amount,
            "available_on": self.created,
            "created": self.created,
            "currency": self.currency,
            "description": None,
            "fee": 0,
            "fee_details": [],
            "net": self.amount,
            "reporting_category": "charge" if self.type == "charge" else "refund",
            "source": source,
            "status": "pending",
            "type": self.type,
        }


@dataclass
class Saved:
    fingerprint: str
    status: int
    body: dict[str, Any]


class State:
    def __init__(self, api_key: str, webhook_secret: str, webhook_url: str, resend: list[float]):
        self.api_key, self.webhook_secret, self.webhook_url, self.resend = api_key, webhook_secret, webhook_url, resend
        self.intents: dict[str, Intent] = {}
        self.charges: dict[str, Charge] = {}
        self.refunds: dict[str, Refund] = {}
        self.balance: list[BalanceTransaction] = []
        self.idempotency: dict[str, Saved] = {}
        self.scripts: dict[str, Script] = {}
        self.errors_left: dict[tuple[str, str], int] = {}  # (order or "*", route) -> calls left
        self.error_codes: dict[tuple[str, str], str] = {}
        self.refund_failures_left: dict[str, int] = {}
        self.refund_errors_left: dict[str, int] = {}
        self.calls: dict[str, Counter[str]] = {}
        self.events: dict[str, dict[str, Any]] = {}
        self.event_orders: dict[str, str] = {}
        self.deliveries: dict[str, list[dict[str, Any]]] = {}
        self.bill_adjustments: dict[str, Any] = {}
        self.http: Any = None
        self.tasks: set[asyncio.Task] = set()

    def script(self, order: str) -> Script:
        return self.scripts.get(order) or Script()

    def set_script(self, order: str, script: Script) -> None:
        self.scripts[order] = script
        for route in ROUTES:
            self.errors_left.pop((order, route), None)
        for route, spec in script.errors.items():
            if route not in ROUTES:
                raise ValueError(f"unknown route {route!r}; one of {ROUTES}")
            self.errors_left[(order, route)] = int(spec.get("times", 1))
            self.error_codes[(order, route)] = str(spec.get("code", "api_error"))
        self.refund_failures_left[order] = script.refund_fail_times if script.refund == "fail" else 0
        self.refund_errors_left[order] = script.refund_error_after_create

    def check(self, order: str, route: str) -> None:
        """Count the call; raise the scripted error if one is due."""
        self.calls.setdefault(order or "*", Counter())[route] += 1
        for who in (order, "*"):
            left = self.errors_left.get((who, route), 0)
            if left:
                self.errors_left[(who, route)] = left - 1 if left > 0 else left
                raise scripted(self.error_codes[(who, route)], route)

    def spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def later(self, seconds: float, action) -> None:
        async def run():
            await asyncio.sleep(seconds)
            action()

        self.spawn(run())

    # Payments --------------------------------------------------------------------------

    def pay(self, intent: Intent, processing_seconds: Optional[float] = None, outcome: Optional[str] = None) -> Optional[str]:
        """The payer pays; why not, or None."""
        if intent.status not in ("requires_payment_method", "requires_confirmation", "requires_action"):
            return f"the PaymentIntent is {intent.status}"
        script = self.script(intent.order)
        seconds = script.processing_seconds if processing_seconds is None else processing_seconds
        if seconds > 0:
            intent.status = "processing"
            self.emit("payment_intent.processing", intent)
            result = outcome or script.processing_outcome
            self.later(seconds, lambda: self.finish_processing(intent, result))
            return None
        self.succeed(intent)
        return None

    def finish_processing(self, intent: Intent, outcome: str) -> None:
        if intent.status != "processing":
            return
        if outcome == "succeeded":
            self.succeed(intent)
        else:
            intent.status = "requires_payment_method"
            self.emit("payment_intent.payment_failed", intent)

    def succeed(self, intent: Intent) -> None:
        now = _now()
        charge = Charge(
            id=_id("ch"),
            amount=intent.amount,
            currency=intent.currency,
            payment_intent=intent.id,
            created=now,
            balance_transaction=_id("txn"),
        )
        self.charges[charge.id] = charge
        self.balance.append(
            BalanceTransaction(charge.balance_transaction, "charge", charge.amount, charge.currency, now, charge.id)
        )
        intent.status, intent.amount_received, intent.latest_charge = "succeeded", intent.amount, charge.id
        log.info("PaymentIntent %s (%s) succeeded", intent.id, intent.order)
        self.emit("payment_intent.succeeded", intent)
        self.emit("charge.succeeded", charge)

    def cancel(self, intent: Intent, reason: Optional[str]) -> None:
        intent.status, intent.canceled_at, intent.cancellation_reason = "canceled", _now(), reason
        self.emit("payment_intent.canceled", intent)

    # Refunds -----------------------------------------------------------------------------

    def start_refund(self, refund: Refund, order: str) -> None:
        script = self.script(order)
        if script.refund_pending_seconds > 0:
            self.later(script.refund_pending_seconds, lambda: self.finish_refund(refund, order))
        else:
            self.finish_refund(refund, order)

    def finish_refund(self, refund: Refund, order: str) -> None:
        if refund.status != "pending":
            return
        left = self.refund_failures_left.get(order, 0)
        charge = self.charges[refund.charge]
        if left != 0:
            self.refund_failures_left[order] = left - 1 if left > 0 else left
            refund.status, refund.failure_reason = "failed", "lost_or_stolen_card"
            charge.amount_refunded -= refund.amount
            self.balance.append(
                BalanceTransaction(_id("txn"), "refund_failure", refund.amount, refund.currency, _now(), refund.id)
            )
            self.emit("refund.failed", refund)
        else:
            refund.status = "succeeded"
            self.emit("refund.updated", refund)
        self.emit("charge.refund.updated", refund)

    def ledger(self, order: str) -> dict[str, Any]:
        intents = [i for i in self.intents.values() if i.order == order]
        refunds = [r for r in self.refunds.values() if self.intents[r.payment_intent].order == order]
        captured = sum(i.amount_received for i in intents if i.status == "succeeded")
        refunded = sum(r.amount for r in refunds if r.status == "succeeded")
        currency = intents[0].currency.upper() if intents else None

        def refunded_of(intent: Intent) -> int:
            return sum(r.amount for r in refunds if r.payment_intent == intent.id and r.status == "succeeded")

        return {
            "order": order,
            "currency": currency,
            "captured_minor": captured,
            "refunded_minor": refunded,
            "net_minor": captured - refunded,
            "trades": [
                {
                    "trade_no": i.id,
                    "trade_status": i.status,
                    "total_amount": major(i.amount, i.currency),
                    "paid": i.status == "succeeded",
                    "refunded_amount": major(refunded_of(i), i.currency),
                }
                for i in intents
            ],
            "refunds": [
                {
                    "out_request_no": r.metadata.get("refund_id", r.id),
                    "refund_id": r.id,
                    "trade_no": r.payment_intent,
                    "refund_amount": major(r.amount, r.currency),
                    "currency": r.currency.upper(),
                    "refund_status": r.status,
                    "fail_reason": r.failure_reason,
                }
                for r in refunds
            ],
        }

    # Events ------------------------------------------------------------------------------

    def emit(self, kind: str, obj: Any) -> None:
        order = self.intents[obj.id].order if isinstance(obj, Intent) else self.intents[obj.payment_intent].order
        event = {
            "id": _id("evt"),
            "object": "event",
            "api_version": "2025-03-31.basil",
            "created": _now(),
            "data": {"object": obj.out(self)},
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": kind,
        }
        self.events[event["id"]] = event
        self.event_orders[event["id"]] = order
        lost = self.script(order).lose_events
        if "*" in lost or kind in lost:
            self.record(order, event, 0, None, "lost (scripted)")
            return
        self.spawn(self.deliver(order, event))

    async def deliver(self, order: str, event: dict[str, Any]) -> None:
        body = json.dumps(event, indent=2).encode()  # Stripe sends pretty-printed JSON
        for attempt in range(1, len(self.resend) + 2):
            status, error = None, None
            try:
                response = await self.http.post(
                    self.webhook_url,
                    content=body,
                    headers={
                        "Content-Type": "application/json; charset=utf-8",
                        "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
                        "Stripe-Signature": sign(self.webhook_secret, body),
                    },
                )
                status = response.status_code
                if not response.is_success:
                    error = response.text[:200]
            except Exception as err:  # noqa: BLE001 - any transport failure is a failed attempt
                error = f"{type(err).__name__}: {err}"
            self.record(order, event, attempt, status, error)
            if status is not None and 200 <= status < 300:
                return
            if attempt > len(self.resend):
                return
            await asyncio.sleep(self.resend[attempt - 1])

    def record(self, order: str, event: dict[str, Any], attempt: int, status: Optional[int], error: Optional[str]) -> None:
        self.deliveries.setdefault(order, []).append(
            {
                "event_id": event["id"],
                "type": event["type"],
                "attempt": attempt,
                "status_code": status,
                "error": error,
            }
        )


# --- The application ----------------------------------------------------------------------


def create_app(state: State):
    @asynccontextmanager
    async def lifespan(app):
        async with httpx.AsyncClient(timeout=5) as http:
            state.http = http
            yield
            for task in list(state.tasks):
                task.cancel()

    app = FastAPI(title="fake Stripe API", lifespan=lifespan)

    def answer(status: int, body: dict[str, Any], replayed: bool = False) -> JSONResponse:
        headers = {"Request-Id": "req_" + secrets.token_hex(7)}
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        return JSONResponse(body, status_code=status, headers=headers)

    def authorised(request: Request) -> Optional[JSONResponse]:
        given = request.headers.get("authorization", "")
        if given != f"Bearer {state.api_key}":
            shown = given.removeprefix("Bearer ")[:12]
            return answer(401, StripeError(401, "invalid_request_error", None, f"Invalid API Key provided: {shown}***").body())
        return None

    async def form(request: Request) -> dict[str, Any]:
        return parse_form(parse_qsl((await request.body()).decode(), keep_blank_values=True))

    def query(request: Request) -> dict[str, Any]:
        return parse_form(parse_qsl(request.url.query, keep_blank_values=True))

    async def idempotent(request: Request, params: dict[str, Any], handler) -> JSONResponse:
        """Run a POST once per Idempotency-Key: the saved answer is replayed (5xx too)."""
        if (refused := authorised(request)) is not None:
            return refused
        key = request.headers.get("idempotency-key")
        fingerprint = json.dumps([request.method, request.url.path, params], sort_keys=True)
        if key is not None:
            saved = state.idempotency.get(key)
            if saved is not None:
                if saved.fingerprint != fingerprint:
                    return answer(
                        400,
                        StripeError(
                            400,
                            "idempotency_error",
                            None,
                            "Keys for idempotent requests can only be used with the same "
                            "parameters they were first used with. Try using a key other than "
                            f"'{key}' if you meant to execute a different request.",
                        ).body(),
                    )
                return answer(saved.status, saved.body, replayed=True)
        try:
            status, body = 200, handler(params)
        except StripeError as err:
            status, body = err.status, err.body()
        if key is not None and status not in (401, 409, 429):  # answers of requests that never ran are not saved
            state.idempotency[key] = Saved(fingerprint, status, body)
        return answer(status, body)

    def read(request: Request, handler) -> JSONResponse:
        if (refused := authorised(request)) is not None:
            return refused
        try:
            return answer(200, handler(query(request)))
        except StripeError as err:
            return answer(err.status, err.body())

    def expand_of(params: dict[str, Any]) -> set[str]:
        value = params.get("expand") or []
        return set(value if isinstance(value, list) else [value])

    def intent_of(intent_id: str) -> Intent:
        intent = state.intents.get(intent_id)
        if intent is None:
            raise missing("payment_intent", intent_id, "intent")
        return intent

    def amount(params: dict[str, Any], name: str = "amount") -> int:
        raw = params.get(name)
        if raw is None or not str(raw).isdigit() or int(raw) <= 0:
            raise StripeError(
                400, "invalid_request_error", "parameter_invalid_integer", f"Invalid positive integer: {raw!r}", name
            )
        return int(raw)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    # PaymentIntents ----------------------------------------------------------------------

    @app.post("/v1/payment_intents")
    async def create_intent(request: Request):
        params = await form(request)

        def handle(params: dict[str, Any]) -> dict[str, Any]:
            metadata = params.get("metadata") or {}
            state.check(metadata.get("order_id", ""), "create")
            value = amount(params)
            currency = str(params.get("currency", ""))
            if currency not in EXPONENTS:
                raise StripeError(
                    400, "invalid_request_error", "parameter_invalid_string", f"Invalid currency: {currency}", "currency"
                )
            if any(len(str(v)) > 500 for v in metadata.values()):
                raise StripeError(
                    400,
                    "invalid_request_error",
                    "parameter_invalid_string",
                    "Metadata values can have up to 500 characters",
                    "metadata",
                )
            intent_id = _id("pi")
            intent = Intent(
                id=intent_id,
                amount=value,
                currency=currency,
                description=params.get("description", ""),
                metadata=dict(metadata),
                client_secret=f"{intent_id}_secret_{secrets.token_hex(12)}",
                created=_now(),
                payment_method_types=params.get("payment_method_types") or ["card"],
            )
            state.intents[intent.id] = intent
            state.emit("payment_intent.created", intent)
            script = state.script(intent.order)
            if script.pay != "never":
                delay = script.pay_delay_seconds if script.pay == "after_delay" else 0.1
                state.later(delay, lambda: state.pay(intent))
            return intent.out(state, expand_of(params))

        return await idempotent(request, params, handle)

    @app.get("/v1/payment_intents/search")
    async def search_intents(request: Request):
        def handle(params: dict[str, Any]) -> dict[str, Any]:
            text = str(params.get("query", ""))
            found = re.fullmatch(r"metadata\['(\w+)'\]:'((?:[^'\\]|\\.)*)'", text.strip())
            if found is None:
                raise StripeError(
                    400, "invalid_request_error", "parameter_invalid_string", f"Unsupported search query: {text}", "query"
                )
            name, value = found.group(1), re.sub(r"\\(.)", r"\1", found.group(2))
            state.check(value if name == "order_id" else "", "search")
            sub = {e.removeprefix("data.") for e in expand_of(params)}
            data = [
                i.out(state, sub)
                for i in sorted(state.intents.values(), key=lambda i: -i.created)
                if i.metadata.get(name) == value
            ]
            return {
                "object": "search_result",
                "data": data,
                "has_more": False,
                "next_page": None,
                "url": "/v1/payment_intents/search",
                "total_count": len(data),
            }

        return read(request, handle)

    @app.get("/v1/payment_intents/{intent_id}")
    async def retrieve_intent(intent_id: str, request: Request):
        def handle(params: dict[str, Any]) -> dict[str, Any]:
            intent = intent_of(intent_id)
            state.check(intent.order, "retrieve")
            return intent.out(state, expand_of(params))

        return read(request, handle)

    @app.post("/v1/payment_intents/{intent_id}/cancel")
    async def cancel_intent(intent_id: str, request: Request):
        params = await form(request)

        def handle(params: dict[str, Any]) -> dict[str, Any]:
            intent = intent_of(intent_id)
            state.check(intent.order, "cancel")
            if state.script(intent.order).pay_on_cancel and intent.status == "requires_payment_method":
                state.pay(intent)  # the payer was a moment faster
            if intent.status in ("succeeded", "canceled", "processing"):
                raise StripeError(
                    400,
                    "invalid_request_error",
                    "payment_intent_unexpected_state",
                    f"You cannot cancel this PaymentIntent because it has a status of {intent.status}. Only a "
                    "PaymentIntent with one of the following statuses may be canceled: requires_payment_method, "
                    "requires_capture, requires_confirmation, requires_action.",
                    None,
                )
            state.cancel(intent, params.get("cancellation_reason"))
            return intent.out(state, expand_of(params))

        return await idempotent(request, params, handle)

    # Refunds -------------------------------------------------------------------------------

    @app.post("/v1/refunds")
    async def create_refund(request: Request):
        params = await form(request)

        def handle(params: dict[str, Any]) -> dict[str, Any]:
            intent = intent_of(str(params.get("payment_intent", "")))
            order = intent.order
            state.check(order, "refund_create")
            if intent.status != "succeeded" or intent.latest_charge is None:
                raise StripeError(
                    400,
                    "invalid_request_error",
                    "payment_intent_unexpected_state",
                    f"PaymentIntent {intent.id} has no successful charge to refund (status {intent.status}).",
                    "payment_intent",
                )
            charge = state.charges[intent.latest_charge]
            left = charge.amount - charge.amount_refunded
            value = amount(params) if "amount" in params else left
            if left <= 0:
                raise StripeError(
                    400,
                    "invalid_request_error",
                    "charge_already_refunded",
                    f"Charge {charge.id} has already been refunded.",
                    None,
                )
            if value > left:
                raise StripeError(
                    400,
                    "invalid_request_error",
                    "amount_too_large",
                    f"Refund amount ({major(value, charge.currency)}) is greater than unrefunded "
                    f"amount on charge ({major(left, charge.currency)})",
                    "amount",
                )
            now = _now()
            refund = Refund(
                id=_id("re"),
                amount=value,
                currency=charge.currency,
                payment_intent=intent.id,
                charge=charge.id,
                metadata=dict(params.get("metadata") or {}),
                created=now,
                balance_transaction=_id("txn"),
            )
            state.refunds[refund.id] = refund
            charge.amount_refunded += value
            state.balance.append(
                BalanceTransaction(refund.balance_transaction, "refund", -value, refund.currency, now, refund.id)
            )
            state.emit("refund.created", refund)
            state.start_refund(refund, order)  # its outcome now, or pending until the scripted delay ends
            body = refund.out(state)
            if state.refund_errors_left.get(order, 0) > 0:
                state.refund_errors_left[order] -= 1
                raise StripeError(500, "api_error", None, "An unknown error occurred (scripted, after the refund was created)")
            return body

        return await idempotent(request, params, handle)

    @app.get("/v1/refunds")
    async def list_refunds(request: Request):
        def handle(params: dict[str, Any]) -> dict[str, Any]:
            intent_id = params.get("payment_intent")
            refunds = sorted(state.refunds.values(), key=lambda r: (-r.created, r.id))
            if intent_id is not None:
                intent = intent_of(str(intent_id))
                state.check(intent.order, "refund_list")
                refunds = [r for r in refunds if r.payment_intent == intent.id]
            return page(refunds, params, "/v1/refunds", lambda r: r.out(state))

        return read(request, handle)

    @app.get("/v1/refunds/{refund_id}")
    async def retrieve_refund(refund_id: str, request: Request):
        def handle(params: dict[str, Any]) -> dict[str, Any]:
            refund = state.refunds.get(refund_id)
            if refund is None:
                raise missing("refund", refund_id)
            state.check(state.intents[refund.payment_intent].order, "refund_retrieve")
            return refund.out(state)

        return read(request, handle)

    # Balance transactions --------------------------------------------------------------------

    @app.get("/v1/balance_transactions")
    async def list_balance(request: Request):
        def handle(params: dict[str, Any]) -> dict[str, Any]:
            state.check("", "balance_transactions")
            created = params.get("created") or {}
            rows = sorted(state.balance, key=lambda b: (-b.created, b.id))
            for op, test in (
                ("gte", lambda a, b: a >= b),
                ("gt", lambda a, b: a > b),
                ("lte", lambda a, b: a <= b),
                ("lt", lambda a, b: a < b),
            ):
                if isinstance(created, dict) and op in created:
                    bound = int(created[op])
                    rows = [r for r in rows if test(r.created, bound)]
            expand = expand_of(params)
            return page(rows, params, "/v1/balance_transactions", lambda b: b.out(state, expand))

        return read(request, handle)

    def page(items: list, params: dict[str, Any], url: str, render) -> dict[str, Any]:
        """One page of a list, newest first; ``starting_after`` is the last id of the page before."""
        limit = max(1, min(100, int(params.get("limit", 10))))
        rendered = [out for out in (render(item) for item in items) if out is not None]
        after = params.get("starting_after")
        if after:
            ids = [out["id"] for out in rendered]
            if after not in ids:
                raise missing("object", after, "starting_after")
            rendered = rendered[ids.index(after) + 1 :]
        return {"object": "list", "data": rendered[:limit], "has_more": len(rendered) > limit, "url": url}

    # Control ----------------------------------------------------------------------------------

    def orders_intent(order: str) -> Optional[Intent]:
        found = [i for i in state.intents.values() if i.order == order]
        return max(found, key=lambda i: i.created) if found else None

    @app.get("/control/ledger")
    async def ledgers(order: list[str] = Query(default_factory=list)):
        return {"orders": {name: state.ledger(name) for name in order}}

    @app.get("/control/ledger/{order}")
    async def ledger(order: str):
        return state.ledger(order)

    @app.get("/control/orders/{order}")
    async def order_view(order: str):
        intents = [i for i in state.intents.values() if i.order == order]
        return {
            "intents": [i.out(state) for i in intents],
            "refunds": [r.out(state) for r in state.refunds.values() if r.payment_intent in {i.id for i in intents}],
            "calls": dict(state.calls.get(order, Counter())),
            "events": [e for eid, e in state.events.items() if state.event_orders[eid] == order],
            "deliveries": state.deliveries.get(order, []),
            "ledger": state.ledger(order),
        }

    @app.post("/control/pay/{order}")
    async def pay(order: str, request: Request):
        options = json.loads(await request.body() or b"{}")
        intent = orders_intent(order)
        if intent is None:
            return JSONResponse({"error": f"no PaymentIntent for order {order}"}, status_code=404)
        why = state.pay(intent, options.get("processing_seconds"), options.get("outcome"))
        if why is not None:
            return JSONResponse({"error": why, "intent": intent.out(state)}, status_code=409)
        return intent.out(state)

    @app.put("/control/scripts/{order}")
    async def put_script(order: str, request: Request):
        body = json.loads(await request.body() or b"{}")
        try:
            script = Script(**body)
            state.set_script(order, script)
        except (TypeError, ValueError) as err:
            return JSONResponse({"error": str(err)}, status_code=422)
        return {"order": order, "script": body}

    @app.post("/control/fail")
    async def fail(request: Request):
        """``{"route": "balance_transactions", "code": "api_error", "times": 1, "order": optional}``."""
        body = json.loads(await request.body() or b"{}")
        route = body.get("route")
        if route not in ROUTES:
            return JSONResponse({"error": f"route must be one of {ROUTES}"}, status_code=422)
        who = body.get("order") or "*"
        state.errors_left[(who, route)] = int(body.get("times", 1))
        state.error_codes[(who, route)] = str(body.get("code", "api_error"))
        return {"route": route, "order": who, "code": state.error_codes[(who, route)], "times": state.errors_left[(who, route)]}

    @app.post("/control/idempotency/forget")
    async def forget():
        """Stripe keeps idempotency keys for 24 hours: after that they are new keys."""
        count = len(state.idempotency)
        state.idempotency.clear()
        return {"forgotten": count}

    @app.post("/control/events/{event_id}/resend")
    async def resend(event_id: str):
        event = state.events.get(event_id)
        if event is None:
            return JSONResponse({"error": f"no event {event_id}"}, status_code=404)
        state.spawn(state.deliver(state.event_orders[event_id], event))
        return {"resent": event_id}

    @app.put("/control/bills/adjustments")
    async def adjust(request: Request):
        """``{"amounts": {order: minor}, "drop_orders": [order]}``: the balance transactions
        then show another charge amount / leave the charge out."""
        state.bill_adjustments = json.loads(await request.body() or b"{}")
        return state.bill_adjustments

    return app


def main() -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s fake-stripe %(levelname)s %(message)s")
    env = os.environ
    state = State(
        api_key=Path(env["STRIPE_FAKE_API_KEY_FILE"]).read_text().strip(),
        webhook_secret=Path(env["STRIPE_FAKE_WEBHOOK_SECRET_FILE"]).read_text().strip(),
        webhook_url=env["STRIPE_FAKE_WEBHOOK_URL"],
        resend=[float(s) for s in env.get("STRIPE_FAKE_RESEND_SECONDS", RESEND_SECONDS).split(",") if s.strip()],
    )
    uvicorn.run(create_app(state), host="127.0.0.1", port=int(env["STRIPE_FAKE_PORT"]), log_level="warning")


if __name__ == "__main__":
    main()
