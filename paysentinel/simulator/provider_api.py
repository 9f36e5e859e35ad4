"""The simulator's provider API (what the worker calls): trades, refunds and settlement bills,
shaped after Alipay's trade API (see paysentinel.simulator.app)."""

from __future__ import annotations

import logging
from datetime import date, datetime
from decimal import Decimal
from typing import Optional
from zoneinfo import ZoneInfo

from fastapi import FastAPI, Header, Request
from fastapi.responses import StreamingResponse
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field

from paysentinel.config import Settings
from paysentinel.simulator.provider import Provider
from paysentinel.simulator.trades import AMOUNT_PATTERN, ORDER_PATTERN, SimRefund, SimTrade, _error, _ok, new_trade_no

log = logging.getLogger("paysentinel.simulator")

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


def add_provider_routes(app: FastAPI, provider: Provider, settings: Settings) -> None:
    """The provider API's routes, on ``provider``'s state."""

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
