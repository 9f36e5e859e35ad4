"""The simulator's trades and refunds, the scripts that decide what each order's payer and
the provider do, and the provider API's answer bodies."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Literal, Optional

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

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
