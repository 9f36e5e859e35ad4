"""The payment's pure rules, projections and names: no Temporal server, no database."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from temporalio import workflow

from paysentinel import names
from paysentinel.models import (
    CheckoutRequest,
    NotifyKind,
    PaymentInput,
    PaymentOrder,
    PaymentStatus,
    PaymentTiming,
    RefundCommand,
    RefundStatus,
    RefundView,
    Trade,
    TradeStatus,
)
from paysentinel.projection import carried_state, payment_record, payment_view, restored_book, status_attributes
from paysentinel.rules import (
    Disposition,
    Meaning,
    PaymentBook,
    child_suffix,
    customer_reason,
    merchant_refund_key,
    money,
    refund_id_for,
    review_number,
)

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


def paid(trade_no: str = "T1", amount: int = 1000, currency: str = "CNY", status=TradeStatus.TRADE_SUCCESS) -> Trade:
    return Trade(order_id="o-1", trade_no=trade_no, status=status, amount_minor=amount, currency=currency, paid_at=NOW)


def refund(trade_no: str, amount: int, status=RefundStatus.PROCESSING, reason: str = "x", by: str = "merchant"):
    return RefundView(refund_id="rf", trade_no=trade_no, amount_minor=amount, status=status, reason=reason, requested_by=by)


# --- Names and ids --------------------------------------------------------------------


def test_refund_id_is_derived_from_order_and_key_only():
    assert refund_id_for("o-1", "dup-T2") == refund_id_for("o-1", "dup-T2")
    assert refund_id_for("o-1", "dup-T2") != refund_id_for("o-2", "dup-T2")
    assert refund_id_for("o-1", "dup-T2").startswith("rf") and len(refund_id_for("o-1", "k")) == 32
    # Pinned: a provider already holds refunds under these ids.
    assert refund_id_for("o-1", "settle-T9") == "rf" + __import__("hashlib").sha256(b"o-1:settle-T9").hexdigest()[:30]


def test_merchant_keys_have_their_own_namespace():
    assert merchant_refund_key("dup-T2") != "dup-T2"
    assert child_suffix(merchant_refund_key("abc")) == "m-abc"
    assert child_suffix("dup-T2") == "dup-T2"
    assert review_number("payment-o-1-review-3") == "3"


def test_names_match_the_workflow_definitions():
    from workflows.payment import PaymentWorkflow
    from workflows.refund import RefundWorkflow
    from workflows.review import ManualReviewWorkflow

    payment = workflow._Definition.from_class(PaymentWorkflow)
    assert payment is not None and payment.name == names.PAYMENT_WORKFLOW
    assert names.SETTLEMENT_SIGNAL in payment.signals
    refund_defn = workflow._Definition.from_class(RefundWorkflow)
    assert refund_defn is not None and refund_defn.name == names.REFUND_WORKFLOW
    review_defn = workflow._Definition.from_class(ManualReviewWorkflow)
    assert review_defn is not None and review_defn.name == names.REVIEW_WORKFLOW
    assert names.REVIEW_SETTLE_SIGNAL in review_defn.signals
    assert names.payment_workflow_id("o-1") == "payment-o-1"


def test_activities_do_not_import_workflows():
    import ast
    from pathlib import Path

    for path in (Path(__file__).parent.parent / "activities").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("workflows"), f"{path.name} imports {node.module}"


# --- What a provider result means ------------------------------------------------------


def test_no_trade_and_unpaid_answers():
    book = PaymentBook()
    assert book.meaning(Trade(order_id="o-1", exists=False), "query #1", 1000, "CNY") is Meaning.NO_TRADE
    assert book.meaning(paid(status=TradeStatus.WAIT_BUYER_PAY), "query #1", 1000, "CNY") is Meaning.NO_CHANGE
    assert book.meaning(paid(status=TradeStatus.TRADE_CLOSED), "close", 1000, "CNY") is Meaning.CLOSED


def test_a_closed_trade_does_not_close_a_paid_payment():
    book = PaymentBook(captured={"T1": 1000})
    assert book.meaning(paid(status=TradeStatus.TRADE_CLOSED), "close", 1000, "CNY") is Meaning.NO_CHANGE


def test_paid_answers():
    book = PaymentBook()
    assert book.meaning(paid(), "query #1", 1000, "CNY") is Meaning.PAID
    assert book.meaning(paid(amount=900), "query #1", 1000, "CNY") is Meaning.AMOUNT_DIFFERS
    assert book.meaning(paid(currency="USD"), "query #1", 1000, "CNY") is Meaning.AMOUNT_DIFFERS
    # A callback's amount is only a claim: the provider is asked first.
    assert book.meaning(paid(amount=900), "callback", 1000, "CNY") is Meaning.CLAIM_DIFFERS


def test_known_trades_and_the_settlement_bill():
    book = PaymentBook(captured={"T1": 1000}, deciding={"T2"})
    assert book.meaning(paid(), "callback", 1000, "CNY") is Meaning.ALREADY_PAID
    assert book.meaning(paid("T2", 900), "callback", 1000, "CNY") is Meaning.ALREADY_PAID
    assert book.meaning(paid(), "settlement", 1000, "CNY") is Meaning.ALREADY_PAID
    assert book.meaning(paid(amount=990), "settlement", 1000, "CNY") is Meaning.SETTLEMENT_DIFFERS
    # A trade still being decided has no captured amount to compare the bill with.
    assert book.meaning(paid("T2", 990), "settlement", 1000, "CNY") is Meaning.ALREADY_PAID


def test_disposition_of_a_right_amount():
    assert PaymentBook().disposition() is Disposition.ACCEPT
    assert PaymentBook(accepted="T1").disposition() is Disposition.DUPLICATE
    assert PaymentBook(base=PaymentStatus.CLOSED).disposition() is Disposition.LATE


def test_accept_and_undecided():
    book = PaymentBook()
    assert book.undecided()
    book.captured["T1"] = 1000
    assert not book.undecided()
    book.accept("T1", NOW)
    assert (book.trade_no, book.accepted, book.paid_at, book.base) == ("T1", "T1", NOW, PaymentStatus.SUCCEEDED)
    assert PaymentBook(deciding={"T1"}).undecided() is False


# --- Status and transitions ------------------------------------------------------------


def test_money_status_and_excess():
    book = PaymentBook(base=PaymentStatus.SUCCEEDED, captured={"T1": 1000, "T2": 1000}, accepted="T1")
    assert book.money_status() is PaymentStatus.SUCCEEDED
    assert book.excess() == {"T2": 1000}
    book.deciding.add("T2")
    assert book.excess() == {}
    book.deciding.clear()
    book.refunds["dup-T2"] = refund("T2", 1000)
    assert book.excess() == {} and book.money_status() is PaymentStatus.REFUNDING
    assert book.refunds_of("T2") == 1
    book.open_reviews["r-1"] = "amount_mismatch"
    assert book.money_status() is PaymentStatus.IN_REVIEW


def test_transition_and_what_the_customer_hears():
    book = PaymentBook()
    previous = book.apply_status(PaymentStatus.PENDING, "trade created", None)
    assert previous is PaymentStatus.CREATED and book.base is PaymentStatus.PENDING and book.to_tell(previous) is None
    previous = book.apply_status(PaymentStatus.FAILED, "no money moved", None)
    assert book.reason == "no money moved"
    assert book.to_tell(previous) == (NotifyKind.FAILED, "the payment could not be made")
    book.told.add(NotifyKind.FAILED)
    assert book.to_tell(PaymentStatus.PENDING) is None
    book.apply_status(PaymentStatus.IN_REVIEW, "a person looks", "risk_rule")
    assert book.base is PaymentStatus.FAILED and book.review_reason == "risk_rule"
    assert [u.key.name for u in status_attributes(PaymentStatus.IN_REVIEW, "risk_rule")] == ["PaymentStatus", "ReviewReason"]


# --- Refunds ---------------------------------------------------------------------------


def test_refund_refusals():
    command = RefundCommand(key="k1", amount_minor=600, reason="returned")
    assert "only a paid payment" in PaymentBook().refund_refusal(command, "CNY")
    assert "under review" in PaymentBook(accepted="T1", open_reviews={"r": "x"}).refund_refusal(command, "CNY")
    book = PaymentBook(accepted="T1", captured={"T1": 1000})
    assert book.refund_refusal(command, "CNY") is None
    book.refunds[merchant_refund_key("k0")] = refund("T1", 500)
    refusal = book.refund_refusal(command, "CNY")
    assert refusal is not None and "exceeds what is refundable: 5.00 CNY" in refusal
    book.refunds[merchant_refund_key("k1")] = refund("T1", 400)
    assert book.refund_refusal(command, "CNY") == "refund key 'k1' was already used for 4.00 CNY"
    assert book.refund_refusal(command.model_copy(update={"amount_minor": 400}), "CNY") is None


def test_settlement_refund_returns_what_is_left():
    book = PaymentBook(captured={"T1": 1000}, refunds={"a": refund("T1", 300), "b": refund("T1", 200, RefundStatus.FAILED)})
    assert book.settlement_refund("T1") == 700
    book.refunded["T1"] = 1000
    assert book.settlement_refund("T1") == 0
    assert book.settlement_refund("T9") == 0


def test_customer_words():
    assert "charged twice" in customer_reason(refund("T2", 1, reason="duplicate charge: x", by="system"))
    assert "after the order had been closed" in customer_reason(refund("T2", 1, reason="paid after CLOSED"))
    assert customer_reason(refund("T1", 1, reason="broken cup")) == "the shop refunds you: broken cup"
    assert "after checking" in customer_reason(refund("T1", 1, reason="amount mismatch", by="ops"))
    assert money(12345, "CNY") == "123.45 CNY" and money(500, "JPY") == "500 JPY"


# --- Projections -----------------------------------------------------------------------


def test_view_record_and_carried_state():
    order = PaymentOrder(order_id="o-1", amount_minor=1000)
    book = PaymentBook(
        status=PaymentStatus.PARTIALLY_REFUNDED,
        base=PaymentStatus.SUCCEEDED,
        seq=7,
        trade_no="T1",
        captured={"T1": 1000},
        refunded={"T1": 400},
        accepted="T1",
        final_at=NOW,
        refunds={"k": refund("T1", 400, RefundStatus.SUCCEEDED)},
        told={NotifyKind.PAID},
        seen_events={"e2", "e1"},
        open_reviews={"r-1": "x", "r-2": "y"},
    )
    view = payment_view(book, "payment-o-1", order)
    assert (view.captured_minor, view.refunded_minor, view.review_id, view.currency) == (1000, 400, "r-2", "CNY")
    record = payment_record(book, "payment-o-1", "refunded")
    assert (record.paid_amount_minor, record.outcome, record.seq) == (1000, PaymentStatus.SUCCEEDED, 7)
    assert payment_record(PaymentBook(), "p", "e").paid_amount_minor is None
    state = carried_state(book)
    assert state.seen_events == ["e1", "e2"] and state.told == [NotifyKind.PAID.value]
    again = restored_book(state)
    assert (again.captured, again.refunded, again.accepted, again.told) == (book.captured, book.refunded, "T1", {NotifyKind.PAID})
    assert again.open_reviews == {} and again.deciding == set()


# --- The workflow's own order model ------------------------------------------------------


def test_payment_order_is_the_checkout_request_without_the_api_checks():
    request = CheckoutRequest(
        order_id="o-1", amount_minor=1000, currency="usd", customer={"email": "a@example.com"}, expires_in_seconds=60
    )
    order = PaymentOrder.of(request)
    assert order.model_dump() == request.model_dump()
    # What a history recorded decodes even where today's API would refuse it or has moved on.
    old = {
        "order_id": "o 1!",
        "amount_minor": 0,
        "currency": "CNY",
        "expires_in_seconds": 1,
        "customer": {"email": None, "phone": None, "fax": "x"},
        "retired_field": True,
    }
    assert PaymentOrder.model_validate(old).expires_in_seconds == 1
    with pytest.raises(ValueError):
        CheckoutRequest.model_validate(old)


def test_payment_input_decodes_a_recorded_request():
    timing = PaymentTiming(
        callback_timeout_seconds=1,
        query_backoff_seconds=[1],
        payment_ttl_seconds=60,
        resend_window_seconds=1,
        close_attempts=1,
        provider_retry_initial_seconds=1,
        provider_max_attempts=1,
    )
    recorded = PaymentInput(
        payment_id="payment-o-1", request=PaymentOrder(order_id="o-1", amount_minor=5), notify_url="http://x", timing=timing
    ).model_dump_json()
    assert PaymentInput.model_validate_json(recorded).request.amount_minor == 5
