"""A payment's rules, without Temporal: what the payment knows (``PaymentBook``), what a
provider's answer means for it, what may be refunded, the refund ids, and the words
the customer and the timeline get.

The payment workflow keeps one ``PaymentBook`` and asks these rules; it alone calls
activities, starts child workflows and waits. Everything here is deterministic: no
I/O, no clock (times are passed in), so unit tests pin it down without a server
(tests/test_rules.py). The per-trade money arithmetic lives in paysentinel/ledger.py.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Optional

from paysentinel.ledger import Ledger
from paysentinel.models import (
    NotifyKind,
    PaymentStatus,
    RefundCommand,
    RefundStatus,
    RefundView,
    TimelineEntry,
    Trade,
    TradeStatus,
    to_major,
)

OPEN = (PaymentStatus.CREATED, PaymentStatus.PENDING)
# The lifecycle's own outcomes; refunds and reviews come on top of them.
OUTCOMES = (PaymentStatus.SUCCEEDED, PaymentStatus.FAILED, PaymentStatus.CLOSED)
LIFECYCLE = (PaymentStatus.CREATED, PaymentStatus.PENDING, *OUTCOMES)
# A transition to these records its detail as the payment's reason.
WITH_REASON = (PaymentStatus.FAILED, PaymentStatus.CLOSED, PaymentStatus.IN_REVIEW)
CLAIMS = ("callback",)  # sources whose amount is the sender's claim, not the provider's answer
RISK_HOLD = "ACQ.RISK_HOLD"  # the provider's rejection code for a payment it holds for risk

# The customer hears about these outcomes once each (refunds and reviews: once per event).
TELL = {
    PaymentStatus.SUCCEEDED: (NotifyKind.PAID, "the payment provider confirmed your payment"),
    PaymentStatus.FAILED: (NotifyKind.FAILED, "the payment could not be made"),
    PaymentStatus.CLOSED: (NotifyKind.CLOSED, "the payment was not completed in time"),
}
IN_REVIEW_WORDS = "the payment needs a check before we can confirm it"

MERCHANT_KEY = "merchant:"  # a merchant's Idempotency-Key lives in its own namespace


def refund_id_for(order_id: str, key: str) -> str:
    """The provider's out_request_no: derived from the order and the request, nothing else goes into it."""
    return "rf" + hashlib.sha256(f"{order_id}:{key}".encode()).hexdigest()[:30]


def merchant_refund_key(key: str) -> str:
    """A merchant's refund key, apart from the internal ones (review-N, dup-…, late-…, settle-…)."""
    return MERCHANT_KEY + key


def child_suffix(key: str) -> str:
    """The part of a refund workflow's id that names the refund."""
    return "m-" + key[len(MERCHANT_KEY) :] if key.startswith(MERCHANT_KEY) else key


def review_number(review_id: str) -> str:
    """The running number at the end of a review workflow's id."""
    return review_id.rsplit("-", 1)[1]


def money(amount_minor: int, currency: str) -> str:
    """12345, "CNY" -> "123.45 CNY"."""
    return f"{to_major(amount_minor, currency)} {currency}"


def customer_reason(refund: RefundView) -> str:
    """Why the money goes back, in the customer's words."""
    if refund.reason.startswith("duplicate charge"):
        return "you were charged twice for this order; the extra payment is being returned"
    if refund.reason.startswith("paid after"):
        return "your payment arrived after the order had been closed, so it is being returned"
    if refund.requested_by == "merchant":
        return f"the shop refunds you: {refund.reason}"
    return "after checking the payment, the money is being returned"


class Meaning(Enum):
    """What one answer of the provider (a query, a close, a callback, a bill line) means."""

    NO_TRADE = "the provider has no trade for this order yet"
    CLOSED = "closed at the provider while nothing was paid: the payment is closed"
    NO_CHANGE = "not paid, and nothing is waiting for it"
    ALREADY_PAID = "a trade already recorded (or being decided)"
    SETTLEMENT_DIFFERS = "the bill reports another amount than was captured: a person decides"
    PAID = "the order's amount was paid: accept it, or return it"
    CLAIM_DIFFERS = "a callback claims another amount: ask the provider what it took"
    AMOUNT_DIFFERS = "the provider took another amount: a person decides"


