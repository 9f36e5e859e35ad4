"""The provider simulator's HTTP service.

Provider API (what the worker calls), shaped after Alipay's trade API:

- ``POST /v1/trades`` create a trade; idempotent by ``out_trade_no`` (the merchant's
  order number): the same order with the same amount returns the existing trade, with
  a different amount it is ``ACQ.CONTEXT_INCONSISTENT``.
- ``GET /v1/trades/{out_trade_no}`` query; ``ACQ.TRADE_NOT_EXIST`` when unknown.
- ``POST /v1/trades/{out_trade_no}/close`` close an unpaid trade; a paid one answers
  ``ACQ.TRADE_STATUS_ERROR`` with the trade, so the caller learns it was paid.

- ``POST /v1/trades/{out_trade_no}/refunds`` refund part or all of a paid trade
  (``trade_no`` picks one of the order's trades); idempotent by ``out_request_no``;
  never more than the trade's total; a failed refund is retried by submitting the same
  ``out_request_no`` again.
- ``GET /v1/trades/{out_trade_no}/refunds/{out_request_no}`` query a refund.

Every status change produces an event ``evt_...`` sent to the trade's ``notify_url``,
signed in the Standard Webhooks scheme and resent with backoff until acknowledged.

Control API (what tests, the demo and people call): ``PUT /control/scripts/{order}``
scripts an order's behaviour, ``GET /control/trades/{order}`` shows the trade, the
calls the provider received and every callback delivery, ``POST
/control/trades/{order}/pay`` makes the payer pay now. ``/pay/{trade_no}`` is the
cashier page a payer opens from the pay URL. ``GET /control/ledger/{order}`` is the
provider's books for the order: captured over its paid trades, refunded over its
successful refunds, net (minor units); ``GET /control/ledger?order=a&order=b`` gives
the books of several orders at once.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import re
import secrets
from collections import Counter
from collections.abc import Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from decimal import Decimal
from importlib import resources
from typing import Any, Literal, Optional
from zoneinfo import ZoneInfo

import httpx
from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field

from paysentinel import signing
from paysentinel.config import Settings
from paysentinel.simulator.bills import BillAdjustments, DayBill, SyntheticRows

log = logging.getLogger("paysentinel.simulator")

ORDER_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
AMOUNT_PATTERN = r"^\d{1,10}(\.\d{1,2})?$"
Operation = Literal["create", "query", "close", "refund", "refund_query"]
OPERATIONS = ("create", "query", "close", "refund", "refund_query")


# --- Scripts ------------------------------------------------------------------------


class Fault(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["error", "hang"] = Field("error", description="error: HTTP 500 ACQ.SYSTEM_ERROR; hang: no answer")
    times: int = Field(-1, ge=-1, description="how many calls fail; -1 means every call")


class Faults(BaseModel):
    model_config = ConfigDict(extra="forbid")
    create: Optional[Fault] = None
    query: Optional[Fault] = None
    close: Optional[Fault] = None
    refund: Optional[Fault] = None
    refund_query: Optional[Fault] = None


class Script(BaseModel):
    """What the payer and the provider do for one order. Unscripted orders wait for the payer."""

    model_config = ConfigDict(extra="forbid")
    pay: Literal["immediately", "after_delay", "never"] = "never"
    pay_delay_seconds: float = Field(5.0, ge=0, le=86400)
    callback: Literal["normal", "drop", "duplicate", "delay"] = "normal"
    callback_delay_seconds: float = Field(0.0, ge=0, le=86400)
    callback_amount: Optional[str] = Field(None, pattern=AMOUNT_PATTERN, description="amount the callback claims")
    paid_amount: Optional[str] = Field(
        None,
        pattern=AMOUNT_PATTERN,
        description="amount the provider takes when the payer pays (trade, query, callback and bill all show it)",
    )
    after_close: Literal["nothing", "closed_callback", "pay"] = "nothing"
    after_close_delay_seconds: float = Field(1.0, ge=0, le=86400)
    second_charge: bool = Field(False, description="after paying, the payer pays the order again elsewhere")
    second_charge_delay_seconds: float = Field(1.0, ge=0, le=86400)
    risk_hold: bool = Field(False, description="the provider's risk control refuses to create the trade")
    refund: Literal["succeed", "fail"] = "succeed"
    refund_fail_times: int = Field(-1, ge=-1, description="submissions that fail when refund=fail; -1: all")
    refund_delay_seconds: float = Field(0.0, ge=0, le=86400, description="time a refund stays processing")
    faults: Faults = Faults()


# --- Provider API bodies --------------------------------------------------------------


class TradeCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    out_trade_no: str = Field(pattern=ORDER_PATTERN)
    total_amount: str = Field(pattern=AMOUNT_PATTERN, description="major units, e.g. 99.90")
    currency: str = Field("CNY", pattern=r"^[A-Z]{3}$")
    subject: str = Field(min_length=1, max_length=256)
    notify_url: Optional[AnyHttpUrl] = None
    time_expire: Optional[datetime] = None


class RefundCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    out_request_no: str = Field(pattern=ORDER_PATTERN)
    refund_amount: str = Field(pattern=AMOUNT_PATTERN)
    trade_no: Optional[str] = Field(None, max_length=64)
    refund_reason: Optional[str] = Field(None, max_length=256)


class OrphanTrade(BaseModel):
    model_config = ConfigDict(extra="forbid")
    out_trade_no: str = Field(pattern=ORDER_PATTERN)
    total_amount: str = Field(pattern=AMOUNT_PATTERN)
    currency: str = Field("CNY", pattern=r"^[A-Z]{3}$")


class PaidAt(BaseModel):
    paid_at: datetime


@dataclass
class SimRefund:
    out_request_no: str
    trade_no: str
    out_trade_no: str
    refund_amount: str
    currency: str
    refund_status: str = "REFUND_PROCESSING"
    fail_reason: Optional[str] = None
    gmt_refund: Optional[datetime] = None
    submissions: int = 1

    def out(self) -> dict[str, Any]:
        return {
            "out_request_no": self.out_request_no,
            "trade_no": self.trade_no,
            "out_trade_no": self.out_trade_no,
            "refund_amount": self.refund_amount,
            "currency": self.currency,
            "refund_status": self.refund_status,
            "fail_reason": self.fail_reason,
            "gmt_refund": self.gmt_refund.isoformat() if self.gmt_refund else None,
            "submissions": self.submissions,
        }


@dataclass
class SimTrade:
    trade_no: str
    out_trade_no: str
    total_amount: str
    currency: str
    subject: str
    notify_url: Optional[str]
    time_expire: Optional[datetime]
    pay_url: str
    trade_status: str = "WAIT_BUYER_PAY"
    gmt_create: datetime = field(default_factory=lambda: _now())
    gmt_payment: Optional[datetime] = None
    gmt_close: Optional[datetime] = None
    refunds: dict[str, SimRefund] = field(default_factory=dict)

    @property
    def paid(self) -> bool:
        return self.gmt_payment is not None

    def refunded(self, *, including_processing: bool = False) -> Decimal:
        counted = ("REFUND_SUCCESS", "REFUND_PROCESSING") if including_processing else ("REFUND_SUCCESS",)
        return sum((Decimal(r.refund_amount) for r in self.refunds.values() if r.refund_status in counted), Decimal(0))

    def out(self) -> dict[str, Any]:
        def iso(value: Optional[datetime]) -> Optional[str]:
            return value.isoformat() if value else None

        return {
            "trade_no": self.trade_no,
            "out_trade_no": self.out_trade_no,
            "trade_status": self.trade_status,
            "total_amount": self.total_amount,
            "currency": self.currency,
            "subject": self.subject,
            "pay_url": self.pay_url,
            "gmt_create": iso(self.gmt_create),
            "gmt_payment": iso(self.gmt_payment),
            "gmt_close": iso(self.gmt_close),
        }


def _now() -> datetime:
    return datetime.now(timezone.utc)


def new_trade_no() -> str:
    return _now().strftime("%Y%m%d") + "2200" + "".join(secrets.choice("0123456789") for _ in range(16))


def _ok(trade: SimTrade) -> dict[str, Any]:
    return {"code": "10000", "msg": "Success", "trade": trade.out()}


def _error(status: int, sub_code: str, sub_msg: str, trade: Optional[SimTrade] = None) -> JSONResponse:
    code = "20000" if status >= 500 else "40004"
    body: dict[str, Any] = {
        "code": code,
        "msg": "Service Currently Unavailable" if status >= 500 else "Business Failed",
        "sub_code": sub_code,
        "sub_msg": sub_msg,
    }
    if trade is not None:
        body["trade"] = trade.out()
    return JSONResponse(body, status_code=status)


# --- State ----------------------------------------------------------------------------


class Provider:
    """The simulated provider's books: trades, scripts, calls received, callbacks sent."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.trades: dict[str, SimTrade] = {}
        self.orders_by_trade_no: dict[str, str] = {}
        self.scripts: dict[str, Script] = {}
        self.faults_left: dict[str, dict[str, int]] = {}
        self.calls: dict[str, Counter[str]] = {}
        self.deliveries: dict[str, list[dict[str, Any]]] = {}
        self.extra_trades: dict[str, list[SimTrade]] = {}  # second charges of an order
        self.refund_failures_left: dict[str, int] = {}
        self.bills: dict[date, DayBill] = {}  # adjustments and synthetic rows per bill day
        self.http: Optional[httpx.AsyncClient] = None
        self._tasks: set[asyncio.Task[None]] = set()

    def script(self, order: str) -> Script:
        return self.scripts.get(order) or Script()

    def set_script(self, order: str, script: Script) -> None:
        self.scripts[order] = script
        self.faults_left[order] = {op: fault.times for op in OPERATIONS if (fault := getattr(script.faults, op))}
        self.refund_failures_left[order] = script.refund_fail_times if script.refund == "fail" else 0

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def fault(self, order: str, op: Operation) -> Optional[JSONResponse]:
        """Count the call; answer with the scripted fault if one is due."""
        self.calls.setdefault(order, Counter())[op] += 1
        left = self.faults_left.get(order, {}).get(op, 0)
        if left == 0:
            return None
        if left > 0:
            self.faults_left[order][op] = left - 1
        fault = getattr(self.script(order).faults, op)
        if fault.mode == "hang":
            await asyncio.sleep(self.settings.simulator_hang_seconds)
            return _error(504, "ACQ.SYSTEM_ERROR", f"{op} timed out inside the provider (scripted hang)")
        return _error(500, "ACQ.SYSTEM_ERROR", f"{op} failed inside the provider (scripted error)")

    # Trade lifecycle -------------------------------------------------------------

    def pay(self, trade: SimTrade, *, after_close: bool = False) -> Optional[str]:
        """The payer pays. Returns why not, or None when the trade is now paid."""
        if trade.trade_status == "TRADE_SUCCESS":
            return "the trade is already paid"
        if trade.trade_status == "TRADE_CLOSED" and not after_close:
            return "the trade is closed"
        if trade.trade_status == "WAIT_BUYER_PAY" and trade.time_expire and _now() > trade.time_expire:
            return "the trade expired"
        script = self.script(trade.out_trade_no)
        if script.paid_amount is not None and trade is self.trades.get(trade.out_trade_no):
            trade.total_amount = f"{Decimal(script.paid_amount):.2f}"
        trade.trade_status = "TRADE_SUCCESS"
        trade.gmt_payment = _now()
        log.info("trade %s (%s) paid", trade.trade_no, trade.out_trade_no)
        self.emit(trade)
        if script.second_charge and trade is self.trades.get(trade.out_trade_no):
            self.spawn(self._later(script.second_charge_delay_seconds, lambda: self.charge_again(trade)))
        return None

    def charge_again(self, first: SimTrade) -> None:
        """The payer pays the same order a second time, through another channel."""
        second = SimTrade(
            trade_no=new_trade_no(),
            out_trade_no=first.out_trade_no,
            total_amount=first.total_amount,
            currency=first.currency,
            subject=first.subject,
            notify_url=first.notify_url,
            time_expire=None,
            pay_url=first.pay_url,
            trade_status="TRADE_SUCCESS",
            gmt_payment=_now(),
        )
        self.extra_trades.setdefault(first.out_trade_no, []).append(second)
        self.orders_by_trade_no[second.trade_no] = first.out_trade_no
        log.info("trade %s (%s) paid a second time", second.trade_no, second.out_trade_no)
        self.emit(second)

    def all_trades(self) -> list[SimTrade]:
        return list(self.trades.values()) + [t for extra in list(self.extra_trades.values()) for t in extra]

    def bill(self, day: date) -> DayBill:
        return self.bills.setdefault(day, DayBill(day, ZoneInfo(self.settings.settlement_timezone)))

    def trades_of(self, order: str) -> list[SimTrade]:
        primary = self.trades.get(order)
        return ([primary] if primary else []) + self.extra_trades.get(order, [])

    # Refunds -----------------------------------------------------------------------

    def submit_refund(self, refund: SimRefund) -> None:
        """Start (or restart) a refund; its scripted outcome comes now or after the delay."""
        refund.refund_status, refund.fail_reason = "REFUND_PROCESSING", None
        delay = self.script(refund.out_trade_no).refund_delay_seconds
        if delay:
            self.spawn(self._later(delay, lambda: self._finish_refund(refund)))
        else:
            self._finish_refund(refund)

    def _finish_refund(self, refund: SimRefund) -> None:
        left = self.refund_failures_left.get(refund.out_trade_no, 0)
        if left != 0:
            self.refund_failures_left[refund.out_trade_no] = left - 1 if left > 0 else left
            refund.refund_status, refund.fail_reason = "REFUND_FAILED", "insufficient merchant balance (scripted)"
        else:
            refund.refund_status, refund.gmt_refund = "REFUND_SUCCESS", _now()
            trade = next(t for t in self.trades_of(refund.out_trade_no) if t.trade_no == refund.trade_no)
            if trade.refunded() >= Decimal(trade.total_amount):
                trade.trade_status, trade.gmt_close = "TRADE_CLOSED", _now()  # fully refunded
        log.info("refund %s of trade %s: %s", refund.out_request_no, refund.trade_no, refund.refund_status)

    def ledger(self, order: str) -> dict[str, Any]:
        trades = self.trades_of(order)
        captured = sum((Decimal(t.total_amount) for t in trades if t.paid), Decimal(0))
        refunded = sum((t.refunded() for t in trades), Decimal(0))
        return {
            "order": order,
            "currency": trades[0].currency if trades else None,
            "captured_minor": int(captured * 100),
            "refunded_minor": int(refunded * 100),
            "net_minor": int((captured - refunded) * 100),
            "trades": [
                {
                    "trade_no": t.trade_no,
                    "trade_status": t.trade_status,
                    "total_amount": t.total_amount,
                    "paid": t.paid,
                    "refunded_amount": f"{t.refunded():.2f}",
                }
                for t in trades
            ],
            "refunds": [r.out() for t in trades for r in t.refunds.values()],
        }

    def close(self, trade: SimTrade) -> None:
        trade.trade_status = "TRADE_CLOSED"
        trade.gmt_close = _now()
        log.info("trade %s (%s) closed", trade.trade_no, trade.out_trade_no)
        script = self.script(trade.out_trade_no)
        if script.after_close == "closed_callback":
            self.spawn(self._later(script.after_close_delay_seconds, lambda: self.emit(trade)))
        elif script.after_close == "pay":
            self.spawn(self._later(script.after_close_delay_seconds, lambda: self.pay(trade, after_close=True)))

    async def _later(self, delay: float, action) -> None:
        await asyncio.sleep(delay)
        action()

    # Callbacks -------------------------------------------------------------------

    def emit(self, trade: SimTrade) -> None:
        """A status change: build its event and deliver it as the order's script says."""
        script = self.script(trade.out_trade_no)
        event_id = "evt_" + secrets.token_hex(12)
        event = {
            "id": event_id,
            "type": "trade.status_changed",
            "created_at": _now().isoformat(),
            "data": {
                "out_trade_no": trade.out_trade_no,
                "trade_no": trade.trade_no,
                "trade_status": trade.trade_status,
                "total_amount": script.callback_amount or trade.total_amount,
                "currency": trade.currency,
                "gmt_payment": trade.gmt_payment.isoformat() if trade.gmt_payment else None,
            },
        }
        if script.callback == "drop":
            self._record(trade, event_id, 0, None, "dropped by script")
            return
        delay = script.callback_delay_seconds if script.callback == "delay" else 0.0
        copies = 2 if script.callback == "duplicate" else 1
        self.spawn(self._deliver(trade, event, delay, copies))

    async def _deliver(self, trade: SimTrade, event: dict[str, Any], delay: float, copies: int) -> None:
        if delay:
            await asyncio.sleep(delay)
        if not trade.notify_url:
            self._record(trade, event["id"], 0, None, "no notify_url on the trade")
            return
        body = json.dumps(event, separators=(",", ":")).encode()
        schedule = self.settings.simulator_resend_seconds
        for _ in range(copies):
            for attempt in range(1, len(schedule) + 2):
                # Signed afresh on every attempt, so the timestamp stays within tolerance.
                headers = signing.signed_headers(self.settings.simulator_webhook_secret, event["id"], body)
                status, error = None, None
                try:
                    assert self.http is not None
                    response = await self.http.post(trade.notify_url, content=body, headers=headers)
                    status = response.status_code
                    if not response.is_success:
                        error = response.text[:200]
                except httpx.HTTPError as err:
                    error = f"{type(err).__name__}: {err}"
                self._record(trade, event["id"], attempt, status, error)
                if status is not None and 200 <= status < 300:
                    break
                if attempt > len(schedule):
                    log.warning("event %s for %s: gave up after %d attempts", event["id"], trade.out_trade_no, attempt)
                    return
                await asyncio.sleep(schedule[attempt - 1])

    def _record(self, trade: SimTrade, event_id: str, attempt: int, status: Optional[int], error: Optional[str]) -> None:
        self.deliveries.setdefault(trade.out_trade_no, []).append(
            {
                "event_id": event_id,
                "trade_status": trade.trade_status,
                "attempt": attempt,
                "at": _now().isoformat(),
                "status_code": status,
                "error": error,
            }
        )
        log.info(
            "callback %s for %s (%s), attempt %d: %s", event_id, trade.out_trade_no, trade.trade_status, attempt, status or error
        )


