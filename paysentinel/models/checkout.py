"""The checkout API's models: a checkout request, a merchant's refund request, and the
payment view the API, the CLI and the workflow query show."""

from __future__ import annotations

from datetime import datetime
from typing import Optional

from pydantic import BaseModel, ConfigDict, EmailStr, Field, field_validator

from paysentinel.models.common import CURRENCY_EXPONENTS, ORDER_ID_PATTERN, PaymentStatus, RefundStatus


def no_control_characters(value: object) -> object:
    """Text a person typed: NUL and other control characters (tab and line breaks
    aside) are refused, so they never reach the database, the provider or a bill."""
    if isinstance(value, str):
        bad = next((c for c in value if (ord(c) < 32 and c not in "\t\n\r") or 127 <= ord(c) < 160), None)
        if bad is not None:
            raise ValueError(f"must not contain control characters (found U+{ord(bad):04X})")
    return value


class Customer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    email: Optional[EmailStr] = None
    phone: Optional[str] = Field(None, pattern=r"^\+?[0-9 \-]{5,20}$")

    @field_validator("email", "phone", mode="before")
    @classmethod
    def _no_control_characters(cls, value: object) -> object:
        return no_control_characters(value)


class CheckoutRequest(BaseModel):
    """What the checkout service sends to start a payment."""

    model_config = ConfigDict(extra="forbid")

    order_id: str = Field(..., pattern=ORDER_ID_PATTERN, description="Merchant order number")
    amount_minor: int = Field(..., gt=0, le=10**12, description="Amount in minor units (fen, cents)")
    currency: str = Field("CNY", description="ISO 4217 code")
    provider: str = Field("simulator", description="Payment provider adapter")
    subject: str = Field("", max_length=128, description="What the customer pays for")
    customer: Customer = Field(default_factory=Customer)
    notify_url: Optional[str] = Field(
        None, max_length=2048, description="Merchant URL that receives a signed notification for every outcome"
    )
    client_ip: Optional[str] = Field(None, max_length=45, description="Payer's IP, for risk rules")
    device_id: Optional[str] = Field(None, max_length=128, description="Payer's device, for risk rules")
    expires_in_seconds: Optional[float] = Field(
        None, ge=5, le=7 * 24 * 3600, description="Payment time to live; default from settings"
    )

    @field_validator("currency")
    @classmethod
    def _known_currency(cls, value: str) -> str:
        value = value.upper()
        if value not in CURRENCY_EXPONENTS:
            raise ValueError(f"unsupported currency {value!r}; use one of {sorted(CURRENCY_EXPONENTS)}")
        return value

    @field_validator("order_id", "currency", "provider", "subject", "notify_url", "client_ip", "device_id", mode="before")
    @classmethod
    def _no_control_characters(cls, value: object) -> object:
        return no_control_characters(value)


class RefundCreate(BaseModel):
    """A merchant-initiated refund (``POST /payments/{id}/refunds``)."""

    model_config = ConfigDict(extra="forbid")
    amount_minor: int = Field(..., gt=0, le=10**12)
    reason: str = Field(..., min_length=1, max_length=256)


class RefundView(BaseModel):
    refund_id: str  # also the provider's out_request_no
    trade_no: str
    amount_minor: int
    status: RefundStatus
    reason: str
    requested_by: str
    detail: Optional[str] = None


class TimelineEntry(BaseModel):
    at: datetime
    event: str
    detail: str = ""


class PaymentView(BaseModel):
    """A payment as the API, the CLI and the workflow query show it."""

    payment_id: str
    order_id: str
    status: PaymentStatus
    amount_minor: int
    currency: str
    provider: str
    pay_url: Optional[str] = None
    trade_no: Optional[str] = None
    reason: Optional[str] = None
    review_reason: Optional[str] = None
    review_id: Optional[str] = None
    captured_minor: int = 0
    refunded_minor: int = 0
    expires_at: Optional[datetime] = None
    refunds: list[RefundView] = Field(default_factory=list)
    timeline: list[TimelineEntry] = Field(default_factory=list)