class Disposition(Enum):
    """What a confirmed capture of the order's amount is."""

    ACCEPT = "the order's payment"
    DUPLICATE = "a second charge of a paid order"
    LATE = "paid after the payment ended unpaid"


@dataclass
class PaymentBook:
    """Everything the payment workflow knows about its payment, apart from messages still
    to process and the child workflows it runs."""

    status: PaymentStatus = PaymentStatus.CREATED
    base: PaymentStatus = PaymentStatus.CREATED  # the lifecycle's own outcome, before refunds and reviews
    seq: int = 0
    trade_no: Optional[str] = None
    pay_url: Optional[str] = None
    reason: Optional[str] = None
    review_reason: Optional[str] = None
    paid_at: Optional[datetime] = None
    expires_at: Optional[datetime] = None
    final_at: Optional[datetime] = None
    callback_at: Optional[datetime] = None  # set while a callback is being applied
    captured: dict[str, int] = field(default_factory=dict)  # trade_no -> amount the provider took
    refunded: dict[str, int] = field(default_factory=dict)  # trade_no -> amount refunded
    kept: dict[str, int] = field(default_factory=dict)  # trade_no -> left with the merchant by an operator
    accepted: Optional[str] = None  # the trade this order is paid with
    deciding: set[str] = field(default_factory=set)  # trades whose amount is being confirmed or decided
    refunds: dict[str, RefundView] = field(default_factory=dict)  # refund key -> refund
    open_reviews: dict[str, str] = field(default_factory=dict)  # review id -> reason
    reviews: int = 0
    told: set[NotifyKind] = field(default_factory=set)
    seen_events: set[str] = field(default_factory=set)
    timeline: list[TimelineEntry] = field(default_factory=list)
    unconfirmed: bool = False  # closed by a review while the provider could not say whether it was paid
    dirty: bool = False  # the last database write gave up; the row must catch up
    alerted: bool = False  # an operator was alerted about a failed child workflow

    # --- Money ----------------------------------------------------------------------

    def ledger(self) -> Ledger:
        refunding: dict[str, int] = {}
        for refund in self.refunds.values():
            if refund.status is RefundStatus.PROCESSING:
                refunding[refund.trade_no] = refunding.get(refund.trade_no, 0) + refund.amount_minor
        return Ledger(
            captured=dict(self.captured),
            refunded=dict(self.refunded),
            refunding=refunding,
            kept=dict(self.kept),
            accepted=self.accepted,
        )

    def money_status(self) -> PaymentStatus:
        """The status the money says (reviews, refunds, the accepted charge, else the lifecycle's)."""
        return self.ledger().status(self.base, reviews_open=bool(self.open_reviews))

    def excess(self) -> dict[str, int]:
        """Money on trades the order is not paid with, not being returned and not being decided."""
        ledger = self.ledger()
        if ledger.balanced(reviews_open=bool(self.open_reviews)):
            return {}
        return {trade_no: amount for trade_no, amount in ledger.excess().items() if trade_no not in self.deciding}

    def refunds_of(self, trade_no: str) -> int:
        """How many refunds of this trade there have been."""
        return sum(1 for r in self.refunds.values() if r.trade_no == trade_no)

    def refunding_or_refunded(self, trade_no: str) -> int:
        return sum(
            r.amount_minor for r in self.refunds.values() if r.trade_no == trade_no and r.status is not RefundStatus.FAILED
        )

    def settlement_refund(self, trade_no: str) -> int:
        """What a settlement review's refund returns of a trade: what is not refunded or refunding."""
        if self.captured.get(trade_no, 0) > self.refunded.get(trade_no, 0):
            return self.captured[trade_no] - self.refunding_or_refunded(trade_no)
        return 0

    def refund_refusal(self, command: RefundCommand, currency: str) -> Optional[str]:
        """Why a merchant's refund cannot be taken, or None when it can (or is a repeat)."""
        existing = self.refunds.get(merchant_refund_key(command.key))
        if existing is not None:
            if existing.amount_minor != command.amount_minor:
                return f"refund key {command.key!r} was already used for {money(existing.amount_minor, currency)}"
            return None
        if self.open_reviews:
            return "the payment is under review; the review decides what happens to the money first"
        if self.accepted is None:
            return f"the payment is {self.status.value}; only a paid payment can be refunded"
        refundable = self.ledger().refundable()
        if command.amount_minor > refundable:
            trade = self.accepted
            return (
                f"a refund of {money(command.amount_minor, currency)} exceeds what is refundable: "
                f"{money(refundable, currency)} (captured {money(self.captured[trade], currency)}, "
                f"refunded or refunding {money(self.refunding_or_refunded(trade), currency)})"
            )
        return None

    # --- The lifecycle --------------------------------------------------------------

    def undecided(self) -> bool:
        """Nothing is paid and nothing is being decided: the provider must still be asked."""
        return self.base in OPEN and not self.captured and not self.deciding

    def meaning(self, trade: Trade, source: str, amount_minor: int, currency: str) -> Meaning:
        """What a provider result means for this payment (of ``amount_minor`` in ``currency``)."""
        status = trade.status
        if not trade.exists or status is None:
            return Meaning.NO_TRADE
        if not status.is_paid:
            return Meaning.CLOSED if status is TradeStatus.TRADE_CLOSED and self.undecided() else Meaning.NO_CHANGE
        trade_no = trade.trade_no or ""
        if trade_no in self.captured or trade_no in self.deciding:
            captured = self.captured.get(trade_no)
            if source == "settlement" and captured is not None and (trade.amount_minor != captured or trade.currency != currency):
                return Meaning.SETTLEMENT_DIFFERS
            return Meaning.ALREADY_PAID
        if trade.amount_minor == amount_minor and trade.currency == currency:
            return Meaning.PAID
        return Meaning.CLAIM_DIFFERS if source in CLAIMS else Meaning.AMOUNT_DIFFERS

    def disposition(self) -> Disposition:
        """A confirmed capture of the order's amount: the order's payment, or money to give back."""
        if self.base in OPEN and self.accepted is None:
            return Disposition.ACCEPT
        return Disposition.DUPLICATE if self.accepted is not None else Disposition.LATE

    def accept(self, trade_no: str, paid_at: datetime) -> None:
        """The order is paid with ``trade_no``."""
        self.trade_no, self.accepted, self.paid_at = trade_no, trade_no, paid_at
        self.base = PaymentStatus.SUCCEEDED

    def apply_status(self, status: PaymentStatus, detail: str, review_reason: Optional[str]) -> PaymentStatus:
        """Record a transition; returns the status before it."""
        if status in LIFECYCLE:
            self.base = status
        previous, self.status = self.status, status
        if status in WITH_REASON:
            self.reason = detail
        if review_reason:
            self.review_reason = review_reason
        return previous

    def to_tell(self, previous: PaymentStatus) -> Optional[tuple[NotifyKind, str]]:
        """What the customer hears about the status just reached, if anything (once per kind)."""
        if self.status in TELL and self.status is not previous and TELL[self.status][0] not in self.told:
            return TELL[self.status]
        return None


# --- Words for the timeline ---------------------------------------------------------


def mismatch_evidence(source: str, trade: Trade, amount_minor: int, currency: str) -> str:
    took = money(trade.amount_minor or 0, trade.currency or currency)
    return f"{source} reports {took} for trade {trade.trade_no or ''}, order is {money(amount_minor, currency)}"


def settlement_evidence(trade: Trade, captured: int, currency: str) -> str:
    took = money(trade.amount_minor or 0, trade.currency or currency)
    return f"the settlement bill reports {took} for trade {trade.trade_no or ''}; we captured {money(captured, currency)}"


def confirms(found: Trade, trade_no: str) -> bool:
    """The provider's own answer says ``trade_no`` was paid."""
    return found.trade_no == trade_no and found.status is not None and found.status.is_paid


def status_unknown_evidence(trade: Optional[Trade]) -> str:
    if trade is None:
        return "the provider could not be reached to close the trade"
    return f"the provider still reports {trade.status} after close"