# --- The application --------------------------------------------------------------------


def create_app(settings: Settings) -> FastAPI:
    provider = Provider(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with httpx.AsyncClient(timeout=5) as http:
            provider.http = http
            yield
            await provider.shutdown()

    app = FastAPI(
        title="paysentinel provider simulator",
        lifespan=lifespan,
        description="Alipay-like trades with scripted behaviour, for development and tests.",
    )
    app.state.provider = provider

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in exc.errors()]
        return _error(400, "ACQ.INVALID_PARAMETER", "; ".join(problems))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    # Provider API ------------------------------------------------------------------

    @app.post("/v1/trades")
    async def create_trade(body: TradeCreate, request: Request, idempotency_key: Optional[str] = Header(None)):
        if (failed := await provider.fault(body.out_trade_no, "create")) is not None:
            return failed
        if provider.script(body.out_trade_no).risk_hold:
            return _error(400, "ACQ.RISK_HOLD", "the payment was held by the provider's risk control")
        if Decimal(body.total_amount) <= 0:
            return _error(400, "ACQ.INVALID_PARAMETER", "total_amount must be positive")
        existing = provider.trades.get(body.out_trade_no)
        if existing is not None:
            if Decimal(existing.total_amount) != Decimal(body.total_amount) or existing.currency != body.currency:
                return _error(
                    400,
                    "ACQ.CONTEXT_INCONSISTENT",
                    f"order {body.out_trade_no} exists with {existing.total_amount} {existing.currency}",
                )
            return _ok(existing)  # the same request again (a retry): the same trade
        trade_no = new_trade_no()
        base = (settings.simulator_public_url or str(request.base_url)).rstrip("/")
        trade = SimTrade(
            trade_no=trade_no,
            out_trade_no=body.out_trade_no,
            total_amount=f"{Decimal(body.total_amount):.2f}",
            currency=body.currency,
            subject=body.subject,
            notify_url=str(body.notify_url) if body.notify_url else None,
            time_expire=body.time_expire,
            pay_url=f"{base}/pay/{trade_no}",
        )
        provider.trades[trade.out_trade_no] = trade
        provider.orders_by_trade_no[trade_no] = trade.out_trade_no
        log.info(
            "trade %s created for %s (%s %s, key %s)",
            trade_no,
            trade.out_trade_no,
            trade.total_amount,
            trade.currency,
            idempotency_key,
        )
        script = provider.script(trade.out_trade_no)
        if script.pay != "never":
            delay = script.pay_delay_seconds if script.pay == "after_delay" else 0.1
            provider.spawn(provider._later(delay, lambda: provider.pay(trade)))
        return _ok(trade)

    @app.get("/v1/trades/{out_trade_no}")
    async def query_trade(out_trade_no: str, trade_no: Optional[str] = None):
        """alipay.trade.query: by order number; with ``trade_no``, that trade of the order."""
        if (failed := await provider.fault(out_trade_no, "query")) is not None:
            return failed
        trade = provider.trades.get(out_trade_no)
        if trade_no is not None:
            trade = next((t for t in provider.trades_of(out_trade_no) if t.trade_no == trade_no), None)
        if trade is None:
            return _error(404, "ACQ.TRADE_NOT_EXIST", f"no trade for order {out_trade_no}")
        return _ok(trade)

    @app.post("/v1/trades/{out_trade_no}/close")
    async def close_trade(out_trade_no: str, idempotency_key: Optional[str] = Header(None)):
        if (failed := await provider.fault(out_trade_no, "close")) is not None:
            return failed
        trade = provider.trades.get(out_trade_no)
        if trade is None:
            return _error(404, "ACQ.TRADE_NOT_EXIST", f"no trade for order {out_trade_no}")
        if trade.trade_status == "TRADE_SUCCESS":
            return _error(400, "ACQ.TRADE_STATUS_ERROR", "the trade is paid and cannot be closed", trade)
        if trade.trade_status == "WAIT_BUYER_PAY":
            provider.close(trade)
        return _ok(trade)

    @app.post("/v1/trades/{out_trade_no}/refunds")
    async def refund_trade(out_trade_no: str, body: RefundCreate, idempotency_key: Optional[str] = Header(None)):
        if (failed := await provider.fault(out_trade_no, "refund")) is not None:
            return failed
        trades = provider.trades_of(out_trade_no)
        trade = next((t for t in trades if t.trade_no == (body.trade_no or t.trade_no)), None)
        if trade is None:
            which = f"trade {body.trade_no}" if body.trade_no else "trade"
            return _error(404, "ACQ.TRADE_NOT_EXIST", f"no {which} for order {out_trade_no}")
        amount = Decimal(body.refund_amount)
        if not trade.paid:
            return _error(400, "ACQ.TRADE_STATUS_ERROR", f"trade {trade.trade_no} is not paid ({trade.trade_status})")
        existing = trade.refunds.get(body.out_request_no)
        if existing is not None:
            if Decimal(existing.refund_amount) != amount:
                return _error(
                    400, "ACQ.CONTEXT_INCONSISTENT", f"refund {body.out_request_no} exists with amount {existing.refund_amount}"
                )
            if existing.refund_status == "REFUND_FAILED":  # the caller retries a failed refund
                existing.submissions += 1
                provider.submit_refund(existing)
            return {"code": "10000", "msg": "Success", "refund": existing.out()}
        if amount <= 0 or trade.refunded(including_processing=True) + amount > Decimal(trade.total_amount):
            return _error(
                400,
                "ACQ.REFUND_AMT_NOT_EQUAL_TOTAL",
                f"refund {body.refund_amount} exceeds trade total {trade.total_amount} less "
                f"{trade.refunded(including_processing=True):.2f} already refunded",
            )
        refund = SimRefund(
            out_request_no=body.out_request_no,
            trade_no=trade.trade_no,
            out_trade_no=out_trade_no,
            refund_amount=f"{amount:.2f}",
            currency=trade.currency,
        )
        trade.refunds[refund.out_request_no] = refund
        log.info(
            "refund %s of %s on trade %s requested (key %s)",
            refund.out_request_no,
            refund.refund_amount,
            trade.trade_no,
            idempotency_key,
        )
        provider.submit_refund(refund)
        return {"code": "10000", "msg": "Success", "refund": refund.out()}

    @app.get("/v1/trades/{out_trade_no}/refunds/{out_request_no}")
    async def query_refund(out_trade_no: str, out_request_no: str):
        if (failed := await provider.fault(out_trade_no, "refund_query")) is not None:
            return failed
        trades = provider.trades_of(out_trade_no)
        if not trades:
            return _error(404, "ACQ.TRADE_NOT_EXIST", f"no trade for order {out_trade_no}")
        refund = next((t.refunds[out_request_no] for t in trades if out_request_no in t.refunds), None)
        if refund is None:
            return _error(404, "ACQ.REFUND_NOT_EXIST", f"no refund {out_request_no} for order {out_trade_no}")
        return {"code": "10000", "msg": "Success", "refund": refund.out()}

    @app.get("/v1/bills/{bill_date}")
    async def download_bill(bill_date: date):
        """The day's settlement bill (CSV, Alipay layout), streamed."""
        if bill_date > datetime.now(ZoneInfo(settings.settlement_timezone)).date():
            return _error(400, "ACQ.INVALID_PARAMETER", f"no bill for {bill_date}: the day has not started")
        lines = provider.bill(bill_date).lines(provider.all_trades())
        return StreamingResponse(
            lines,
            media_type="text/csv; charset=utf-8",
            headers={"content-disposition": f'attachment; filename="bill-{bill_date}.csv"'},
        )

    # Control API ---------------------------------------------------------------------

    @app.put("/control/bills/{bill_date}/adjustments")
    async def adjust_bill(bill_date: date, adjustments: BillAdjustments):
        provider.bill(bill_date).adjustments = adjustments
        return {"date": str(bill_date), "adjustments": adjustments.model_dump()}

    @app.put("/control/bills/{bill_date}/synthetic")
    async def synthetic_rows(bill_date: date, rows: SyntheticRows):
        provider.bill(bill_date).synthetic = [rows]
        return {"date": str(bill_date), "synthetic": rows.model_dump()}

    @app.post("/control/orphans")
    async def orphan_trade(body: OrphanTrade):
        """A trade paid at the provider for an order the merchant never created (no callback)."""
        if not _valid_order(body.out_trade_no):
            return _error(400, "ACQ.INVALID_PARAMETER", f"order must match {ORDER_PATTERN}")
        trade = SimTrade(
            trade_no=new_trade_no(),
            out_trade_no=body.out_trade_no,
            total_amount=body.total_amount,
            currency=body.currency,
            subject="paid elsewhere",
            notify_url=None,
            time_expire=None,
            pay_url="",
            trade_status="TRADE_SUCCESS",
            gmt_payment=_now(),
        )
        provider.trades[trade.out_trade_no] = trade
        provider.orders_by_trade_no[trade.trade_no] = trade.out_trade_no
        return _ok(trade)

    @app.post("/control/trades/{order}/paid-at")
    async def set_paid_at(order: str, body: PaidAt):
        """Move the provider's payment time of the order's trade (e.g. to just before midnight)."""
        trade = provider.trades.get(order)
        if trade is None or not trade.paid:
            return _error(404, "ACQ.TRADE_NOT_EXIST", f"no paid trade for order {order}")
        trade.gmt_payment = body.paid_at
        return _ok(trade)

    @app.put("/control/scripts/{order}")
    async def put_script(order: str, script: Script):
        if not _valid_order(order):
            return _error(400, "ACQ.INVALID_PARAMETER", f"order must match {ORDER_PATTERN}")
        provider.set_script(order, script)
        return {"order": order, "script": script.model_dump()}

    @app.get("/control/trades/{order}")
    async def get_trade(order: str):
        trade = provider.trades.get(order)
        return {
            "trade": trade.out() if trade else None,
            "script": provider.script(order).model_dump(),
            "calls": {op: provider.calls.get(order, Counter())[op] for op in OPERATIONS},
            "deliveries": provider.deliveries.get(order, []),
            "extra_trades": [t.out() for t in provider.extra_trades.get(order, [])],
            "refunds": provider.ledger(order)["refunds"],
        }

    @app.get("/control/ledger/{order}")
    async def get_ledger(order: str):
        return provider.ledger(order)

    @app.get("/control/ledger")
    async def get_ledgers(order: list[str] = Query(default_factory=list, max_length=500)):
        """The books of several orders (``?order=a&order=b``), keyed by order; unknown orders show zeros."""
        return {"orders": {name: provider.ledger(name) for name in order}}

    @app.post("/control/trades/{order}/pay")
    async def pay_now(order: str):
        trade = provider.trades.get(order)
        if trade is None:
            return _error(404, "ACQ.TRADE_NOT_EXIST", f"no trade for order {order}")
        if (why := provider.pay(trade)) is not None:
            return _error(409, "ACQ.TRADE_STATUS_ERROR", why, trade)
        return _ok(trade)

    # Cashier page ----------------------------------------------------------------------

    @app.get("/pay/{trade_no}", response_class=HTMLResponse)
    async def cashier(trade_no: str):
        trade = provider.trades.get(provider.orders_by_trade_no.get(trade_no, ""))
        if trade is None:
            return HTMLResponse(_page("Unknown trade", f"No trade {trade_no}.", None), status_code=404)
        payable = trade.trade_status == "WAIT_BUYER_PAY"
        return _page(
            f"Pay {trade.total_amount} {trade.currency}",
            f"{trade.subject} — order {trade.out_trade_no}, status {trade.trade_status}.",
            trade if payable else None,
        )

    @app.post("/pay/{trade_no}", response_class=HTMLResponse)
    async def cashier_pay(trade_no: str):
        trade = provider.trades.get(provider.orders_by_trade_no.get(trade_no, ""))
        if trade is None:
            return HTMLResponse(_page("Unknown trade", f"No trade {trade_no}.", None), status_code=404)
        if (why := provider.pay(trade)) is not None:
            return HTMLResponse(_page("Not paid", f"Payment refused: {why}.", None), status_code=409)
        return _page("Paid", f"You paid {trade.total_amount} {trade.currency} for order {trade.out_trade_no}.", None)

    return app


def _valid_order(order: str) -> bool:
    return re.fullmatch(ORDER_PATTERN, order) is not None


def _page(title: str, message: str, payable: Optional[SimTrade]) -> str:
    template = resources.files("paysentinel.simulator").joinpath("cashier.html").read_text()
    button = (
        f'<form method="post" action="/pay/{html.escape(payable.trade_no)}"><button>Pay '
        f"{html.escape(payable.total_amount)} {html.escape(payable.currency)}</button></form>"
        if payable
        else ""
    )
    return template.format(title=html.escape(title), message=html.escape(message), button=button)
