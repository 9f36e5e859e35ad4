"""The simulator's control API (what tests, the demo and people call): scripts, settlement bill
adjustments, orphan trades, paying now, and the provider's books per order."""

from __future__ import annotations

import re
from collections import Counter
from datetime import date, datetime

from fastapi import FastAPI, Query
from pydantic import BaseModel, ConfigDict, Field

from paysentinel.simulator.bills import BillAdjustments, SyntheticRows
from paysentinel.simulator.provider import Provider
from paysentinel.simulator.trades import (
    AMOUNT_PATTERN,
    OPERATIONS,
    ORDER_PATTERN,
    Script,
    SimTrade,
    _error,
    _now,
    _ok,
    new_trade_no,
)


class OrphanTrade(BaseModel):
    model_config = ConfigDict(extra="forbid")
    out_trade_no: str = Field(pattern=ORDER_PATTERN)
    total_amount: str = Field(pattern=AMOUNT_PATTERN)
    currency: str = Field("CNY", pattern=r"^[A-Z]{3}$")


class PaidAt(BaseModel):
    paid_at: datetime


def add_control_routes(app: FastAPI, provider: Provider) -> None:
    """The control API's routes, on ``provider``'s state."""

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


def _valid_order(order: str) -> bool:
    return re.fullmatch(ORDER_PATTERN, order) is not None
