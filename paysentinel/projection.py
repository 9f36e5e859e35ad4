"""What others see of a payment, built from its ``PaymentBook``: the API's PaymentView,
the database row (PaymentRecord), the search attributes, and the compact state a paid
payment carries into its refund phase (PaymentState) and is restored from.

Pure functions: no I/O, no clock.
"""

from __future__ import annotations

from temporalio.common import SearchAttributeKey, SearchAttributeUpdate

from paysentinel.models import NotifyKind, PaymentOrder, PaymentRecord, PaymentState, PaymentStatus, PaymentView
from paysentinel.rules import OUTCOMES, PaymentBook

PAYMENT_STATUS = SearchAttributeKey.for_keyword("PaymentStatus")
ORDER_ID = SearchAttributeKey.for_keyword("OrderId")
PROVIDER = SearchAttributeKey.for_keyword("Provider")
AMOUNT_MINOR = SearchAttributeKey.for_int("AmountMinor")
CURRENCY = SearchAttributeKey.for_keyword("Currency")
REVIEW_REASON = SearchAttributeKey.for_keyword("ReviewReason")


def status_attributes(status: PaymentStatus, review_reason: str | None = None) -> list[SearchAttributeUpdate]:
    """The search attributes a transition to ``status`` sets."""
    updates: list[SearchAttributeUpdate] = [PAYMENT_STATUS.value_set(status.value)]
    if review_reason:
        updates.append(REVIEW_REASON.value_set(review_reason))
    return updates


def payment_view(book: PaymentBook, payment_id: str, order: PaymentOrder) -> PaymentView:
    return PaymentView(
        payment_id=payment_id,
        order_id=order.order_id,
        status=book.status,
        amount_minor=order.amount_minor,
        currency=order.currency,
        provider=order.provider,
        pay_url=book.pay_url,
        trade_no=book.trade_no,
        reason=book.reason,
        review_reason=book.review_reason,
        review_id=next(reversed(book.open_reviews), None) if book.open_reviews else None,
        captured_minor=sum(book.captured.values()),
        refunded_minor=sum(book.refunded.values()),
        expires_at=book.expires_at,
        refunds=list(book.refunds.values()),
        timeline=list(book.timeline),
    )


def payment_record(book: PaymentBook, payment_id: str, event: str) -> PaymentRecord:
    return PaymentRecord(
        payment_id=payment_id,
        seq=book.seq,
        status=book.status,
        trade_no=book.trade_no,
        pay_url=book.pay_url,
        reason=book.reason,
        review_reason=book.review_reason,
        paid_amount_minor=sum(book.captured.values()) if book.captured else None,
        refunded_minor=sum(book.refunded.values()),
        paid_at=book.paid_at,
        expires_at=book.expires_at,
        event=event,
        outcome=book.base if book.base in OUTCOMES else None,
        callback_received_at=book.callback_at,
    )


def carried_state(book: PaymentBook) -> PaymentState:
    """What continues as new into the refund phase."""
    assert book.final_at is not None
    return PaymentState(
        status=book.status,
        base=book.base,
        seq=book.seq,
        trade_no=book.trade_no,
        pay_url=book.pay_url,
        reason=book.reason,
        review_reason=book.review_reason,
        paid_at=book.paid_at,
        expires_at=book.expires_at,
        final_at=book.final_at,
        captured=book.captured,
        refunded=book.refunded,
        kept=book.kept,
        accepted=book.accepted,
        refunds=book.refunds,
        reviews=book.reviews,
        told=[kind.value for kind in book.told],
        seen_events=sorted(book.seen_events),
        timeline=book.timeline,
        alerted=book.alerted,
    )


def restored_book(state: PaymentState) -> PaymentBook:
    """The book of a payment that continued as new with ``state``."""
    return PaymentBook(
        status=state.status,
        base=state.base,
        seq=state.seq,
        trade_no=state.trade_no,
        pay_url=state.pay_url,
        reason=state.reason,
        review_reason=state.review_reason,
        paid_at=state.paid_at,
        expires_at=state.expires_at,
        final_at=state.final_at,
        captured=dict(state.captured),
        refunded=dict(state.refunded),
        kept=dict(state.kept),
        accepted=state.accepted,
        refunds=dict(state.refunds),
        reviews=state.reviews,
        told={NotifyKind(kind) for kind in state.told},
        seen_events=set(state.seen_events),
        timeline=list(state.timeline),
        alerted=state.alerted,
    )
