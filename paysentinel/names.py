"""The names by which code outside the workflows reaches them: workflow types, workflow
ids and signal names. Activities and services use these instead of importing the
workflow classes, so nothing outside workflows/ depends on workflow code.

tests/test_rules.py checks that they match the workflows' definitions.
"""

from __future__ import annotations

PAYMENT_WORKFLOW = "PaymentWorkflow"
REFUND_WORKFLOW = "RefundWorkflow"
REVIEW_WORKFLOW = "ManualReviewWorkflow"

# ManualReviewWorkflow's signal that settles a review without a person (the payment learned the answer).
REVIEW_SETTLE_SIGNAL = "settle"

# PaymentWorkflow's signal for a difference the daily reconciliation found.
SETTLEMENT_SIGNAL = "settlement"


def payment_workflow_id(order_id: str) -> str:
    """The business key: one payment workflow per merchant order."""
    return f"payment-{order_id}"


def refund_workflow_id(payment_id: str, key: str) -> str:
    return f"{payment_id}-refund-{key}"


def review_workflow_id(payment_id: str, number: int) -> str:
    return f"{payment_id}-review-{number}"
