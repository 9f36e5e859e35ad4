"""Adapter for Stripe (PaymentIntents, Refunds, webhook events, balance transactions).

It runs on the official ``stripe`` library (``StripeClient`` with its httpx client, the
``*_async`` methods), pointed at ``PAYSENTINEL_STRIPE_API_URL``; the library's own retries
are off (``max_network_retries=0``): Temporal retries the activity.

Trades are PaymentIntents, one per order:

- created with the amount in minor units, the currency in lower case, ``metadata[order_id]``
  and the idempotency key ``order:<order_id>``; the trade number is the PaymentIntent id
  (``pi_...``). Stripe has no hosted page for a PaymentIntent: the payer pays on the
  merchant's page with Stripe.js, which needs the PaymentIntent's ``client_secret``, so the
  trade's ``pay_url`` carries the ``client_secret`` (not a URL) for the merchant's page.
- looked up by the id ``create_trade`` returned (the workflow always passes it as
  ``created_trade_no``); without one, by the PaymentIntent search
  ``metadata['order_id']:'<order>'``, which is eventually consistent (a PaymentIntent
  created a moment ago may not be found yet).
- closed by cancelling the PaymentIntent. A PaymentIntent that is ``processing`` (a bank
  debit under way) is not cancelled: the close answers ``PAYING`` and is asked again later;
  one that ``succeeded`` answers paid; one already ``canceled`` answers closed.

Refunds carry our refund id in ``metadata[refund_id]``. Stripe forgets idempotency keys
after 24 hours and, within them, replays a saved 5xx answer for the same key; so before
creating one the PaymentIntent's refunds are listed and one with our refund id is reused,
and a create answered with a 5xx is looked for again and retried under a derived key. A
failed refund is final at Stripe: submitting the refund id again creates a new refund
(under a new key) with the same ``metadata[refund_id]``.

The daily bill is the day's balance transactions (``created[gte]``/``created[lt]`` in the
settlement time zone), read page by page with ``data.source.payment_intent`` expanded:
``charge``/``payment`` rows are payments, ``refund``/``payment_refund`` rows refunds, each
with the amount and currency of its charge or refund (minor units). Balance transactions
that are not ours (no ``metadata[order_id]`` on the PaymentIntent: invoices,
subscriptions, payouts, fees) are left out, and so is a refund that failed (its
``refund_failure`` transaction gives the money back).

Webhooks: ``Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>``
checked with ``stripe.WebhookSignature.verify_header`` within the tolerance; the events
``payment_intent.succeeded``/``.processing``/``.canceled`` are delivered, other verified
events are acknowledged and ignored. Stripe wants any 2xx: accepted events are answered
``{"received": true, ...}``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import date, datetime, time, timedelta, timezone
from typing import Any, Optional, TypeVar
from zoneinfo import ZoneInfo

import httpx
import stripe as stripe_sdk  # the official library (this module is paysentinel.providers.stripe)

from paysentinel.config import Settings
from paysentinel.models import (
    CURRENCY_EXPONENTS,
    CreateTradeInput,
    ProviderCallback,
    ProviderRefund,
    RefundInput,
    RefundStatus,
    Trade,
)
from paysentinel.providers.base import (
    CallbackIgnored,
    CallbackReply,
    MalformedCallback,
    ProviderRejected,
    json_reply,
)
from paysentinel.settlement import REFUND, BillFormatError, SettlementRow
from paysentinel.signing import SignatureError

from paysentinel.providers.stripe_objects import (
    BILL_PAGE_SIZE,
    BILL_PAYMENT_TYPES,
    DESCRIPTION_MAX,
    EVENT_STATUSES,
    METADATA_VALUE_MAX,
    REFUND_KEY_ROUNDS,
    REFUND_STATUSES,
    RESOURCE_MISSING,
    STRIPE_CURRENCIES,
    UNEXPECTED_STATE,
    classify,
    error_code,
    from_unix,
    header_value,
    is_our_refund,
    order_of,
    pick_refund,
    refund_of,
    trade_of,
)

log = logging.getLogger("paysentinel.providers.stripe")
T = TypeVar("T")


class StripeProvider:
    name = "stripe"

    def __init__(
        self, api_url: str, api_key: str, webhook_secret: str, tolerance_seconds: int = 300, timeout_seconds: float = 5.0
    ):
        self._secret = webhook_secret
        self._tolerance = tolerance_seconds
        self._client = stripe_sdk.StripeClient(
            api_key,
            base_addresses={"api": api_url.rstrip("/")},
            max_network_retries=0,  # Temporal retries
            http_client=stripe_sdk.HTTPXClient(timeout=timeout_seconds),
        )
        self._v1 = self._client.v1

    async def _call(self, what: str, request: Callable[[], Awaitable[T]]) -> T:
        try:
            return await request()
        except stripe_sdk.StripeError as err:
            raise classify(err, what) from err

    # --- Orders -----------------------------------------------------------------------

    def check_order(self, order_id: str, amount_minor: int, currency: str) -> Optional[str]:
        if currency not in STRIPE_CURRENCIES or currency not in CURRENCY_EXPONENTS:
            return f"Stripe does not settle {currency} here; use one of {', '.join(sorted(STRIPE_CURRENCIES))}"
        if len(order_id) > METADATA_VALUE_MAX:
            return f"order id longer than Stripe's {METADATA_VALUE_MAX}-character metadata value"
        return None

    async def create_trade(self, request: CreateTradeInput) -> Trade:
        intent = await self._call(
            "create PaymentIntent",
            lambda: self._v1.payment_intents.create_async(
                params={
                    "amount": request.amount_minor,
                    "currency": request.currency.lower(),
                    "description": (request.subject or request.order_id)[:DESCRIPTION_MAX],
                    "metadata": {"order_id": request.order_id},
                    "automatic_payment_methods": {"enabled": True},
                },
                options={"idempotency_key": f"order:{request.order_id}"},
            ),
        )
        return trade_of(intent.to_dict(), request.order_id)

    async def _retrieve(self, intent_id: str) -> Optional[dict[str, Any]]:
        """The PaymentIntent (with its latest charge), None when Stripe has no such one."""
        try:
            intent = await self._v1.payment_intents.retrieve_async(intent_id, params={"expand": ["latest_charge"]})
        except stripe_sdk.InvalidRequestError as err:
            if error_code(err) == RESOURCE_MISSING:
                return None
            raise classify(err, f"retrieve {intent_id}") from err
        except stripe_sdk.StripeError as err:
            raise classify(err, f"retrieve {intent_id}") from err
        return intent.to_dict()

    async def _search(self, order_id: str) -> list[dict[str, Any]]:
        """The order's PaymentIntents by metadata. Stripe's search is eventually consistent:
        one created a moment ago may be missing (the workflow passes ``created_trade_no``)."""
        query = "metadata['order_id']:'" + order_id.replace("\\", "\\\\").replace("'", "\\'") + "'"
        found = await self._call(
            "search PaymentIntents",
            lambda: self._v1.payment_intents.search_async(params={"query": query, "limit": 10, "expand": ["data.latest_charge"]}),
        )
        return [item.to_dict() for item in found.data]

    async def _find(self, order_id: str, trade_no: Optional[str]) -> Optional[dict[str, Any]]:
        if trade_no:
            intent = await self._retrieve(trade_no)
            if intent is not None and order_of(intent) not in (None, order_id):
                raise ProviderRejected("order_mismatch", f"PaymentIntent {trade_no} belongs to order {order_of(intent)}")
            return intent
        intents = await self._search(order_id)
        if not intents:
            return None
        # A paid one first, then the newest.
        return max(intents, key=lambda i: (i["status"] == "succeeded", i.get("created") or 0))

    async def query_trade(
        self, order_id: str, trade_no: Optional[str] = None, *, created_trade_no: Optional[str] = None
    ) -> Trade:
        """By ``trade_no`` or ``created_trade_no`` (a retrieve, consistent); without either by
        the metadata search (eventually consistent)."""
        intent = await self._find(order_id, trade_no or created_trade_no)
        if intent is None:
            return Trade(exists=False, order_id=order_id)
        return trade_of(intent, order_id)

    async def close_trade(self, order_id: str, idempotency_key: str, *, created_trade_no: Optional[str] = None) -> Trade:
        intent = await self._find(order_id, created_trade_no)
        if intent is None:
            return Trade(exists=False, order_id=order_id)
        if intent["status"] in ("succeeded", "canceled", "processing"):
            return trade_of(intent, order_id)  # paid, closed already, or cannot be closed yet
        try:
            cancelled = await self._v1.payment_intents.cancel_async(
                intent["id"], params={"cancellation_reason": "abandoned"}, options={"idempotency_key": idempotency_key}
            )
        except stripe_sdk.InvalidRequestError as err:
            if error_code(err) != UNEXPECTED_STATE:
                raise classify(err, f"cancel {intent['id']}") from err
            # The payer was faster (succeeded), the payment is under way (processing), or it
            # was cancelled already: what it is now is the answer.
            now = await self._retrieve(intent["id"])
            if now is None:
                return Trade(exists=False, order_id=order_id)
            return trade_of(now, order_id)
        except stripe_sdk.StripeError as err:
            raise classify(err, f"cancel {intent['id']}") from err
        result = cancelled.to_dict()
        if result["status"] != "canceled":  # a replayed answer of an earlier cancel: ask again
            return trade_of(await self._retrieve(intent["id"]) or result, order_id)
        return trade_of(result, order_id)

    # --- Refunds -----------------------------------------------------------------------

    async def _refunds(self, intent_id: str) -> list[dict[str, Any]]:
        """Every refund of the PaymentIntent (a list, strongly consistent, unlike search)."""
        page = await self._call(
            f"list refunds of {intent_id}",
            lambda: self._v1.refunds.list_async(params={"payment_intent": intent_id, "limit": 100}),
        )
        refunds: list[dict[str, Any]] = []
        try:
            async for refund in page.auto_paging_iter():
                refunds.append(refund.to_dict())
        except stripe_sdk.StripeError as err:
            raise classify(err, f"list refunds of {intent_id}") from err
        return refunds

    async def refund(self, request: RefundInput, idempotency_key: str) -> ProviderRefund:
        refund_id = request.refund_id
        known = [r for r in await self._refunds(request.trade_no) if is_our_refund(r, refund_id)]
        found = pick_refund(known, refund_id)
        if found is not None and REFUND_STATUSES.get(found["status"]) is not RefundStatus.FAILED:
            return refund_of(found, refund_id)  # submitted before (maybe beyond Stripe's 24-hour key memory)
        failed = len(known)  # a failed refund is final at Stripe: a new one, under a new key
        base_key = idempotency_key if failed == 0 else f"{idempotency_key}:again{failed}"
        params = {
            "payment_intent": request.trade_no,
            "amount": request.amount_minor,
            "metadata": {"refund_id": refund_id, "order_id": request.order_id, "reason": request.reason[:METADATA_VALUE_MAX]},
        }
        last: Optional[Exception] = None
        for round_ in range(REFUND_KEY_ROUNDS):
            key = base_key if round_ == 0 else f"{base_key}:after5xx{round_}"
            try:
                created = await self._v1.refunds.create_async(params=params, options={"idempotency_key": key})  # type: ignore[arg-type]
            except stripe_sdk.StripeError as err:
                mapped = classify(err, f"refund {refund_id} of {request.trade_no}")
                if not (isinstance(err, stripe_sdk.APIError) and (err.http_status or 0) >= 500):
                    raise mapped from err
                # Stripe saved this 5xx under the key and would replay it: did a refund come of it?
                again = pick_refund(await self._refunds(request.trade_no), refund_id)
                if again is not None and REFUND_STATUSES.get(again["status"]) is not RefundStatus.FAILED:
                    return refund_of(again, refund_id)
                last = mapped
                continue
            return refund_of(created.to_dict(), refund_id)
        assert last is not None
        raise last

    async def query_refund(self, order_id: str, refund_id: str, trade_no: Optional[str] = None) -> Optional[ProviderRefund]:
        if trade_no:
            intents = [trade_no]
        else:
            intents = [intent["id"] for intent in await self._search(order_id)]
        refunds: list[dict[str, Any]] = []
        for intent_id in intents:
            refunds += await self._refunds(intent_id)
        found = pick_refund(refunds, refund_id)
        return refund_of(found, refund_id) if found is not None else None

    # --- The daily bill -------------------------------------------------------------------

    async def bill_rows(self, day: date, tz: ZoneInfo) -> AsyncIterator[SettlementRow]:
        """The day's balance transactions (the day in ``tz``), page by page."""
        start = datetime.combine(day, time(), tz)
        end = datetime.combine(day + timedelta(days=1), time(), tz)
        page = await self._call(
            f"balance transactions of {day}",
            lambda: self._v1.balance_transactions.list_async(
                params={
                    "created": {"gte": int(start.timestamp()), "lt": int(end.timestamp())},
                    "limit": BILL_PAGE_SIZE,
                    "expand": ["data.source", "data.source.payment_intent"],
                }
            ),
        )
        iterator = page.auto_paging_iter().__aiter__()
        while True:
            try:
                transaction = await iterator.__anext__()
            except StopAsyncIteration:
                return
            except stripe_sdk.StripeError as err:
                raise classify(err, f"balance transactions of {day}") from err
            row = self.bill_row(transaction.to_dict())
            if row is not None:
                yield row

    @staticmethod
    def bill_row(transaction: Mapping[str, Any]) -> Optional[SettlementRow]:
        """One balance transaction as a bill row; None for one that is not a payment or refund
        of ours (fees, payouts, invoices, a refund_failure)."""
        kind = BILL_PAYMENT_TYPES.get(transaction.get("type", ""))
        if kind is None:
            return None
        source = transaction.get("source")
        if not isinstance(source, Mapping):
            raise BillFormatError(f"balance transaction {transaction.get('id')}: source not expanded")
        intent = source.get("payment_intent")
        if not isinstance(intent, Mapping):
            if intent is None:
                return None  # a charge or refund not made through a PaymentIntent: not ours
            raise BillFormatError(f"balance transaction {transaction.get('id')}: payment_intent not expanded")
        order_id = order_of(intent)
        if not order_id:
            return None  # not made by us
        if kind == REFUND and REFUND_STATUSES.get(source.get("status", "")) is RefundStatus.FAILED:
            return None  # a failed refund: its refund_failure transaction gives the money back
        try:
            currency = str(source["currency"]).upper()
            return SettlementRow(
                kind=kind,
                trade_no=intent["id"],
                order_id=order_id,
                refund_no=((source.get("metadata") or {}).get("refund_id") or source["id"]) if kind == REFUND else "",
                amount_minor=abs(int(source["amount"])),
                currency=currency,
                at=from_unix(transaction["created"]) or datetime.now(timezone.utc),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise BillFormatError(f"balance transaction {transaction.get('id')}: {err!r}") from err

    # --- Webhooks -------------------------------------------------------------------------

    def verify(self, headers: Mapping[str, str], body: bytes) -> None:
        """Check ``Stripe-Signature`` over the raw body; raises SignatureError."""
        header = header_value(headers, "Stripe-Signature")
        try:
            payload = body.decode("utf-8")
        except UnicodeDecodeError as err:
            raise SignatureError("body is not UTF-8") from err
        try:
            stripe_sdk.WebhookSignature.verify_header(payload, header, self._secret, self._tolerance)
        except stripe_sdk.SignatureVerificationError as err:
            raise SignatureError(str(err)) from err
        # The library refuses old timestamps; one far in the future is refused too.
        timestamp = next((int(part[2:]) for part in (header or "").split(",") if part.startswith("t=")), 0)
        if timestamp > datetime.now(timezone.utc).timestamp() + self._tolerance:
            raise SignatureError(f"timestamp {timestamp} is in the future")

    def parse_callback(self, headers: Mapping[str, str], body: bytes) -> ProviderCallback:
        self.verify(headers, body)
        try:
            event = json.loads(body)
            event_id, kind = event["id"], event["type"]
            if not isinstance(event_id, str) or not event_id:
                raise ValueError("event id missing")
        except (ValueError, KeyError, TypeError) as err:
            raise MalformedCallback(f"not a Stripe event: {err}") from err
        status = EVENT_STATUSES.get(kind)
        if status is None:
            raise CallbackIgnored(f"event {event_id} of type {kind} carries no payment result")
        try:
            intent = event["data"]["object"]
            if intent.get("object") != "payment_intent":
                raise ValueError(f"data.object is a {intent.get('object')!r}, not a payment_intent")
            if not isinstance(intent["id"], str) or not intent.get("status"):
                raise ValueError("the PaymentIntent has no id or status")
            order_id = order_of(intent)
            if not order_id:
                raise CallbackIgnored(
                    f"event {event_id}: PaymentIntent {intent.get('id')} has no metadata order_id (not created by us)"
                )
            amount = intent["amount_received"] if status.is_paid else intent["amount"]
            return ProviderCallback(
                event_id=event_id,
                provider=self.name,
                order_id=order_id,
                trade_no=intent["id"],
                trade_status=status,
                amount_minor=int(amount),
                currency=str(intent["currency"]).upper(),
                paid_at=from_unix(event.get("created")) if status.is_paid else None,
                received_at=datetime.now(timezone.utc),
            )
        except CallbackIgnored:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise MalformedCallback(f"event {event_id} is not a valid PaymentIntent event: {err}") from err

    def callback_reply(self, status: int, detail: object) -> CallbackReply:
        """Stripe wants a 2xx to stop resending: ``{"received": true, ...}``; otherwise ``{"error": ...}``."""
        if status < 300:
            extra = detail if isinstance(detail, dict) else {"detail": detail}
            return json_reply(status, {"received": True, **extra})
        return json_reply(status, {"error": detail})


def build(settings: Settings, http: httpx.AsyncClient) -> StripeProvider:
    for field in ("stripe_api_url", "stripe_api_key", "stripe_webhook_secret"):
        if not getattr(settings, field):
            raise ValueError(f"PAYSENTINEL_{field.upper()} is required for the stripe provider")
    return StripeProvider(
        settings.stripe_api_url,
        settings.stripe_api_key,
        settings.stripe_webhook_secret,
        settings.webhook_tolerance_seconds,
        settings.provider_timeout_seconds,
    )
