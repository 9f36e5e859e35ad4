"""Adapter for the bundled provider simulator (Alipay-like semantics, Standard Webhooks)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from datetime import date, datetime, timezone
from typing import Any, Optional
from zoneinfo import ZoneInfo

import httpx
from pydantic import ValidationError

from paysentinel import signing
from paysentinel.config import Settings
from paysentinel.models import (
    CreateTradeInput,
    ProviderCallback,
    ProviderRefund,
    RefundInput,
    RefundStatus,
    Trade,
    TradeStatus,
    to_major,
    to_minor,
)
from paysentinel.providers.base import CallbackReply, MalformedCallback, ProviderRejected, ProviderUnavailable, json_reply
from paysentinel.settlement import SettlementRow, parse_bill

# Provider sub-codes that mean "try again later" rather than "no".
TRANSIENT_CODES = {"ACQ.SYSTEM_ERROR", "ACQ.RATE_LIMITED"}


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _rejected(status: int, body: dict[str, Any], default: str) -> ProviderRejected:
    return ProviderRejected(body.get("sub_code", f"HTTP_{status}"), body.get("sub_msg") or default)


REFUND_STATUSES = {
    "REFUND_PROCESSING": RefundStatus.PROCESSING,
    "REFUND_SUCCESS": RefundStatus.SUCCEEDED,
    "REFUND_FAILED": RefundStatus.FAILED,
}


def _refund(body: dict[str, Any]) -> ProviderRefund:
    return ProviderRefund(
        refund_id=body["out_request_no"],
        trade_no=body["trade_no"],
        amount_minor=to_minor(body["refund_amount"], body["currency"]),
        status=REFUND_STATUSES[body["refund_status"]],
        fail_reason=body.get("fail_reason"),
    )


def _trade(body: dict[str, Any]) -> Trade:
    currency = body["currency"]
    return Trade(
        order_id=body["out_trade_no"],
        trade_no=body["trade_no"],
        status=TradeStatus(body["trade_status"]),
        amount_minor=to_minor(body["total_amount"], currency),
        currency=currency,
        pay_url=body.get("pay_url"),
        paid_at=_parse_time(body.get("gmt_payment")),
    )


class SimulatorProvider:
    name = "simulator"

    def __init__(self, http: httpx.AsyncClient, base_url: str, webhook_secret: signing.Secrets, tolerance_seconds: int = 300):
        self._http = http
        self._base_url = base_url.rstrip("/")
        self._secret = webhook_secret
        self._tolerance = tolerance_seconds

    async def _call(self, method: str, path: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
        try:
            response = await self._http.request(method, self._base_url + path, **kwargs)
        except httpx.TimeoutException as err:
            raise ProviderUnavailable(f"{method} {path}: provider timed out ({type(err).__name__})") from err
        except httpx.TransportError as err:
            raise ProviderUnavailable(f"{method} {path}: provider unreachable ({err!r})") from err
        try:
            body = response.json()
        except ValueError:
            body = {}
        sub_code = body.get("sub_code", "")
        if response.status_code >= 500 or response.status_code == 429 or sub_code in TRANSIENT_CODES:
            raise ProviderUnavailable(f"{method} {path}: HTTP {response.status_code} {sub_code} {body.get('msg', '')}".strip())
        return response.status_code, body

    def check_order(self, order_id: str, amount_minor: int, currency: str) -> Optional[str]:
        return None  # the simulator takes every order the checkout API accepts

    async def create_trade(self, request: CreateTradeInput) -> Trade:
        status, body = await self._call(
            "POST",
            "/v1/trades",
            headers={"Idempotency-Key": request.idempotency_key},
            json={
                "out_trade_no": request.order_id,
                "total_amount": to_major(request.amount_minor, request.currency),
                "currency": request.currency,
                "subject": request.subject or request.order_id,
                "notify_url": request.notify_url,
                "time_expire": request.expires_at.isoformat(),
            },
        )
        if status != 200:
            raise _rejected(status, body, "trade not created")
        return _trade(body["trade"])

    async def bill_rows(self, day: date, tz: ZoneInfo) -> AsyncIterator[SettlementRow]:
        async for row in parse_bill(self.bill_lines(day), tz):
            yield row

    async def bill_lines(self, day: date) -> AsyncIterator[str]:
        """Stream the day's settlement bill as the provider sends it (text in pieces; a
        line break inside a quoted field is the parser's to keep)."""
        path = f"/v1/bills/{day.isoformat()}"
        try:
            async with self._http.stream("GET", self._base_url + path, timeout=60) as response:
                if response.status_code != 200:
                    body = (await response.aread()).decode("utf-8", "replace")[:300]
                    if response.status_code >= 500:
                        raise ProviderUnavailable(f"GET {path}: HTTP {response.status_code} {body}")
                    raise ProviderRejected(f"HTTP_{response.status_code}", f"bill for {day} refused: {body}")
                async for text in response.aiter_text():
                    yield text
        except httpx.TransportError as err:
            raise ProviderUnavailable(f"GET {path}: provider unreachable ({err!r})") from err

    async def query_trade(
        self, order_id: str, trade_no: Optional[str] = None, *, created_trade_no: Optional[str] = None
    ) -> Trade:
        status, body = await self._call("GET", f"/v1/trades/{order_id}", params={"trade_no": trade_no} if trade_no else None)
        if status == 404 and body.get("sub_code") == "ACQ.TRADE_NOT_EXIST":
            return Trade(exists=False, order_id=order_id)
        if status != 200:
            raise _rejected(status, body, "query rejected")
        return _trade(body["trade"])

    async def close_trade(self, order_id: str, idempotency_key: str, *, created_trade_no: Optional[str] = None) -> Trade:
        status, body = await self._call("POST", f"/v1/trades/{order_id}/close", headers={"Idempotency-Key": idempotency_key})
        if status == 404 and body.get("sub_code") == "ACQ.TRADE_NOT_EXIST":
            return Trade(exists=False, order_id=order_id)
        if "trade" in body:  # closed now, already closed, or ACQ.TRADE_STATUS_ERROR: already paid
            return _trade(body["trade"])
        raise _rejected(status, body, "close rejected")

    async def refund(self, request: RefundInput, idempotency_key: str) -> ProviderRefund:
        status, body = await self._call(
            "POST",
            f"/v1/trades/{request.order_id}/refunds",
            headers={"Idempotency-Key": idempotency_key},
            json={
                "out_request_no": request.refund_id,
                "trade_no": request.trade_no,
                "refund_amount": to_major(request.amount_minor, request.currency),
                "refund_reason": request.reason[:256],
            },
        )
        if status != 200:
            raise _rejected(status, body, "refund rejected")
        return _refund(body["refund"])

    async def query_refund(self, order_id: str, refund_id: str, trade_no: Optional[str] = None) -> ProviderRefund | None:
        status, body = await self._call("GET", f"/v1/trades/{order_id}/refunds/{refund_id}")
        if status == 404:
            return None
        if status != 200:
            raise _rejected(status, body, "refund query rejected")
        return _refund(body["refund"])

    def parse_callback(self, headers: Mapping[str, str], body: bytes) -> ProviderCallback:
        event_id = signing.verify(self._secret, headers, body, self._tolerance)
        try:
            event = json.loads(body)
            data = event["data"]
            currency = data["currency"]
            if event["id"] != event_id:
                raise MalformedCallback("webhook-id header and body id differ")
            return ProviderCallback(
                event_id=event_id,
                provider=self.name,
                order_id=data["out_trade_no"],
                trade_no=data["trade_no"],
                trade_status=TradeStatus(data["trade_status"]),
                amount_minor=to_minor(data["total_amount"], currency),
                currency=currency,
                paid_at=_parse_time(data.get("gmt_payment")),
                received_at=datetime.now(timezone.utc),
            )
        except MalformedCallback:
            raise
        except (ValueError, KeyError, TypeError, ValidationError, ArithmeticError) as err:
            raise MalformedCallback(f"callback body is not a valid trade event: {err}") from err

    def callback_reply(self, status: int, detail: object) -> CallbackReply:
        """JSON: the outcome's fields when accepted, {"error": ...} otherwise."""
        return json_reply(status, detail if status < 300 else {"error": detail})


def build(settings: Settings, http: httpx.AsyncClient) -> SimulatorProvider:
    return SimulatorProvider(
        http,
        settings.effective_simulator_url,
        # During a rotation callbacks signed with the previous secret are accepted too.
        (settings.simulator_webhook_secret, settings.simulator_webhook_secret_previous),
        settings.webhook_tolerance_seconds,
    )
